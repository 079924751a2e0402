"""Token-budget batching for any ``transformers.Trainer`` (stock, ``MemkitTrainer``, TRL), independent of recipes.

```python
from hf_memkit.integrations.token_budget import TokenBudgetTrainer, enable_token_budget

trainer = TokenBudgetTrainer(model=model, args=args, train_dataset=ds, max_tokens=4096, packing=True)
# or, for a Trainer you already built:
run = enable_token_budget(trainer, max_tokens=4096, packing=False)
trainer.train()            # logs padding_fraction, real_tokens, tokens_per_second; run.stats holds the totals
```

Like the recipe wiring (:mod:`hf_memkit.integrations.trainer`), this replaces methods *on the trainer instance*:

- ``get_train_dataloader``: a ``DataLoader`` over the train dataset with a
  :class:`~hf_memkit.data.token_batching.TokenBudgetBatchSampler` (seed: ``data_seed``, else ``seed``; ranks:
  ``world_size``/``process_index``) and the mode's collator (the trainer's ``data_collator`` is not used for
  training; evaluation keeps it). The sampler is already rank-aware, so the ``BatchSamplerShard`` that
  ``accelerator.prepare`` wraps around it is made a pass-through, as transformers does for its own
  ``BatchRebalanceSampler``; the Trainer calls its ``set_epoch``.
- ``training_step``: counts each micro-batch into the run's :class:`~hf_memkit.data.token_collate.BatchStats`
  in the main process (so it works with dataloader workers too).
- ``log``: training log lines and the final train metrics get ``padding_fraction`` (padded slots over all slots),
  ``real_tokens`` and ``tokens_per_second`` (real tokens over the seconds spent inside optimizer steps, timed from
  ``on_step_begin`` to ``on_step_end``: forward, backward and optimizer, without data loading or evaluation). On
  several ranks each rank counts its own batches; the log shows rank 0's.

``per_device_train_batch_size`` no longer sets the batch: ``max_tokens`` does. Packed batches need
``use_cache=False`` (the TrainingArguments default): with a cache, transformers does not read sequence boundaries
from ``position_ids`` and attention would cross them, so that combination is refused.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from transformers import Trainer, TrainerCallback

from ..data.token_batching import BatchStats, TokenBudgetBatchSampler, dataset_lengths, make_collator


@dataclasses.dataclass
class TokenBudgetRun:
    """The token-budget settings of one trainer, its sampler (once the train dataloader is built) and its stats."""

    max_tokens: int
    mode: str = "padded"
    truncate: bool = False
    seed: int | None = None
    stats: BatchStats = dataclasses.field(default_factory=BatchStats)
    sampler: TokenBudgetBatchSampler | None = None

    def dataloader(self, trainer: Any):
        """The train ``DataLoader`` of ``trainer`` with this run's sampler and collator, prepared by accelerate."""
        import torch
        from torch.utils.data import DataLoader

        ds = trainer.train_dataset
        if ds is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(ds, torch.utils.data.IterableDataset):
            raise ValueError("token-budget batching needs a dataset with a length and per-example lengths, got an "
                             "IterableDataset\n  fix: materialise the dataset (datasets.Dataset) or train without "
                             "a token budget")
        args = trainer.args
        seed = self.seed if self.seed is not None else (args.data_seed if args.data_seed is not None else args.seed)
        world = max(1, int(args.world_size))
        self.sampler = TokenBudgetBatchSampler(dataset_lengths(ds), self.max_tokens, mode=self.mode, seed=seed,
                                               num_replicas=world, rank=args.process_index if world > 1 else 0,
                                               truncate=self.truncate)
        tok = trainer.processing_class
        pad = getattr(tok, "pad_token_id", None)
        pad = getattr(tok, "eos_token_id", None) if pad is None else pad
        collator = make_collator(self.mode, pad, max_length=self.max_tokens if self.truncate else None)
        workers = args.dataloader_num_workers
        params: dict[str, Any] = {"batch_sampler": self.sampler, "collate_fn": collator, "num_workers": workers,
                                  "pin_memory": args.dataloader_pin_memory}
        if workers > 0:
            params.update(persistent_workers=args.dataloader_persistent_workers,
                          prefetch_factor=args.dataloader_prefetch_factor)
        loader = trainer.accelerator.prepare(DataLoader(ds, **params))
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is self.sampler:
            shard.num_processes, shard.process_index = 1, 0  # already one rank's batches: no second sharding
        return loader


class _StepTimer(TrainerCallback):
    """Adds the seconds from ``on_step_begin`` to ``on_step_end`` (one optimizer step) to the stats."""

    def __init__(self, stats: BatchStats):
        self.stats = stats
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.stats.seconds += time.perf_counter() - self._t0
            self._t0 = None


def enable_token_budget(trainer: Any, max_tokens: int, *, packing: bool = False, truncate: bool = False,
                        seed: int | None = None) -> TokenBudgetRun:
    """Switch ``trainer``'s training batches to token-budget batches of at most ``max_tokens`` tokens (padded, or
    packed into one row with ``packing=True``); returns the run's :class:`TokenBudgetRun` (also
    ``trainer.memkit_token_budget``). ``truncate`` cuts sequences longer than the budget instead of refusing them.
    Call it before ``trainer.train()``."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}\n"
                         "  fix: pass the token budget of one batch, e.g. max_tokens=4096")
    if getattr(trainer, "memkit_token_budget", None) is not None:
        raise ValueError("token-budget batching is already enabled on this trainer\n"
                         "  fix: call enable_token_budget once per trainer")
    if packing and getattr(trainer.args, "use_cache", False):
        raise ValueError("packed batches need use_cache=False: with a KV cache transformers does not detect the "
                         "packed sequences and attention would cross their boundaries\n"
                         "  fix: --use_cache false (the default), or padded batches (packing=False)")
    run = TokenBudgetRun(max_tokens=max_tokens, mode="packed" if packing else "padded", truncate=truncate,
                         seed=seed)
    inner_step, inner_log = trainer.training_step, trainer.log

    def training_step(model, inputs, *args, **kwargs):
        run.stats.add_batch(inputs)
        return inner_step(model, inputs, *args, **kwargs)

    def log(logs, *args, **kwargs):
        if "loss" in logs or "train_runtime" in logs:
            logs.update(run.stats.log_fields())
        return inner_log(logs, *args, **kwargs)

    trainer.get_train_dataloader = lambda: run.dataloader(trainer)
    trainer.training_step = training_step
    trainer.log = log
    trainer.add_callback(_StepTimer(run.stats))
    trainer.memkit_token_budget = run
    return run


class TokenBudgetTrainer(Trainer):
    """A ``transformers.Trainer`` whose training batches hold at most ``max_tokens`` tokens (see
    :func:`enable_token_budget`): ``TokenBudgetTrainer(model=..., args=..., train_dataset=ds, max_tokens=4096,
    packing=False, truncate=False)``."""

    def __init__(self, *args: Any, max_tokens: int, packing: bool = False, truncate: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token_budget = enable_token_budget(self, max_tokens, packing=packing, truncate=truncate)
