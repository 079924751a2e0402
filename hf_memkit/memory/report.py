"""Rendering of memory reports: a stacked-bar PNG of the estimate by category."""

from __future__ import annotations

from typing import Any

SKIP = {"total_bytes", "inputs", "terms"}


def plot_estimate(estimate: dict[str, Any], path: str, title: str = "memory estimate") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = {k: v for k, v in estimate.items() if k not in SKIP and isinstance(v, (int, float)) and v > 0}
    fig, ax = plt.subplots(figsize=(4.5, 5))
    bottom = 0.0
    for name, nbytes in cats.items():
        mib = nbytes / 2**20
        ax.bar(["estimate"], [mib], bottom=bottom, label=f"{name} ({mib:.1f} MiB)")
        bottom += mib
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
