"""``memkit plan --verify``: run the pick for a few steps, in its own process as a user would, and compare the
measured peak (peak RSS, or ``cuda_max_allocated_bytes`` on CUDA) with the prediction and the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

MiB = 2**20


def train_command(p: Any, recipe_file: str, out: str, steps: int) -> list[str]:
    args = p.training_args()
    return [sys.executable, "-m", "hf_memkit.cli", "train", "--model", p.model, "--recipe", recipe_file,
            "--max-steps", str(steps), "--max-seq-len", str(p.seq_len), "--output-dir", out, "--no-eval-before",
            "--overwrite-output-dir",
            "--per_device_train_batch_size", str(args["per_device_train_batch_size"]),
            "--gradient_accumulation_steps", str(args["gradient_accumulation_steps"])]


def verify(p: Any, steps: int = 4, workdir: str | None = None) -> dict[str, Any]:
    """Train the pick for ``steps`` steps with ``memkit train``; returns measured, predicted, budget (bytes) and
    ``within`` (measured <= budget). Raises ``RuntimeError`` with the run's last lines when it fails."""
    if p.pick is None:
        raise ValueError("nothing to verify: no candidate fits the budget")
    with tempfile.TemporaryDirectory(prefix="memkit-plan-", dir=workdir) as tmp:
        recipe_file = os.path.join(tmp, "plan.yaml")
        with open(recipe_file, "w") as f:
            f.write(p.recipe.to_yaml())
        out = os.path.join(tmp, "run")
        r = subprocess.run(train_command(p, recipe_file, out, steps), capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"the verification run failed (exit {r.returncode}):\n{tail}")
        with open(os.path.join(out, "train_summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(out, "memory_report.json")) as f:
            report = json.load(f)
    if p.device == "cuda":
        measured = int(report["measured"].get("cuda_max_allocated_bytes", 0))
    else:
        measured = int(summary["peak_rss_bytes"])
    return {"measured_bytes": measured, "predicted_bytes": p.pick.peak_bytes, "budget_bytes": p.budget_bytes,
            "within": measured <= p.budget_bytes, "steps": steps,
            "error": (measured - p.pick.peak_bytes) / max(p.pick.peak_bytes, 1)}


def describe(v: dict[str, Any]) -> str:
    verdict = "within" if v["within"] else "OVER"
    return (f"verified: {v['steps']} steps measured {v['measured_bytes'] / MiB:,.0f} MiB against "
            f"{v['predicted_bytes'] / MiB:,.0f} predicted ({v['error']:+.1%}); {verdict} the budget of "
            f"{v['budget_bytes'] / MiB:,.0f} MiB")
