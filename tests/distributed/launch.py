"""Helpers: run the unmodified stock script through ``memkit run`` on CPU ranks (torchrun, gloo) and read the
loss trajectory the Trainer logged."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from tests.integrations.test_launcher import STOCK, explain, run, script_args

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus(tmp: Path) -> Path:
    from hf_memkit.data.corpus import topics

    path = tmp / "train.txt"
    if not path.is_file():
        path.write_text("\n".join(topics().values())[:20_000], encoding="utf-8")
    return path


def launch(tmp: Path, out: Path, recipe: str | None, *extra: str, nproc: int = 2, batch: int = 2,
           steps: int = 3, timeout: int = 600):
    """Run the stock script; ``recipe`` None = no recipe (a plain single-process baseline through the script)."""
    from hf_memkit.data.models import tiny_dir

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["PET_MASTER_PORT"] = str(free_port())  # torchrun's --master-port, through `memkit run`
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = script_args(tiny_dir(), corpus(tmp), out, "--train_sampling_strategy", "sequential",
                       "--logging_steps", "1", *extra)
    args = [a if a != "3" or args[i - 1] != "--max_steps" else str(steps) for i, a in enumerate(args)]
    args[args.index("--per_device_train_batch_size") + 1] = str(batch)
    if recipe is None:
        cmd = [sys.executable, str(STOCK), *args]
    else:
        path = tmp / f"recipe_{out.name}.yaml"
        path.write_text(recipe, encoding="utf-8")
        cmd = [sys.executable, "-m", "hf_memkit.run", f"--nproc-per-node={nproc}", str(STOCK),
               "--memkit_recipe", str(path), *args]
    proc = run(cmd, cwd=tmp, timeout=timeout)
    assert proc.returncode == 0, explain(proc)
    return proc


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]
