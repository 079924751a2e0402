"""Rendering of memory reports: one-screen tables and PNG charts (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any

#: the categories both sides have, in display order
MEASURED = ("weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")
SKIP = {"total_bytes", "inputs", "terms", "timeline", "peak_rss_bytes", "cuda_max_allocated_bytes",
        "median_step_seconds", "process", "predicted_peak", "host_offload"}
MIB = 2**20


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def categories(d: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in d.items() if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


def comparable_total(d: dict[str, Any]) -> int:
    return sum(d.get(k, 0) for k in MEASURED)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Category | estimate | measured | error, then the estimate-only (transient) terms and peaks."""
    est, meas = report["estimate"], report["measured"]
    lines = [f"  {'memory (MiB)':<34}{'estimate':>10}{'measured':>10}{'error':>9}"]
    for cat in MEASURED:
        e, m = est.get(cat, 0), meas.get(cat, 0)
        if not e and not m:
            continue
        err = f"{(e - m) / m * 100:+.1f}%" if m else "n/a"
        lines.append(f"  {cat:<34}{e / MIB:>10.2f}{m / MIB:>10.2f}{err:>9}")
    e_tot, m_tot = comparable_total(est), comparable_total(meas)
    err = f"{(e_tot - m_tot) / m_tot * 100:+.1f}%" if m_tot else "n/a"
    lines.append(f"  {'total (tensors)':<34}{e_tot / MIB:>10.2f}{m_tot / MIB:>10.2f}{err:>9}")
    for cat, b in categories(est).items():
        if cat not in MEASURED:
            lines.append(f"  {cat + ' (transient)':<34}{b / MIB:>10.2f}{'-':>10}")
    proc = meas.get("process") if isinstance(meas.get("process"), dict) else None
    pred = est.get("predicted_peak") if isinstance(est.get("predicted_peak"), dict) else None
    if (proc and "breakdown" in proc) or pred:
        lines.extend(process_lines(proc or {}, pred or {}, meas.get("peak_rss_bytes")))
    elif "peak_rss_bytes" in meas:
        lines.append(f"  {'peak RSS (process)':<34}{'':>10}{meas['peak_rss_bytes'] / MIB:>10.0f}")
    if "cuda_max_allocated_bytes" in meas or (pred and est.get("inputs", {}).get("device") == "cuda"):
        p = f"{pred['device_peak_bytes'] / MIB:>10.0f}" if pred else f"{'':>10}"
        m = meas.get("cuda_max_allocated_bytes")
        lines.append(f"  {'CUDA max allocated':<34}{p}{(m / MIB if m else 0):>10.0f}")
    return lines


#: rows of the process peak table: breakdown key -> label
PROCESS_ROWS = {"runtime": "runtime (before the model)", "weights": "weights", "adapter_weights": "adapter_weights",
                "optimizer_states": "optimizer_states", "gradients": "gradients (at the peak)",
                "activations": "activations (at the peak)", "logits": "logits (at the peak)",
                "transients": "transients (at the peak)", "slack": "allocator slack",
                "unaccounted": "unaccounted / run overhead"}


