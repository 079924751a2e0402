"""ZeRO-2, ZeRO-3 and FSDP recipes on 2 CPU ranks (gloo) through ``memkit run`` on the unmodified stock script:
the loss trajectory equals the single-process run with the same global batch, and a checkpoint resumes to the
same last loss."""

from __future__ import annotations

import pytest

from tests.distributed.launch import launch, losses

pytestmark = pytest.mark.slow

RECIPES = {
    "zero2": "memkit: 1\ndistributed: {deepspeed: {preset: zero2}}\n",
    "zero3": "memkit: 1\ndistributed: {deepspeed: {preset: zero3}}\n",
    "zero3_offload": "memkit: 1\ndistributed: {deepspeed: {preset: zero3_offload, host_memory_gb: 1}}\n",
    "fsdp": "memkit: 1\ndistributed: {fsdp: {}}\n",
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "out"
    launch(tmp, out, None, batch=4)  # one process, the global batch of 2 ranks x 2
    return losses(out)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_loss_trajectory_as_one_process_and_resume(name, baseline, tmp_path):
    out = tmp_path / "out"
    launch(tmp_path, out, RECIPES[name])
    got = losses(out)
    assert len(got) == len(baseline) == 3
    assert got == pytest.approx(baseline, rel=2e-3), (got, baseline)
    ckpt = out / "checkpoint-2"
    assert ckpt.is_dir()
    again = tmp_path / "again"
    launch(tmp_path, again, RECIPES[name], "--resume_from_checkpoint", str(ckpt))
    resumed = losses(again)
    assert resumed[-1] == pytest.approx(got[-1], rel=2e-3), (resumed, got)
