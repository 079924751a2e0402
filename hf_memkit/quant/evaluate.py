"""Perplexity on the embedded corpus's eval split: the number the model card, ``memkit compress`` and the
benchmark report (the same blocks ``memkit train`` evaluates on: topic-disjoint from the calibration text)."""

from __future__ import annotations

import math
from typing import Any

EVAL_SEQ_LEN = 256
EVAL_BLOCKS = 24


def eval_blocks(tokenizer: Any, seq_len: int = EVAL_SEQ_LEN, max_blocks: int = EVAL_BLOCKS) -> list[list[int]]:
    from ..data.corpus import block_dataset, split_topics

    _, evals = split_topics()
    return [list(b) for b in block_dataset(evals, tokenizer, seq_len, max_blocks=max_blocks)["input_ids"]]


def corpus_perplexity(model: Any, tokenizer: Any = None, *, blocks: list[list[int]] | None = None,
                      seq_len: int = EVAL_SEQ_LEN, max_blocks: int = EVAL_BLOCKS, batch_size: int = 8) -> float:
    """exp(mean token cross-entropy) over the eval blocks (equal-length blocks, so the mean over blocks is the
    token mean)."""
    import torch

    if blocks is None:
        blocks = eval_blocks(tokenizer, seq_len, max_blocks)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(blocks), batch_size):
                ids = torch.tensor(blocks[i:i + batch_size], dtype=torch.long, device=device)
                loss = model(input_ids=ids, labels=ids).loss
                total += float(loss) * ids.shape[0]
                count += ids.shape[0]
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 50 else float("inf")
