"""``memkit plan --verify``: run the pick for a few steps, in its own process as a user would, and compare the
measured peak (peak RSS, or ``cuda_max_allocated_bytes`` on CUDA) with the prediction and the budget.

The training child must not be started by a process that maps torch and transformers: ``memkit train`` hands the
library pages it will not use again back to the kernel (``MADV_PAGEOUT``), and the kernel skips pages that another
process maps, so a child of the planner measured 1,630 MiB where the same recipe started alone measured 1,485
(SmolLM2 full fine-tune, 40 steps). ``memkit plan --verify`` therefore replaces the planner's process with
``python -m hf_memkit.planner.verify`` (this module: nothing heavy imported), which starts the run and compares.
:func:`verify` called from Python (a notebook) has that caveat: its measurement includes the caller's share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

MiB = 2**20


def train_command(model: str, recipe_file: str, out: str, steps: int, seq_len: int, batch: int,
                  accumulation: int) -> list[str]:
    return [sys.executable, "-m", "hf_memkit.cli", "train", "--model", model, "--recipe", recipe_file,
            "--max-steps", str(steps), "--max-seq-len", str(seq_len), "--output-dir", out, "--no-eval-before",
            "--overwrite-output-dir", "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", str(accumulation)]


def measure(model: str, recipe_file: str, steps: int, seq_len: int, batch: int, accumulation: int,
            device: str = "cpu", workdir: str | None = None) -> dict[str, Any]:
    """Train ``recipe_file`` for ``steps`` steps with ``memkit train``; the measured peak and perplexity."""
    with tempfile.TemporaryDirectory(prefix="memkit-plan-", dir=workdir) as tmp:
        out = os.path.join(tmp, "run")
        r = subprocess.run(train_command(model, recipe_file, out, steps, seq_len, batch, accumulation),
                           capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"the verification run failed (exit {r.returncode}):\n{tail}")
        with open(os.path.join(out, "train_summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(out, "memory_report.json")) as f:
            report = json.load(f)
    measured = (int(report["measured"].get("cuda_max_allocated_bytes", 0)) if device == "cuda"
                else int(summary["peak_rss_bytes"]))
    return {"measured_bytes": measured, "perplexity": summary.get("perplexity_after"),
            "step_seconds": report["measured"].get("median_step_seconds")}


def verify(p: Any, steps: int = 4, workdir: str | None = None) -> dict[str, Any]:
    """Train the pick for ``steps`` steps with ``memkit train``; returns measured, predicted, budget (bytes) and
    ``within`` (measured <= budget). Raises ``RuntimeError`` with the run's last lines when it fails."""
    if p.pick is None:
        raise ValueError("nothing to verify: no candidate fits the budget")
    args = p.training_args()
    with tempfile.TemporaryDirectory(prefix="memkit-plan-", dir=workdir) as tmp:
        recipe_file = os.path.join(tmp, "plan.yaml")
        with open(recipe_file, "w") as f:
            f.write(p.recipe.to_yaml())
        m = measure(p.model, recipe_file, steps, p.seq_len, args["per_device_train_batch_size"],
                    args["gradient_accumulation_steps"], p.device, workdir)
    return compare(m["measured_bytes"], p.pick.peak_bytes, p.budget_bytes, steps)


def compare(measured: int, predicted: int, budget: int, steps: int) -> dict[str, Any]:
    return {"measured_bytes": measured, "predicted_bytes": predicted, "budget_bytes": budget,
            "within": measured <= budget, "steps": steps, "error": (measured - predicted) / max(predicted, 1)}


def describe(v: dict[str, Any]) -> str:
    verdict = "within" if v["within"] else "OVER"
    return (f"verified: {v['steps']} steps measured {v['measured_bytes'] / MiB:,.0f} MiB against "
            f"{v['predicted_bytes'] / MiB:,.0f} predicted ({v['error']:+.1%}); {verdict} the budget of "
            f"{v['budget_bytes'] / MiB:,.0f} MiB")


def exec_verify(p: Any, steps: int) -> None:
    """Replace this process with ``python -m hf_memkit.planner.verify`` for the pick (see the module docstring);
    never returns. Exit status: 0 within the budget, 1 over it or when the run fails."""
    fd, recipe_file = tempfile.mkstemp(prefix="memkit-plan-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(p.recipe.to_yaml())
    args = p.training_args()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "hf_memkit.planner.verify", recipe_file, p.model, str(steps),
                              str(p.seq_len), str(args["per_device_train_batch_size"]),
                              str(args["gradient_accumulation_steps"]), p.device, str(p.pick.peak_bytes),
                              str(p.budget_bytes)])


def _main(argv: list[str]) -> int:
    recipe_file, model, steps, seq_len, batch, acc, device, predicted, budget = argv
    try:
        m = measure(model, recipe_file, int(steps), int(seq_len), int(batch), int(acc), device)
    except RuntimeError as exc:
        print(f"memkit: {exc}", file=sys.stderr)
        return 1
    finally:
        os.unlink(recipe_file)
    v = compare(m["measured_bytes"], int(predicted), int(budget), int(steps))
    print(describe(v), flush=True)
    return 0 if v["within"] else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
