"""The explanation ``memkit plan`` prints: the pick, the candidates that fit, the nearest that do not."""

from __future__ import annotations

from typing import Any

MiB = 2**20


def _row(s: Any, mark: str = "") -> str:
    ppl = "-" if s.perplexity is None else f"{s.perplexity:.3f}"
    t = "-" if s.step_seconds is None else f"{s.step_seconds:.2f}"
    return f"| {mark}{s.label} | {s.peak_bytes / MiB:,.0f} | {t} | {ppl} | {s.prior_row or '-'} |"


def explain(p: Any, top: int = 8, nearest: int = 3) -> str:
    what = "peak RSS" if p.device == "cpu" else "max_memory_allocated"
    lines = [f"memkit plan: {p.model}, {p.batch_size} x {p.seq_len} tokens per step, budget "
             f"{p.budget_bytes / MiB:,.0f} MiB of {what} ({p.device})"]
    head = f"| candidate | predicted peak MiB | predicted s/step | expected eval ppl | prior row |\n|---|---|---|---|---|"
    if p.pick is not None:
        lines.append(f"pick: {p.pick.label}  (predicted {p.pick.peak_bytes / MiB:,.0f} MiB, expected eval ppl "
                     f"{p.pick.perplexity:.3f})")
        lines.append(f"fits ({len(p.fitting)}; best first, {min(top, len(p.fitting))} shown):")
        lines.append(head)
        lines.extend(_row(s, "* " if s is p.pick else "") for s in p.fitting[:top])
    else:
        lines.append("nothing fits: " + p.suggestion)
    if p.over:
        lines.append(f"nearest that do not fit ({min(nearest, len(p.over))} of {len(p.over)}):")
        lines.append(head)
        lines.extend(_row(s) for s in p.over[:nearest])
    lines.append(f"expected quality: eval perplexity measured for the candidate's family (what trains, weight "
                 f"storage, optimizer) by {p.priors.provenance()}; CCE, gradient checkpointing and gradient release "
                 "keep it (equality-tested). Step time: the same row's, scaled (see hf_memkit/plan/priors.py).")
    notes = []
    if p.unmeasured:
        notes.append(f"{p.unmeasured} candidates of families without a measured prior were not ranked")
    if p.refused:
        first = next(iter(p.refused.items()))
        notes.append(f"{len(p.refused)} combinations refused by the recipe loader (e.g. {first[0]}: {first[1]})")
    if p.device == "cuda":
        notes.append("the CUDA context (~0.3-0.5 GiB) is outside max_memory_allocated")
    if notes:
        lines.append("; ".join(notes))
    return "\n".join(lines)