def process_lines(proc: dict[str, Any], pred: dict[str, Any], peak: int | None = None) -> list[str]:
    """The process peak split, predicted beside measured (``memory/profiler.py: process_breakdown`` and
    ``memory/estimate.py: predict_process_peak``)."""
    meas_b, pred_b = proc.get("breakdown") or {}, pred.get("breakdown") or {}
    alloc = (proc.get("allocator") or {}).get("kind") or pred.get("allocator") or ""
    lines = [f"  {'process peak (MiB)':<34}{'predicted':>10}{'measured':>10}"]
    keys = list(PROCESS_ROWS) + [k for k in {**pred_b, **meas_b} if k not in PROCESS_ROWS]
    for k in keys:
        if k not in meas_b and k not in pred_b:
            continue
        label = PROCESS_ROWS.get(k, k) + (f" ({alloc})" if k == "slack" and alloc else "")
        p = f"{pred_b[k] / MIB:>10.1f}" if k in pred_b else f"{'-':>10}"
        m = f"{meas_b[k] / MIB:>10.1f}" if k in meas_b else f"{'-':>10}"
        lines.append(f"  {label:<34}{p}{m}")
    measured = proc.get("peak_rss_bytes", peak)
    predicted = pred.get("peak_bytes")
    err = f"{(predicted - measured) / measured * 100:+.1f}%" if predicted and measured else ""
    lines.append(f"  {'peak RSS (process)':<34}"
                 + (f"{predicted / MIB:>10.0f}" if predicted else f"{'-':>10}")
                 + (f"{measured / MIB:>10.0f}" if measured else f"{'-':>10}") + f"{err:>9}")
    if pred.get("phase") or proc.get("peak_phase"):
        step = (proc.get("peak_step") or {}).get("peak_phase")
        lines.append(f"  {'peak phase':<34}{pred.get('phase', '-'):>10}{proc.get('peak_phase') or '-':>10}"
                     + (f"  (tensors in the profiled step: {step})" if step else ""))
    if proc.get("unaccounted_fraction") is not None:
        lines.append(f"  {'unaccounted share of the peak':<34}{'':>10}{proc['unaccounted_fraction'] * 100:>9.1f}%")
    return lines


def _save(fig: Any, path: str, **kwargs: Any) -> None:
    """A chart is complete or absent (written to a temporary sibling, then renamed)."""
    from ..atomic import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format=os.path.splitext(path)[1].lstrip(".").lower() or "png", **kwargs)


def plot_estimate(estimate: dict[str, Any], path: str, title: str = "memory estimate") -> str:
    plt = _plt()
    cats = {k: v for k, v in categories(estimate).items() if v > 0}
    fig, ax = plt.subplots(figsize=(4.5, 5))
    bottom = 0.0
    for name, nbytes in cats.items():
        ax.bar(["estimate"], [nbytes / MIB], bottom=bottom, label=f"{name} ({nbytes / MIB:.1f} MiB)")
        bottom += nbytes / MIB
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path, bbox_inches="tight")
    plt.close(fig)
    return path


#: band colours of the phases on the timelines
PHASE_COLORS = {"load": "#c7c7c7", "build": "#9edae5", "eval": "#ffbb78", "train": "#dbdb8d", "forward": "#98df8a",
                "backward": "#ff9896", "optimizer": "#c5b0d5", "save": "#c49c94", "start": "#f7f7f7",
                "profile": "#7f7f7f"}


def _bands(ax: Any, spans: list[dict[str, Any]], t0: float = 0.0, scale: float = 1.0, key: str = "") -> None:
    seen: set[str] = set()
    for sp in spans:
        phase = sp["phase"]
        color = PHASE_COLORS.get(phase, "#eeeeee")
        start, end = sp.get("start" + key, 0.0), sp.get("end" + key, 0.0)
        ax.axvspan((start - t0) * scale, (end - t0) * scale, color=color, alpha=0.5, lw=0,
                   label=phase if phase not in seen else None)
        seen.add(phase)


