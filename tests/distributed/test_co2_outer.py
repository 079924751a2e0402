"""CO2's outer step: the arithmetic against a hand computation, clipping that clips, and the outer loop on 2
gloo ranks (spawned processes, no Trainer): interval 1 + no momentum + blocking averaging is synchronous
data-parallel SGD; with one-round staleness it still converges on a quadratic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_memkit.distributed.co2.outer import clip_, outer_step_


def test_outer_step_matches_a_hand_computation():
    anchor = torch.tensor([1.0, 2.0])
    m = torch.tensor([0.5, -0.5])
    avg = torch.tensor([0.5, 2.5])
    outer_step_(anchor, m, avg, lr=0.5, beta=0.5, penalty=2.0, clip=None)
    # m = 0.5·[0.5, -0.5] + ([1, 2] − [0.5, 2.5])/2 = [0.5, -0.5];  θ_old = [1, 2] − 0.5·m = [0.75, 2.25]
    torch.testing.assert_close(m, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(anchor, torch.tensor([0.75, 2.25]))


def test_outer_step_clips_the_momentum_before_using_it():
    anchor, m, avg = torch.tensor([0.0, 0.0]), torch.zeros(2), torch.tensor([-3.0, 0.2])
    outer_step_(anchor, m, avg, lr=1.0, beta=0.0, penalty=1.0, clip=1.0)
    torch.testing.assert_close(m, torch.tensor([1.0, -0.2]))  # (θ_old − θ̄) = [3, −0.2] clipped to |m| ≤ 1
    torch.testing.assert_close(anchor, torch.tensor([-1.0, 0.2]))


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_clip_really_clips(mode):
    m = torch.randn(1000) * 10
    clip_(m, 0.5, mode)
    if mode == "value":
        assert m.abs().max() <= 0.5
    else:
        assert float(m.norm()) == pytest.approx(0.5, rel=1e-5)


def _quadratic_worker(rank, world, init, cfg, steps, lr, out):
    import torch.distributed as dist

    from hf_memkit.distributed.co2.callback import CO2Callback, finish_pending
    from hf_memkit.distributed.co2.config import CO2Config
    from hf_memkit.distributed.co2.technique import CO2Technique

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    centres = torch.randn(world, 8)  # rank r minimises ½‖θ − c_r‖²; the optimum of the mean is mean(c)
    model = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tech = CO2Technique(CO2Config(**cfg))
    cb = CO2Callback(tech)
    state = SimpleNamespace(global_step=0)
    cb.on_train_begin(None, state, None, model=model)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (model.weight[0] - centres[rank]).pow(2).sum()
        loss.backward()
        opt.step()
        state.global_step += 1
        cb.on_step_end(None, state, None)
        trajectory.append(model.weight.detach()[0].clone())
    finish_pending(tech)
    if rank == 0:
        torch.save({"trajectory": torch.stack(trajectory), "centres": centres}, out)
    dist.destroy_process_group()


def _spawn(tmp_path, cfg, steps, lr):
    import torch.multiprocessing as mp

    out = tmp_path / "result.pt"
    mp.spawn(_quadratic_worker, args=(2, f"file://{tmp_path}/pg", cfg, steps, lr, str(out)), nprocs=2)
    return torch.load(out)


@pytest.mark.slow
def test_interval_1_blocking_no_momentum_is_synchronous_data_parallel_sgd(tmp_path):
    cfg = dict(outer_interval=1, outer_lr=1.0, outer_momentum=0.0, staleness_penalty=1.0, clip=None,
               asynchronous=False)
    res = _spawn(tmp_path, cfg, steps=5, lr=0.3)
    theta, expected = torch.zeros(8), []
    for _ in range(5):  # DDP-SGD: θ ← θ − η·mean_r ∇f_r(θ)
        theta = theta - 0.3 * (theta - res["centres"]).mean(0)
        expected.append(theta)
    torch.testing.assert_close(res["trajectory"], torch.stack(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_stale_asynchronous_outer_steps_converge_on_a_quadratic(tmp_path):
    cfg = dict(outer_interval=4, outer_lr=1.0, outer_momentum=0.2, staleness_penalty=1.0, clip=1.0,
               asynchronous=True)
    res = _spawn(tmp_path, cfg, steps=200, lr=0.1)
    optimum = res["centres"].mean(0)
    start = float(optimum.norm())
    final = float((res["trajectory"][-1] - optimum).norm())
    assert final < 0.05 * start, (final, start)
