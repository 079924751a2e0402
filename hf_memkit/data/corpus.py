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


def paragraphs(texts: list[str]) -> list[str]:
    """Every paragraph of ``texts`` (split at blank lines, stripped, empty ones dropped), in order: a corpus of
    mixed lengths, from one-line paragraphs to long code listings."""
    import re

    out: list[str] = []
    for text in texts:
        out.extend(p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip())
    return out


def paragraph_dataset(texts: list[str], tokenizer: Any, max_len: int, *, max_examples: int | None = None,
                      max_total_tokens: int | None = None, min_tokens: int = 2):
    """One example per paragraph of ``texts`` (:func:`paragraphs`): its tokens plus EOS, cut at ``max_len``, with
    ``labels = input_ids`` and a ``length`` column; examples shorter than ``min_tokens`` are dropped. Stops after
    ``max_examples`` examples or once ``max_total_tokens`` tokens are collected."""
    from datasets import Dataset

    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}\n  fix: pass a positive --max-seq-len")
    eos = tokenizer.eos_token_id
    rows: list[list[int]] = []
    total = 0
    for p in paragraphs(texts):
        ids = tokenizer(p, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = ids[:max_len]
        if len(ids) < min_tokens:
            continue
        rows.append(ids)
        total += len(ids)
        if (max_examples is not None and len(rows) >= max_examples) or (
                max_total_tokens is not None and total >= max_total_tokens):
            break
    if not rows:
        raise ValueError("the corpus has no paragraph of at least "
                         f"{min_tokens} tokens\n  fix: pass texts with content, or lower min_tokens")
    return Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows],
                              "length": [len(r) for r in rows]})
