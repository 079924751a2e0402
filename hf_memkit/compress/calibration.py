"""Calibration text for the passes that look at activations (GPTQ's Hessians, Block-AP's block targets).

Two sources: the run's training data (the Trainer's dataloader, captured by a callback) or the embedded corpus
(:mod:`hf_memkit.data.corpus`, train split, tokenized with the model's tokenizer and cut into random windows of
``seq_len`` tokens with a fixed seed, as the GPTQ reference samples C4).
"""

from __future__ import annotations

from collections.abc import Mapping

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: sequences per forward pass during calibration (memory of one pass: batch × seq_len × hidden)
CALIBRATION_BATCH = 8


@dataclass
class CalibrationData:
    batches: list[dict[str, "torch.Tensor"]] = field(default_factory=list)
    source: str = ""

    @property
    def num_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        return sum(int(b["input_ids"].numel()) for b in self.batches)

    def describe(self) -> str:
        if not self.batches:
            return "no calibration data"
        seq = int(self.batches[0]["input_ids"].shape[1])
        return f"{self.num_samples} sequences x {seq} tokens from {self.source}"


def _group(rows: list["torch.Tensor"], masks: list["torch.Tensor"] | None, batch: int) -> list[dict]:
    import torch

    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        same = all(r.shape == chunk[0].shape for r in chunk)
        if not same:  # ragged rows (unpadded datasets): one sequence per batch
            out.extend({"input_ids": r.unsqueeze(0)} for r in chunk)
            continue
        b = {"input_ids": torch.stack(chunk)}
        if masks is not None:
            b["attention_mask"] = torch.stack(masks[i:i + batch])
        out.append(b)
    return out


def from_batches(batches: Iterable[dict], num_samples: int, seq_len: int, source: str) -> CalibrationData:
    """Up to ``num_samples`` rows (each cut to ``seq_len`` tokens) from batches with ``input_ids``."""
    import torch

    rows: list[torch.Tensor] = []
    masks: list[torch.Tensor] | None = []
    for batch in batches:
        # a collator's BatchEncoding is a Mapping, not a dict
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if ids is None:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise IncompatibleModelError(
                f"the calibration batches from {source} have no `input_ids` (keys: {keys}); "
                "calibrate on the embedded corpus instead (calibration: corpus)"
            )
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        mask = batch.get("attention_mask")
        for i in range(ids.shape[0]):
            rows.append(ids[i, :seq_len].detach().cpu().clone())
            if masks is not None and mask is not None:
                masks.append(torch.as_tensor(mask)[i, :seq_len].detach().cpu().clone())
            else:
                masks = None
            if len(rows) >= num_samples:
                break
        if len(rows) >= num_samples:
            break
    return CalibrationData(_group(rows, masks, CALIBRATION_BATCH), source)


def corpus_token_ids(tokenizer: Any, texts: list[str], max_tokens: int | None = None) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return ids


def from_corpus(tokenizer: Any, num_samples: int, seq_len: int, *, seed: int = 0,
                split: str = "train") -> CalibrationData:
    """``num_samples`` random windows of ``seq_len`` tokens from the embedded corpus (seeded, reproducible)."""
    import torch

    from ..data.corpus import split_topics

    train, evals = split_topics()
    texts = train if split == "train" else evals
    # enough text for distinct windows, without tokenizing the whole corpus for a handful of samples
    ids = corpus_token_ids(tokenizer, texts, max_tokens=max(4 * num_samples * seq_len, 8 * seq_len))
    if len(ids) <= seq_len:
        raise IncompatibleModelError(
            f"the embedded corpus gives only {len(ids)} tokens with this tokenizer, fewer than seq_len={seq_len}; "
            "lower seq_len"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(num_samples)]
    rows = [torch.tensor(ids[s:s + seq_len], dtype=torch.long) for s in starts]
    return CalibrationData(_group(rows, None, CALIBRATION_BATCH), f"the embedded corpus ({split} split)")


def tokenizer_for(model: Any) -> Any:
    """The tokenizer saved beside the model's weights, or None (it is never downloaded)."""
    import os

    for path in (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if path and os.path.isdir(str(path)):
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path))
            except Exception:  # no tokenizer files in that folder
                continue
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok
    return None


def resolve(source: str, *, key: str, num_samples: int, seq_len: int, batches: Iterable[dict] | None = None,
            tokenizer: Any = None, model: Any = None) -> CalibrationData:
    """Calibration data for ``source`` (auto | train | corpus), or a clear error naming what is missing."""
    if source in ("auto", "train") and batches is not None:
        data = from_batches(batches, num_samples, seq_len, "the training data")
        if data.num_samples:
            return data
        if source == "train":
            raise IncompatibleModelError(f"{key}: the training data is empty, so there is nothing to calibrate on; "
                                         "use calibration: corpus")
    if source == "train":
        raise IncompatibleModelError(
            f"{key}: calibration: train needs the run's training data, and there is none here (memkit compress and "
            "passes that run before training have no dataset); use calibration: corpus or auto"
        )
    tok = tokenizer if tokenizer is not None else (tokenizer_for(model) if model is not None else None)
    if tok is None:
        raise IncompatibleModelError(
            f"{key}: no calibration data: there is no training data and no tokenizer to read the embedded corpus "
            "with (none was given and none is saved beside the model). Pass processing_class=tokenizer to the "
            "Trainer, load the model from a folder that has its tokenizer, or pass calibration data explicitly"
        )
    return from_corpus(tok, num_samples, seq_len)
