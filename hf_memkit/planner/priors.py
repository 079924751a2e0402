"""Quality and step-time priors of ``memkit plan``: the project's own measurements, kept in ``priors.yaml``.

Each entry is one row of a benchmark table (``benchmarks/bench_peak.py``) that ran one *family* of the search
space (:mod:`.space`: what trains, how weights are stored, which optimizer) with some exact toggles; the file
records the command, the date, the model, the workload and the machine. Nothing here is invented: a family
without a row has no prior, and the planner does not rank it (it says how many such candidates it skipped).

Expected quality of a candidate = the eval perplexity of its family's row (lower is better). Predicted step
time = that row's median step time, scaled by the tokens per optimizer step against the row's workload, and by
gradient checkpointing's recompute where the candidate and the row differ (×4/3 on, ×3/4 off: one more forward
of a step whose forward is about a third of its time; an assumption [ours], not a measurement). The other exact
toggles (CCE, gradient release) are taken as time-neutral, which the rows do not contradict.

Gradient release is part of the key a prior is found by, beside the family: under ``max_grad_norm`` (the
Trainer's default, 1.0, which ``memkit train`` and planned recipes keep) a released step clips each parameter's
gradient on its own (:mod:`hf_memkit.optimizer_slot.release`), so its result is not the plain step's. Measured
2026-12-07, full bf16 (stochastic rounding) + 8-bit AdamW + CCE + checkpointing, 40 steps: eval ppl 7.724 with
release, 7.542 without. A candidate with release is ranked only by a row that ran with release, and one without
by a row without.

Peaks: where a row recorded the estimator's prediction for its own run beside the measured peak, a family the
estimator under-predicted gets its predicted peaks scaled up by that ratio (:meth:`Prior.peak_factor`; measured:
the qlora family at 4 x 256 tokens). Over-predictions are left alone: the plan stays on the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRIORS_FILE = Path(__file__).with_name("priors.yaml")
GC_FACTOR = 4 / 3


@dataclass(frozen=True)
class Prior:
    family: tuple[str, str, str]
    row: str
    perplexity: float
    step_seconds: float
    peak_rss_mib: float | None
    toggles: frozenset
    tokens_per_step: int
    predicted_peak_mib: float | None = None  # the estimator's process peak for the row's run, where recorded

    def peak_factor(self) -> float:
        """How far the estimator under-predicted this family's measured peak (measured / predicted, at least 1):
        the planner scales the family's predicted peaks by it, so that a family the estimator does not model well
        is not planned into a budget it would exceed. 1 where the row recorded no prediction."""
        if not self.peak_rss_mib or not self.predicted_peak_mib:
            return 1.0
        return max(1.0, self.peak_rss_mib / self.predicted_peak_mib)

    def step_time(self, toggles: frozenset, tokens_per_step: int) -> float:
        t = self.step_seconds * tokens_per_step / max(self.tokens_per_step, 1)
        if "gc" in toggles and "gc" not in self.toggles:
            t *= GC_FACTOR
        elif "gc" not in toggles and "gc" in self.toggles:
            t /= GC_FACTOR
        return t


@dataclass
class Priors:
    source: dict[str, Any]
    rows: dict[tuple[tuple[str, str, str], bool], Prior]

    def get(self, family: tuple[str, str, str], release: bool = False) -> Prior | None:
        """The prior of ``family`` measured with (``release=True``) or without gradient release."""
        return self.rows.get((tuple(family), bool(release)))

    def provenance(self) -> str:
        s = self.source
        return (f"{s.get('command', '?')} ({s.get('model', '?')}, {s.get('workload', '?')}, "
                f"{s.get('date', '?')})")


def load_priors(path: "str | Path | None" = None) -> Priors:
    """Read the priors file (``yaml.safe_load``); a malformed file is a ValueError naming the entry."""
    import yaml

    path = Path(path) if path is not None else PRIORS_FILE
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("source"),
                                                                                              dict):
        raise ValueError(f"{path}: a priors file has `source:` (a mapping) and `rows:` (a list)")
    tokens = int(data["source"].get("tokens_per_step", 0))
    rows: dict[tuple[tuple[str, str, str], bool], Prior] = {}
    for i, r in enumerate(data["rows"]):
        try:
            fam = tuple(r["family"])
            if len(fam) != 3:
                raise ValueError("family has three parts: mode, precision, optimizer")
            prior = Prior(fam, str(r["row"]), float(r["eval_perplexity"]), float(r["step_seconds"]),
                          None if r.get("peak_rss_mib") is None else float(r["peak_rss_mib"]),
                          frozenset(r.get("toggles", ())), int(r.get("tokens_per_step", tokens)),
                          None if r.get("predicted_peak_mib") is None else float(r["predicted_peak_mib"]))
            rows[(fam, "release" in prior.toggles)] = prior
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: rows[{i}] is malformed ({exc}); each row needs family, row, "
                             "eval_perplexity and step_seconds") from exc
    return Priors(data["source"], rows)
