"""Collators for token-budget batches, and the padding/throughput accounting.

- :class:`PaddedCollator`: right-pads the batch to its longest sequence; ``attention_mask`` marks the real tokens
  and the padded ``labels`` are -100.
- :class:`PackedCollator`: transformers' ``DataCollatorWithFlattening`` concatenates the sequences into one row of
  shape ``[1, total]`` with ``position_ids`` restarting at 0 at every sequence and the label of each sequence's first
  token set to -100 (so no loss term predicts a sequence from the one before it). No ``attention_mask`` is returned:
  transformers' mask builders (``masking_utils.find_packed_sequence_indices``) then read the sequence boundaries from
  the ``position_ids`` and keep attention inside each sequence (sdpa, eager, flex; flash attention reads them too).
  That detection is skipped when the model runs with a KV cache (``use_cache=True``), so packed training needs
  ``use_cache=False`` (the Trainer's default); the tests check both.
- :class:`BatchStats`: real tokens, token slots (padding included) and seconds, fed one batch at a time by
  :meth:`BatchStats.add_batch`; it reports the padding fraction and tokens per second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def _ids(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _cut(features: Sequence[dict[str, Any]], max_length: int | None) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` (default: the input ids) of every example as lists, cut at ``max_length``."""
    out = []
    for f in features:
        ids = _ids(f["input_ids"])
        labels = _ids(f["labels"]) if f.get("labels") is not None else list(ids)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


class PaddedCollator:
    """Pads a batch to its longest sequence (right side): ``input_ids`` with ``pad_token_id``, ``labels`` with
    -100, ``attention_mask`` 1 on real tokens. ``max_length`` cuts longer sequences first (token budget with
    ``truncate=True``)."""

    def __init__(self, pad_token_id: int = 0, max_length: int | None = None, label_pad_token_id: int = -100):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.label_pad_token_id = label_pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = _cut(features, self.max_length)
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), self.label_pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[k, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[k, :n] = torch.tensor(r["labels"], dtype=torch.long)
            mask[k, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackedCollator:
    """Packs a batch into one row with transformers' ``DataCollatorWithFlattening`` (``input_ids``, ``labels``
    with -100 at every sequence start, ``position_ids`` restarting at every sequence; no ``attention_mask``).
    ``max_length`` cuts longer sequences first (token budget with ``truncate=True``)."""

    def __init__(self, max_length: int | None = None):
        from transformers import DataCollatorWithFlattening

        self.max_length = max_length
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.flatten(_cut(features, self.max_length), return_tensors="pt")


def make_collator(mode: str, pad_token_id: int | None = 0, max_length: int | None = None):
    """The collator of a token-budget ``mode``: :class:`PaddedCollator` or :class:`PackedCollator`."""
    if mode == "packed":
        return PackedCollator(max_length=max_length)
    if mode == "padded":
        return PaddedCollator(pad_token_id=0 if pad_token_id is None else pad_token_id, max_length=max_length)
    raise ValueError(f"unknown token-budget mode {mode!r}\n  fix: use 'padded' or 'packed'")


@dataclasses.dataclass
class BatchStats:
    """Running totals of the batches a run processed: ``real_tokens`` (tokens of the examples), ``slots`` (tokens
    the model computed on, padding included), ``seconds`` (time spent on them, added by the caller)."""

    real_tokens: int = 0
    slots: int = 0
    batches: int = 0
    seconds: float = 0.0

    def add(self, real_tokens: int, slots: int) -> None:
        self.real_tokens += int(real_tokens)
        self.slots += int(slots)
        self.batches += 1

    def add_batch(self, batch: dict[str, Any]) -> None:
        """Count one collated batch: slots are ``input_ids.numel()``, real tokens the ones its ``attention_mask``
        marks (all of them in a packed row or a batch without a mask)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        slots = int(ids.numel())
        self.add(int(mask.sum()) if mask is not None and mask.dim() == 2 else slots, slots)

    @property
    def padding_fraction(self) -> float:
        """The share of computed token slots that were padding."""
        return 1.0 - self.real_tokens / self.slots if self.slots else 0.0

    @property
    def tokens_per_second(self) -> float | None:
        """Real (non-padding) tokens per second of the timed work; None before any time was added."""
        return self.real_tokens / self.seconds if self.seconds > 0 else None

    def log_fields(self) -> dict[str, float]:
        """What a training log line gets: padding fraction, real tokens so far and real tokens/s."""
        out = {"padding_fraction": round(self.padding_fraction, 4), "real_tokens": self.real_tokens}
        if self.tokens_per_second is not None:
            out["tokens_per_second"] = round(self.tokens_per_second, 1)
        return out
