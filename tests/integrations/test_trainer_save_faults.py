"""A checkpoint is complete or absent: a process killed (SIGKILL) at every phase of a checkpoint save leaves a
latest checkpoint that resumes.

One chain of child processes (tests/fixtures/save_fault_child.py: the tiny Llama, LISA, save_steps=1,
save_total_limit=1): each child resumes with ``resume_from_checkpoint=True`` from what the previous one left and
is killed at the next phase of its first save (``HF_MEMKIT_TEST_PAUSE_SAVE``); the last child runs to the end. After
every kill, transformers' own ``get_last_checkpoint`` (what stock scripts use) must name a complete checkpoint,
and the finished chain must have trained exactly as an uninterrupted run (LISA's layer draws and the Trainer's
RNG/data order restored at every resume).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_memkit.integrations.checkpoints import PAUSE_ENV, PAUSE_PHASES

CHILD = Path(__file__).resolve().parents[1] / "fixtures" / "save_fault_child.py"
MAX_STEPS = 8
#: what a checkpoint of this run holds once complete (single process, LISA keeps state)
COMPLETE = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "memkit_state/state.json", "memkit_state/tensors.safetensors")


def start(out: Path, mode: str, log: Path, pause: str | None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    f = open(log, "w")  # noqa: SIM115 (the child writes it until it exits)
    return subprocess.Popen([sys.executable, str(CHILD), str(out), str(MAX_STEPS), mode], stdout=f,
                            stderr=subprocess.STDOUT, env=env)


def wait_for(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if marker in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before {marker!r}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {marker!r} within {timeout}s:\n{log.read_text()[-4000:]}")


def assert_latest_is_complete(out: Path) -> Path:
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    for ckpt in checkpoints:  # every visible checkpoint, not only the latest, is complete
        missing = [f for f in COMPLETE if not (ckpt / f).is_file()]
        assert not missing, f"{ckpt.name} is visible but lacks {missing}"
    latest = get_last_checkpoint(str(out))
    assert latest is not None, f"no checkpoint left in {out}: {sorted(p.name for p in out.iterdir())}"
    return Path(latest)


def losses(trainer_state: Path) -> dict[int, float]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
def test_a_kill_at_every_save_phase_leaves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "out"
    mode = "fresh"
    for i, phase in enumerate(PAUSE_PHASES):
        log = tmp_path / f"child{i}-{phase}.log"
        # step >= 2: the first save of every child has an older checkpoint for rotation to delete
        proc = start(out, mode, log, f"{phase}@2")
        text = wait_for(proc, log, f"HF_MEMKIT_PAUSED {phase}")
        proc.kill()
        proc.wait(timeout=60)
        latest = assert_latest_is_complete(out)
        step = int(text.split(f"HF_MEMKIT_PAUSED {phase} ")[1].split()[0])
        published = PAUSE_PHASES.index(phase) >= PAUSE_PHASES.index("published")
        # before the rename the interrupted save is invisible; from the rename on it is the latest
        assert latest.name == f"checkpoint-{step if published else step - 1}", (phase, latest.name)
        mode = "resume"
    log = tmp_path / "final.log"
    proc = start(out, "resume", log, None)
    text = wait_for(proc, log, f"HF_MEMKIT_DONE {MAX_STEPS}")
    assert proc.wait(timeout=120) == 0, text[-4000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "staging leftovers were not cleaned"
    final = assert_latest_is_complete(out)
    assert final.name == f"checkpoint-{MAX_STEPS}"

    # the interrupted chain trained exactly as one uninterrupted run
    sys.path.insert(0, str(CHILD.parent))
    try:
        import save_fault_child
    finally:
        sys.path.remove(str(CHILD.parent))
    reference = tmp_path / "reference"
    save_fault_child.build(str(reference), MAX_STEPS).train()
    chained, straight = losses(final / "trainer_state.json"), losses(reference / f"checkpoint-{MAX_STEPS}" /
                                                                    "trainer_state.json")
    assert sorted(chained) == list(range(1, MAX_STEPS + 1))
    assert chained == pytest.approx(straight, rel=1e-4), (chained, straight)
