"""The default corpus: the Python reference text shipped in the standard library (``pydoc_data.topics``),
split into train/eval by topic so that no topic's text appears in both."""

from __future__ import annotations

import zlib
from typing import Any


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as _topics

    return dict(sorted(_topics.items()))


def split_topics(eval_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic split by a CRC of the topic name (stable across Python versions and runs)."""
    train, evals = [], []
    for name, text in topics().items():
        bucket = zlib.crc32(name.encode()) % 1000
        (evals if bucket < eval_fraction * 1000 else train).append(text)
    return train, evals


def block_dataset(texts: list[str], tokenizer: Any, block_size: int, max_blocks: int | None = None):
    """Tokenize, join with EOS and cut into ``block_size`` blocks (labels = input_ids, as run_clm does)."""
    from datasets import Dataset

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_blocks is not None and len(ids) >= block_size * max_blocks:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the corpus has fewer than {block_size} tokens; lower --max-seq-len")
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})
