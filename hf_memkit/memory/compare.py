"""``memkit compare RECIPE...``: the same model, data, seed and steps under each recipe, each in its own
process (so its peak RSS is its own), side by side in one table with ratios against the first recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import MemkitError
from .report import MIB, comparable_total


def run_one(recipe: str, model: str, steps: int, out_dir: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hf_memkit.cli", "train", "--model", model, "--recipe", recipe,
           "--max-steps", str(steps), "--output-dir", out_dir, "--no-eval-before", "--logging_steps", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MemkitError(f"the run with recipe {recipe!r} failed (exit {proc.returncode}):\n"
                          + proc.stderr[-3000:])
    summary = json.loads(Path(out_dir, "train_summary.json").read_text())
    report = json.loads(Path(out_dir, "memory_report.json").read_text())
    return {
        "name": Path(recipe).stem, "recipe": summary["recipe"], "techniques": summary["techniques"],
        "peak_rss_bytes": report["measured"].get("peak_rss_bytes", 0),
        "measured": {k: v for k, v in report["measured"].items() if k != "timeline"},
        "estimate_total_bytes": comparable_total(report["estimate"]),
        "measured_total_bytes": comparable_total(report["measured"]),
        "median_step_seconds": report["measured"].get("median_step_seconds"),
        "final_loss": summary.get("last_logged_loss"), "eval_perplexity": summary["perplexity_after"],
        "energy": summary.get("energy"),
    }


def compare(recipes: list[str], *, model: str = "smollm2", steps: int = 5, extra: list[str] | None = None,
            workdir: str | None = None) -> list[dict[str, Any]]:
    from ..data.models import resolve_model_path
    from ..recipe import load_recipe

    if not recipes:
        raise MemkitError("memkit compare needs at least one recipe")
    if steps < 1:
        raise MemkitError(f"--steps must be at least 1 (got {steps})")
    for r in recipes:  # every recipe is checked before the first run starts
        load_recipe(r)
    resolve_model_path(model)
    root = workdir or tempfile.mkdtemp(prefix="memkit-compare-")
    rows = []
    try:
        for i, r in enumerate(recipes):
            print(f"memkit compare: [{i + 1}/{len(recipes)}] {r} ...", file=sys.stderr, flush=True)
            rows.append(run_one(r, model, steps, os.path.join(root, f"{i}-{Path(r).stem}"), extra or []))
    finally:
        if workdir is None:  # its own temporary folder (model copies, checkpoints) goes, on errors too
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0]
    for row in rows:
        row["ratio_peak_rss"] = round(row["peak_rss_bytes"] / base["peak_rss_bytes"], 3)
        row["ratio_measured_total"] = round(row["measured_total_bytes"] / base["measured_total_bytes"], 3)
        if row["median_step_seconds"] and base["median_step_seconds"]:
            row["ratio_step_time"] = round(row["median_step_seconds"] / base["median_step_seconds"], 3)
    return rows


def _energy(row: dict[str, Any], key: str, fmt: str) -> str:
    e = row.get("energy") or {}
    return fmt.format(e[key]) if e.get("measured") and e.get(key) is not None else "-"


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("recipe", lambda r: r["name"]),
        ("peak RSS MiB", lambda r: f"{r['peak_rss_bytes'] / MIB:.0f} ({r['ratio_peak_rss']:.2f}x)"),
        ("weights", lambda r: f"{r['measured'].get('weights', 0) / MIB:.1f}"),
        ("adapter", lambda r: f"{r['measured'].get('adapter_weights', 0) / MIB:.1f}"),
        ("grads", lambda r: f"{r['measured'].get('gradients', 0) / MIB:.1f}"),
        ("optim", lambda r: f"{r['measured'].get('optimizer_states', 0) / MIB:.1f}"),
        ("activ", lambda r: f"{r['measured'].get('activations', 0) / MIB:.1f}"),
        ("logits", lambda r: f"{r['measured'].get('logits', 0) / MIB:.1f}"),
        ("measured MiB", lambda r: f"{r['measured_total_bytes'] / MIB:.1f} ({r['ratio_measured_total']:.2f}x)"),
        ("estimate MiB", lambda r: f"{r['estimate_total_bytes'] / MIB:.1f}"),
        ("step s", lambda r: f"{r['median_step_seconds']:.2f} ({r.get('ratio_step_time', 1):.2f}x)"
         if r["median_step_seconds"] else "-"),
        ("energy J", lambda r: _energy(r, "energy_j", "{:.0f}")),
        ("J/1k tok", lambda r: _energy(r, "energy_j_per_1k_tokens", "{:.1f}")),
        ("gCO2eq", lambda r: _energy(r, "co2eq_g", "{:.3f}")),
        ("final loss", lambda r: f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"),
        ("eval ppl", lambda r: f"{r['eval_perplexity']:.2f}"),
    ]
    cells = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    measured = [r["energy"] for r in rows if (r.get("energy") or {}).get("measured")]
    if measured:
        e = measured[0]
        lines.append(f"energy: {e['method']}; CO2eq at {e['grid_g_per_kwh']} g/kWh ({e['country_iso_code']})")
    else:
        why = next(((r.get("energy") or {}).get("why") for r in rows if r.get("energy")), None)
        lines.append(f"energy: not measured ({why or 'no measurement in the runs'})")
    return "\n".join(lines)
