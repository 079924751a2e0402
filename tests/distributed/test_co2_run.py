"""CO2 on the tiny model, 2 CPU ranks through ``memkit run`` on the unmodified stock script: interval 1, no
momentum and blocking averaging give the single-process SGD trajectory (so DDP's per-step gradient all-reduce
is really off and the parameter average replaces it); the stale asynchronous version still lowers the loss."""

from __future__ import annotations

import pytest

from tests.distributed.launch import launch, losses

pytestmark = pytest.mark.slow

SGD = ("--optim", "sgd", "--max_grad_norm", "0", "--learning_rate", "0.5")


def test_co2_interval_1_blocking_equals_synchronous_sgd(tmp_path):
    base = tmp_path / "single"
    launch(tmp_path, base, None, *SGD, batch=4, steps=4)
    co2 = tmp_path / "co2"
    recipe = ("memkit: 1\ndistributed: {co2: {outer_interval: 1, outer_momentum: 0.0, outer_lr: 1.0, "
              "staleness_penalty: 1.0, clip: null, asynchronous: false}}\n")
    proc = launch(tmp_path, co2, recipe, *SGD, steps=4)
    assert losses(co2) == pytest.approx(losses(base), rel=1e-4)
    # equal because the parameter average replaced the gradient all-reduce, not because both ran
    assert "co2 turned off DDP's per-step gradient all-reduce" in proc.stderr


def test_co2_with_staleness_lowers_the_loss_and_resumes(tmp_path):
    out = tmp_path / "co2"
    recipe = "memkit: 1\ndistributed: {co2: {outer_interval: 2, outer_momentum: 0.2, clip: 1.0}}\n"
    launch(tmp_path, out, recipe, "--learning_rate", "0.01", "--save_steps", "4", steps=12)
    got = losses(out)
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.05, got
    assert (out / "checkpoint-4" / "memkit_state" / "tensors.safetensors").is_file()
    again = tmp_path / "again"
    launch(tmp_path, again, recipe, "--learning_rate", "0.01", "--save_steps", "4",
           "--resume_from_checkpoint", str(out / "checkpoint-8"), steps=12)
    assert losses(again)[-1] == pytest.approx(got[-1], rel=1e-3)
