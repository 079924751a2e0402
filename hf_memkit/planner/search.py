"""The planner: every admissible candidate (:mod:`.space`) predicted with the estimator, ranked by its prior
(:mod:`.priors`), the best that fits the budget picked.

Ranking among the candidates whose predicted peak fits: lowest expected perplexity, then lowest predicted step
time, then lowest predicted peak, then the label (so ties break the same way on every machine). Candidates of a
family without a measured prior are not ranked (counted in ``Plan.unmeasured``). On ``cpu`` the budget is the
process peak (peak RSS: runtime + tensors + transients + allocator slack, :func:`predict_process_peak`); on
``cuda`` it is ``max_memory_allocated`` (tensors only; the CUDA context, ~0.3-0.5 GiB, is not in that number).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import MemkitError
from .priors import Prior, Priors, load_priors
from .space import Candidate, admissible, enumerate_candidates

MiB = 2**20
GiB = 2**30
_UNITS = {"b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MiB, "mb": 10**6, "mib": MiB, "g": GiB,
          "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: "str | int | float") -> int:
    """``"1GiB"``, ``"800MiB"``, ``"1.5 GiB"``, ``"2G"`` -> bytes. A unit is required for strings."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise MemkitError(f"the budget must be positive (got {text})")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise MemkitError(f"cannot read the memory size {text!r}: write a number and a unit, e.g. 1GiB, 800MiB, "
                          "1.5GiB (units: B, KiB, MiB, GiB, TiB; KB/MB/GB are powers of 1000)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise MemkitError(f"the budget must be positive (got {text!r})")
    return int(value)


@dataclass
class Scored:
    candidate: Candidate
    peak_bytes: int
    breakdown: dict[str, int]
    perplexity: float | None
    step_seconds: float | None
    prior_row: str | None
    fits: bool = False

    @property
    def label(self) -> str:
        return self.candidate.label

    def sort_key(self) -> tuple:
        return (self.perplexity if self.perplexity is not None else float("inf"),
                self.step_seconds if self.step_seconds is not None else float("inf"), self.peak_bytes, self.label)


@dataclass
class Plan:
    """What :func:`plan` found. ``recipe`` is the pick as a loaded :class:`~hf_memkit.recipe.Recipe` (``None`` when
    nothing fits); ``explain()`` is the table the CLI prints."""

    model: str
    budget_bytes: int
    device: str
    batch_size: int
    seq_len: int
    pick: Scored | None
    fitting: list[Scored]
    over: list[Scored]
    unmeasured: int
    refused: dict[str, str]
    priors: Priors
    suggestion: str = ""
    recipe: Any = None
    scored: list[Scored] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def training_args(self, scored: Scored | None = None) -> dict[str, Any]:
        """The batch flags ``scored`` (default: the pick) was planned for (``memkit train`` takes them as
        TrainingArguments flags)."""
        scored = scored or self.pick
        if scored is None:
            return {}
        c = scored.candidate
        return {"per_device_train_batch_size": c.micro_batch or self.batch_size,
                "gradient_accumulation_steps": c.accumulation}

    def explain(self, top: int = 8, nearest: int = 3) -> str:
        from .explain import explain

        return explain(self, top=top, nearest=nearest)


Estimator = Callable[[Candidate, int, int], tuple[int, dict[str, int]]]


def default_estimator(model: Any, device: str = "cpu") -> Estimator:
    """(candidate, per-device batch, seq_len) -> (predicted peak bytes, breakdown) from the project's estimator,
    for a ``memkit train`` process on this machine's allocator (runtime measured once, in a child started as
    ``memkit train`` starts: :mod:`.runtime`)."""
    from ..data.models import resolve_config
    from ..memory.estimate import estimate_memory, expected_allocator
    from .runtime import measure_runtime

    config = resolve_config(model)
    runtime = measure_runtime() if device == "cpu" else 0
    allocator = expected_allocator()

    def estimate(c: Candidate, batch: int, seq_len: int) -> tuple[int, dict[str, int]]:
        mem = estimate_memory(config, c.recipe(), batch_size=batch, seq_len=seq_len)
        peak = mem.predict_peak(runtime_bytes=runtime, allocator=allocator)
        if device == "cuda":
            return int(peak["device_peak_bytes"]), {"tensors": int(peak["device_peak_bytes"])}
        return int(peak["peak_bytes"]), {k: int(v) for k, v in peak["breakdown"].items()}

    return estimate


