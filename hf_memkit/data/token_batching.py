"""Token-budget batching: batches formed from a budget of tokens instead of a fixed number of sequences.

A fixed number of sequences per batch makes the cost of a step follow the lengths it happens to draw: on a corpus
whose lengths run from a few tokens to thousands, one batch is mostly padding and the next one holds the longest
sequences and sets the run's peak memory. :class:`TokenBudgetBatchSampler` instead gives every batch at most
``max_tokens`` tokens and fills it close to that:

- ``mode="padded"``: the budget counts padded slots, ``len(batch) * longest``. Sequences are sorted by length
  (ties in a random order) and cut greedily into runs, so the sequences of a batch have similar lengths and little
  padding (:class:`~hf_memkit.data.token_collate.PaddedCollator` pads them to the batch's longest).
- ``mode="packed"``: the budget counts the tokens of the one packed row, ``sum(lengths)``. Sequences are placed by
  best-fit decreasing (the first-fit-decreasing family of bin packing: longest first, each into the fullest batch
  it still fits, else into a new one) (:class:`~hf_memkit.data.token_collate.PackedCollator` concatenates them).

The batches are shuffled with ``seed`` and the epoch (:meth:`TokenBudgetBatchSampler.set_epoch`): the same seed and
epoch give the same batches on every run and every rank, without communication. The number of batches depends
only on the lengths, so ``len()`` is the same in every epoch.

Across ranks (``num_replicas > 1``) every rank gets the same number of batches and, step by step, batches with
similar token counts. This is the single-node form of the data-aware balancing of "ByteScale: Efficient Scaling of
LLM Training with a 2048K Context Length on More Than 12,000 GPUs" (Ge et al., 2025). Taken from the paper: with
long-tailed lengths, balance the *data* rather than the system, i.e. decide which sequences share a micro-batch and
which rank gets which micro-batch from the sequence lengths, so that ranks that synchronise at every step do similar
work (the batches are sorted by cost, grouped ``num_replicas`` at a time, and each group's largest batch goes to the
rank with the fewest tokens so far). Not reproduced: its cost model (attention FLOPs, quadratic in length; here the
cost is tokens), its data-aware sharding across context-parallel ranks, its communication optimiser and its
pipeline-aware micro-batch schedule; none of its formulas are used.

Why not ``transformers.trainer_pt_utils.BatchRebalanceSampler``: it balances a fixed number of *sequences* per
optimizer step; here the unit of a batch is a number of tokens.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

from .token_collate import BatchStats, PackedCollator, PaddedCollator, make_collator  # part of this API

MODES = ("padded", "packed")


class SequenceTooLongError(ValueError):
    """A sequence is longer than the token budget and ``truncate`` is off."""


def batch_cost(lengths: Sequence[int], mode: str) -> int:
    """The tokens a batch of sequences of ``lengths`` occupies: padded slots (``len * max``) or the packed row's
    length (``sum``)."""
    if not lengths:
        return 0
    return len(lengths) * max(lengths) if mode == "padded" else sum(lengths)


def _check_lengths(lengths: Sequence[int], max_tokens: int, truncate: bool) -> list[int]:
    """The lengths as ints, capped at ``max_tokens`` when ``truncate``; a clear error for a bad length."""
    out = []
    for i, n in enumerate(lengths):
        n = int(n)
        if n < 1:
            raise ValueError(f"example {i} has {n} tokens; token-budget batching needs at least 1 token per "
                             "example\n  fix: filter out empty examples before training")
        out.append(n)
    longest = max(out)
    if longest > max_tokens and not truncate:
        over = [i for i, n in enumerate(out) if n > max_tokens]
        raise SequenceTooLongError(
            f"{len(over)} example(s) are longer than the token budget max_tokens={max_tokens} (the longest, example "
            f"{out.index(longest)}, has {longest} tokens), so no batch can hold them\n"
            f"  fix: raise max_tokens (--token-budget) to at least {longest}, truncate the examples (e.g. "
            "--max-seq-len or the tokenizer's max_length), or pass truncate=True to cut them at the budget")
    return [min(n, max_tokens) for n in out]


def plan_padded(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """``order`` sorted by decreasing length, cut greedily: a batch grows while ``(size + 1) * longest`` fits."""
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def plan_packed(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing over ``order`` (already sorted by decreasing length): each sequence goes into the open
    batch with the least room that still holds it, else opens a new batch. O(n log n) lookups."""
    batches: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, batch id), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
            batches[b].append(i)
            free -= n
        else:
            b = len(batches)
            batches.append([i])
            free = max_tokens - n
        if free > 0:
            bisect.insort(room, (free, b))
    return batches