def plot_report(report: dict[str, Any], path: str) -> str:
    """Top: estimate vs measured by category; per-step saved tensors and peak RSS; the process peak split,
    predicted vs measured. Bottom: RSS over the run with phase bands; live tensor bytes of the profiled step."""
    plt = _plt()
    est, meas = report["estimate"], report["measured"]
    proc = meas.get("process") if isinstance(meas.get("process"), dict) else {}
    pred = est.get("predicted_peak") if isinstance(est.get("predicted_peak"), dict) else {}
    cats = [c for c in MEASURED if est.get(c, 0) or meas.get(c, 0)]
    fig = plt.figure(figsize=(16, 9))
    grid = fig.add_gridspec(2, 3)
    left, right, split = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[0, 2])
    rss_ax, step_ax = fig.add_subplot(grid[1, :2]), fig.add_subplot(grid[1, 2])
    xs = range(len(cats))
    left.bar([x - 0.2 for x in xs], [est.get(c, 0) / MIB for c in cats], width=0.4, label="estimate")
    left.bar([x + 0.2 for x in xs], [meas.get(c, 0) / MIB for c in cats], width=0.4, label="measured")
    left.set_xticks(list(xs), cats, rotation=30, ha="right")
    left.set_ylabel("MiB")
    left.set_title("estimate vs measured")
    left.legend()
    timeline = meas.get("timeline") or []
    steps = [t["step"] for t in timeline]
    right.plot(steps, [(t.get("activations", 0) + t.get("logits", 0)) / MIB for t in timeline], marker="o",
               label="saved activations + logits")
    right.plot(steps, [t["peak_rss_bytes"] / MIB for t in timeline], marker="s", label="peak RSS")
    right.set_xlabel("step")
    right.set_ylabel("MiB")
    right.set_title("per step")
    right.legend()
    # the process peak, stacked: predicted | measured
    parts = [k for k in {**(pred.get("breakdown") or {}), **(proc.get("breakdown") or {})}]
    labelled: set[str] = set()
    for name, col in (("predicted", pred.get("breakdown") or {}), ("measured", proc.get("breakdown") or {})):
        bottom = 0.0
        for i, k in enumerate(parts):
            v = col.get(k, 0) / MIB
            if v > 0:  # (a negative unaccounted is not drawn: the dashed line shows the peak)
                split.bar([name], [v], bottom=bottom, color=f"C{i % 10}", label=None if k in labelled else k)
                labelled.add(k)
                bottom += v
    if proc.get("peak_rss_bytes"):
        split.axhline(proc["peak_rss_bytes"] / MIB, color="k", ls="--", lw=1, label="peak RSS")
    split.set_ylabel("MiB")
    split.set_title("process peak: predicted vs measured")
    if parts:
        split.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    # RSS over the run
    tl = proc.get("rss_timeline") or {}
    if tl.get("t"):
        _bands(rss_ax, tl.get("spans") or [])
        rss_ax.plot(tl["t"], [r / MIB for r in tl["rss"]], color="k", lw=1, label="RSS")
        rss_ax.legend(fontsize=7, ncol=5, loc="lower right")
    rss_ax.set_xlabel("seconds")
    rss_ax.set_ylabel("MiB")
    rss_ax.set_title("RSS over the run, by phase")
    # the profiled step's live tensor bytes
    ps = proc.get("peak_step") or {}
    if ps.get("timeline"):
        _bands(step_ax, ps.get("phases") or [], key="_ms")
        step_ax.plot([p[0] for p in ps["timeline"]], [p[1] / MIB for p in ps["timeline"]], color="k", lw=1,
                     label="live tensor bytes")
        step_ax.axvline(ps.get("peak_ms", 0), color="r", ls=":", lw=1, label=f"peak ({ps.get('peak_phase')})")
        step_ax.legend(fontsize=7)
        step_ax.set_title(f"profiled step {ps.get('step', '')}: live tensors (allocator-owned)")
    else:
        step_ax.set_title("profiled step: not profiled")
    step_ax.set_xlabel("ms")
    step_ax.set_ylabel("MiB")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_compare(rows: list[dict[str, Any]], path: str) -> str:
    """Stacked measured categories per recipe, with peak RSS as a marker."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 3), 5))
    names = [r["name"] for r in rows]
    bottom = [0.0] * len(rows)
    for cat in MEASURED:
        vals = [r["measured"].get(cat, 0) / MIB for r in rows]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(names, [r["peak_rss_bytes"] / MIB for r in rows], "k^", markersize=10, label="peak RSS")
    ax.set_ylabel("MiB")
    ax.set_title("measured memory by recipe")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path, bbox_inches="tight")
    plt.close(fig)
    return path