def _micro_batches(batch: int) -> list[tuple[int, int]]:
    """(per-device batch, accumulation) pairs with the same sequences per optimizer step: b, b/2, ..., 1."""
    out, m = [], batch
    while m >= 1:
        if batch % m == 0:
            out.append((m if m != batch else 0, batch // m))
        m //= 2
    return out


def plan(model: Any = "smollm2", budget: "str | int" = "1GiB", *, seq_len: int = 256, batch_size: int | None = None,
         tokens_per_step: int | None = None, device: str = "cpu", full_finetune: bool = False,
         adapter_ok: bool = True, priors: Priors | str | None = None, estimator: Estimator | None = None,
         candidates: list[Candidate] | None = None, config: Any = None,
         admit: Callable[[Candidate, Any], "str | None"] | None = None) -> Plan:
    """The best recipe expected to train ``model`` within ``budget`` (see the module docstring).

    ``batch_size`` x ``seq_len`` tokens per step (default batch 4), or ``tokens_per_step`` (a multiple of
    ``seq_len``): then the planner may also split the step into micro-batches with gradient accumulation.
    ``priors``, ``estimator``, ``candidates``, ``config`` and ``admit`` replace the real ones (tests)."""
    if device not in ("cpu", "cuda"):
        raise MemkitError(f"unknown device {device!r}: use cpu (the budget is peak RSS) or cuda "
                          "(max_memory_allocated)")
    if seq_len < 1:
        raise MemkitError(f"--seq-len must be at least 1 (got {seq_len})")
    if tokens_per_step is not None and batch_size is not None:
        raise MemkitError("give either --batch-size (with --seq-len) or --tokens-per-step, not both")
    split = tokens_per_step is not None
    if split:
        if tokens_per_step < seq_len or tokens_per_step % seq_len:
            raise MemkitError(f"--tokens-per-step {tokens_per_step} is not a multiple of --seq-len {seq_len}; use "
                              f"a multiple, e.g. {max(1, tokens_per_step // seq_len) * seq_len}")
        batch_size = tokens_per_step // seq_len
    batch_size = 4 if batch_size is None else batch_size
    if batch_size < 1:
        raise MemkitError(f"--batch-size must be at least 1 (got {batch_size})")
    budget_bytes = parse_size(budget)
    priors = priors if isinstance(priors, Priors) else load_priors(priors)
    if config is None and admit is None:
        from ..data.models import resolve_config

        config = resolve_config(model)
    admit = admit or admissible
    estimator = estimator or default_estimator(config if config is not None else model, device)
    if candidates is None:
        candidates = enumerate_candidates(full_finetune=full_finetune, adapter_ok=adapter_ok,
                                          micro_batches=_micro_batches(batch_size) if split else ((0, 1),))
    refused: dict[str, str] = {}
    scored: list[Scored] = []
    unmeasured = 0
    tokens = batch_size * seq_len
    for c in candidates:
        prior = priors.get(c.family, release="release" in c.toggles)
        if prior is None:  # not ranked whatever the loader says: no need to ask it
            unmeasured += 1
            continue
        why = admit(c, config)
        if why is not None:
            refused[c.label] = why
            continue
        micro = c.micro_batch or batch_size
        peak, breakdown = _planned_peak(estimator, prior, c, micro, seq_len)
        scored.append(Scored(c, peak, breakdown, prior.perplexity, prior.step_time(c.toggles, tokens),
                             prior.row, fits=peak <= budget_bytes))
    fitting = sorted((s for s in scored if s.fits), key=Scored.sort_key)
    over = sorted((s for s in scored if not s.fits), key=lambda s: (s.peak_bytes, s.sort_key()))
    pick = fitting[0] if fitting else None
    result = Plan(str(model), budget_bytes, device, batch_size, seq_len, pick,
                  fitting, over, unmeasured, refused, priors, scored=scored)
    if pick is not None:
        from ..recipe import load_recipe

        result.recipe = load_recipe(pick.candidate.recipe())
    else:
        result.suggestion = _what_it_would_take(result, estimator, batch_size, seq_len)
    return result


def _planned_peak(estimator: Estimator, prior: Prior, c: Candidate, batch: int, seq_len: int):
    """The estimator's peak for ``c``, scaled up by its family's measured under-prediction
    (:meth:`Prior.peak_factor`), with the added bytes in the breakdown as ``under_prediction_bytes``."""
    peak, breakdown = estimator(c, batch, seq_len)
    factor = prior.peak_factor()
    if factor > 1.0:
        scaled = int(peak * factor)
        breakdown = {**breakdown, "under_prediction_bytes": scaled - peak}
        peak = scaled
    return peak, breakdown


def _what_it_would_take(p: Plan, estimator: Estimator, batch: int, seq_len: int) -> str:
    """For a budget nothing fits: the smallest predicted peak, and the largest smaller workloads under which the
    leanest candidate would fit."""
    if not p.over:
        return "no candidate could be estimated (every combination was refused or has no measured prior)"
    lean = p.over[0]
    lines = [f"the smallest predicted peak is {lean.peak_bytes / MiB:,.0f} MiB ({lean.label}), "
             f"{(lean.peak_bytes - p.budget_bytes) / MiB:,.0f} MiB over the budget"]
    c = lean.candidate
    prior = p.priors.get(c.family, release="release" in c.toggles)
    for b in sorted({batch, *(x for x in (1, 2, 4, 8) if x < batch)}, reverse=True):
        s = seq_len
        while s >= 16:
            peak, _ = _planned_peak(estimator, prior, c, b, s)
            if peak <= p.budget_bytes:
                if (b, s) != (batch, seq_len):
                    lines.append(f"it would fit with batch {b} x {s} tokens ({peak / MiB:,.0f} MiB predicted)")
                break
            s //= 2
        else:
            continue
        break
    else:
        lines.append("no shorter sequence or smaller batch brings it within the budget: the fixed part (runtime "
                     "and weights) alone is larger")
    lines.append(f"or a machine with at least {lean.peak_bytes / GiB:.2f} GiB for this workload")
    return "; ".join(lines)