def _split_until_divisible(batches: list[list[int]], num_replicas: int, cost) -> list[list[int]]:
    """Split the costliest multi-sequence batches in two until every rank can get the same number of batches; if
    only single-sequence batches are left, repeat the cheapest ones (as ``DistributedSampler`` pads)."""
    batches = list(batches)
    while len(batches) % num_replicas:
        multi = [k for k, b in enumerate(batches) if len(b) > 1]
        if not multi:
            need = num_replicas - len(batches) % num_replicas
            cheap = sorted(batches, key=cost)
            batches.extend(list(cheap[k % len(cheap)]) for k in range(need))
            break
        big = batches.pop(max(multi, key=lambda k: cost(batches[k])))
        batches.extend([big[::2], big[1::2]])  # both halves fit: neither is longer nor holds more
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices with at most ``max_tokens`` tokens each (see the module docstring).

    Args:
        lengths: the token count of every example (``len(dataset[i]["input_ids"])``).
        max_tokens: the token budget of one batch (padded slots in ``padded`` mode, the row length in ``packed``).
        mode: ``"padded"`` or ``"packed"``.
        shuffle: shuffle the order of the batches (and of equal-length sequences) every epoch.
        seed: the shuffle's seed; with :meth:`set_epoch` it fixes the batches completely.
        num_replicas, rank: the data-parallel ranks; default from ``torch.distributed`` when it is initialised,
            else 1 and 0. Every rank yields ``len(self)`` batches; together they use every index once per epoch
            (an index is repeated only when every batch holds one sequence and the count does not divide).
        truncate: plan a sequence longer than the budget as ``max_tokens`` long (the collators' ``max_length``
            must cut it there) instead of raising :class:`SequenceTooLongError`.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, mode: str = "padded", shuffle: bool = True,
                 seed: int = 0, num_replicas: int | None = None, rank: int | None = None, truncate: bool = False):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}\n"
                             "  fix: pass the token budget of one batch, e.g. max_tokens=4096")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}\n"
                             "  fix: mode='padded' (pad to the batch's longest) or mode='packed' (one row)")
        if len(lengths) == 0:
            raise ValueError("the dataset is empty: there is nothing to batch\n  fix: pass a non-empty dataset")
        if num_replicas is None or rank is None:
            dist_replicas, dist_rank = _dist_defaults()
            num_replicas = dist_replicas if num_replicas is None else num_replicas
            rank = dist_rank if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})\n"
                             "  fix: pass 0 <= rank < num_replicas (or leave both to torch.distributed)")
        self.lengths = _check_lengths(lengths, max_tokens, truncate)
        self.max_tokens = max_tokens
        self.mode = mode
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.truncate = truncate
        self.epoch = 0
        self._cache: tuple[int, list[list[list[int]]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` from the next iteration on (the Trainer calls it every epoch)."""
        self.epoch = int(epoch)

    def cost(self, batch: Sequence[int]) -> int:
        """Tokens the batch occupies under this sampler's mode (padded slots, or the packed row's length)."""
        return batch_cost([self.lengths[i] for i in batch], self.mode)

    def plan(self) -> list[list[list[int]]]:
        """This epoch's batches of every rank: ``plan()[step][rank]``, the same on every rank."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = random.Random(f"memkit-token-budget:{self.seed}:{self.epoch}")  # str seeds hash the same everywhere
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        order.sort(key=lambda i: -self.lengths[i])  # stable: equal lengths stay in the shuffled order
        plan_fn = plan_padded if self.mode == "padded" else plan_packed
        batches = plan_fn(order, self.lengths, self.max_tokens)
        steps = self._assign(batches, rng)
        self._cache = (self.epoch, steps)
        return steps

    def _assign(self, batches: list[list[int]], rng: random.Random) -> list[list[list[int]]]:
        """Group the batches into steps of ``num_replicas`` batches of similar cost, shuffle the steps, and give
        each step's costliest batch to the rank with the fewest tokens so far."""
        n = self.num_replicas
        if n == 1:
            steps = [[b] for b in batches]
            if self.shuffle:
                rng.shuffle(steps)
            return steps
        batches = _split_until_divisible(batches, n, self.cost)
        batches.sort(key=self.cost, reverse=True)
        groups = [batches[k:k + n] for k in range(0, len(batches), n)]
        if self.shuffle:
            rng.shuffle(groups)
        totals = [0] * n
        steps = []
        for group in groups:
            step: list[list[int]] = [[] for _ in range(n)]
            for b in group:  # costliest first (the group is sorted)
                r = min((r for r in range(n) if not step[r]), key=lambda r: (totals[r], r))
                step[r] = b
                totals[r] += self.cost(b)
            steps.append(step)
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.plan():
            yield list(step[self.rank])

    def __len__(self) -> int:
        return len(self.plan())

    def summary(self) -> dict[str, Any]:
        """Numbers of this epoch's plan over all ranks: batches, mean/max tokens per batch, fill of the budget."""
        costs = [self.cost(b) for step in self.plan() for b in step]
        real = [sum(self.lengths[i] for i in b) for step in self.plan() for b in step]
        return {"batches_per_rank": len(self), "mean_tokens": sum(costs) / len(costs), "max_tokens": max(costs),
                "fill": sum(costs) / (len(costs) * self.max_tokens),
                "padding_fraction": 1 - sum(real) / sum(costs)}


def _dist_defaults() -> tuple[int, int]:
    """(world size, rank) from ``torch.distributed`` when it is initialised, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def dataset_lengths(dataset: Any, column: str = "input_ids", length_column: str = "length") -> list[int]:
    """Per-example token counts of ``dataset``: its ``length`` column if it has one, else ``len`` of each
    example's ``input_ids`` (a ``datasets.Dataset`` column is read in one go)."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if length_column in names:
            return [int(n) for n in dataset[length_column]]
        if column in names:
            return [len(x) for x in dataset[column]]
    try:
        return [len(dataset[i][column]) for i in range(len(dataset))]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"cannot read the lengths of the examples: they have no {column!r}\n"
                         f"  fix: give every example an {column!r} list (tokenized text) or a {length_column!r} "
                         "column") from None


__all__ = ["TokenBudgetBatchSampler", "SequenceTooLongError", "PaddedCollator", "PackedCollator", "BatchStats",
           "make_collator", "dataset_lengths", "batch_cost", "plan_padded", "plan_packed", "MODES"]
