"""Rendering of memory reports: one-screen tables and PNG charts (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any

#: the categories both sides have, in display order
MEASURED = ("weights", "adapter_weights", "gradients", "optimizer_states", "activations", "logits")
SKIP = {"total_bytes", "inputs", "terms", "timeline", "peak_rss_bytes", "cuda_max_allocated_bytes",
        "median_step_seconds"}
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
    if "peak_rss_bytes" in meas:
        lines.append(f"  {'peak RSS (process)':<34}{'':>10}{meas['peak_rss_bytes'] / MIB:>10.0f}")
    if "cuda_max_allocated_bytes" in meas:
        lines.append(f"  {'CUDA max allocated':<34}{'':>10}{meas['cuda_max_allocated_bytes'] / MIB:>10.0f}")
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


def plot_report(report: dict[str, Any], path: str) -> str:
    """Left: estimate vs measured by category. Right: per-step saved tensors and peak RSS."""
    plt = _plt()
    est, meas = report["estimate"], report["measured"]
    cats = [c for c in MEASURED if est.get(c, 0) or meas.get(c, 0)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
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
