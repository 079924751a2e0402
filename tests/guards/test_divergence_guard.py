"""The divergence guard: its rules against hand-fed losses and gradients, and end to end on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from hf_memkit.errors import DivergenceError
from hf_memkit.guards.divergence.config import DivergenceGuardConfig
from hf_memkit.guards.divergence.monitor import DivergenceMonitor


def _monitor(**kw):
    return DivergenceMonitor(DivergenceGuardConfig(**kw))


def _good_steps(m, losses):
    for i, v in enumerate(losses):
        m.observe_loss(torch.tensor(v), i)
        m.check_gradients([torch.ones(3)], i)
        assert m.before_update(i) is False
        m.end_step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_at_once_naming_the_step(bad):
    m = _monitor()
    _good_steps(m, [3.0, 2.9])
    with pytest.raises(DivergenceError, match=r"step 3: the loss is (nan|inf).*learning rate"):
        m.observe_loss(torch.tensor(bad), 2)


def test_a_spike_above_the_running_median_stops_but_a_rise_below_it_does_not():
    m = _monitor(spike_factor=10.0)
    _good_steps(m, [3.0, 2.0, 2.5])
    m.observe_loss(torch.tensor(24.0), 3)  # 9.6x the median 2.5: allowed
    with pytest.raises(DivergenceError, match=r"10\.4x the running median 2\.5"):
        m.observe_loss(torch.tensor(26.0), 3)


def test_non_finite_gradients_stop_before_the_update():
    m = _monitor()
    _good_steps(m, [3.0])
    m.observe_loss(torch.tensor(3.0), 1)
    with pytest.raises(DivergenceError, match="gradient norm is nan"):
        m.check_gradients([torch.ones(3), torch.tensor([1.0, float("nan")])], 1)


def test_vanished_gradients_for_n_steps_are_a_collapse():
    m = _monitor(vanished_steps=2)
    _good_steps(m, [6.2])
    m.observe_loss(torch.tensor(6.2), 1)
    m.check_gradients([torch.zeros(4)], 1)  # one zero step: allowed
    assert m.before_update(1) is False
    m.end_step()
    m.observe_loss(torch.tensor(6.2), 2)
    with pytest.raises(DivergenceError, match="exactly zero for 2 steps"):
        m.check_gradients([torch.zeros(4)], 2)


def test_skip_drops_bad_steps_and_stops_after_max_skips():
    m = _monitor(action="skip", max_skips=2)
    _good_steps(m, [3.0])
    for step in (1, 2):
        m.observe_loss(torch.tensor(float("nan")), step)
        assert m.before_update(step) is True
        m.end_step()
    assert m.skipped == [2, 3]
    assert list(m.history) == [3.0]  # bad steps never enter the median
    m.observe_loss(torch.tensor(float("nan")), 3)
    with pytest.raises(DivergenceError, match="after skipping 2 bad steps"):
        m.before_update(3)


def test_the_guard_is_a_recipe_technique_with_validated_settings():
    from hf_memkit.errors import RecipeError
    from hf_memkit.recipe import load_recipe

    r = load_recipe({"guard": [{"divergence_guard": {"action": "skip"}}]})
    assert r.names() == ["divergence_guard"]
    with pytest.raises(RecipeError, match="guard"):
        load_recipe({"guard": [{"divergence_guard": {"action": "ignore"}}]})


def _tiny_trainer(tmp_path, tiny_model, tiny_dataset, lr, recipe, **kw):
    from hf_memkit import MemkitTrainer
    from tests.conftest import make_args

    args = make_args(tmp_path, max_steps=8, learning_rate=lr, lr_scheduler_type="constant", **kw)
    return MemkitTrainer(model=tiny_model, args=args, train_dataset=tiny_dataset, recipe=recipe)


def test_skip_mode_leaves_the_weights_of_a_skipped_step_untouched(tmp_path, tiny_model, tiny_dataset):
    """A NaN injected into one step's loss: that step's update is dropped, the others apply."""
    from hf_memkit.guards.divergence.technique import DivergenceGuardTechnique

    recipe = {"optimizer": {"adamw": {}}, "guard": [{"divergence_guard": {"action": "skip"}}]}
    trainer = _tiny_trainer(tmp_path, tiny_model, tiny_dataset, 1e-3, recipe, max_grad_norm=0.0)
    trainer.args.max_steps = 3
    guard = next(t for t in trainer.memkit.techniques if isinstance(t, DivergenceGuardTechnique))
    real = guard.monitor.observe_loss
    guard.monitor.observe_loss = lambda loss, step: real(loss * float("nan") if step == 1 else loss, step)
    out = trainer.train()
    assert out.global_step == 3 and guard.monitor.skipped == [2]


def test_learning_rate_1e3_is_stopped_within_a_few_steps_with_a_clear_message(tmp_path):
    """The issue's case through the command line: the default recipe at lr 1e3 on the tiny model collapses
    (loss at log V, zero gradients); memkit train stops it, exits non-zero, no traceback, strict JSON."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "hf_memkit.cli", "train", "--model", "tiny", "--max-steps", "12",
                        "--learning_rate", "1000", "--output-dir", str(out), "--no-eval-before"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "training diverged at step" in r.stderr and "the learning rate (" in r.stderr
    summary = json.loads((out / "train_summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["status"] == "diverged" and summary["verdict"] == "diverged"
    assert summary["steps"] <= 4


def test_a_collapse_is_never_called_an_improvement():
    from hf_memkit.train import verdict

    assert verdict(520.3, 512.0, 512, last_grad_norm=0.0) == "collapsed"  # uniform, from a random start above
    assert verdict(520.3, 512.0, 512, last_grad_norm=0.3) == "improved"  # a random tiny model, still learning
    assert verdict(30.0, 480.0, 512) == "collapsed"  # rose into the near-uniform band
    assert verdict(520.3, 470.0, 512) == "improved"
    assert verdict(30.0, math.inf, 512) == "diverged"
    assert verdict(30.0, 31.0, 512) == "not improved"


def test_summaries_are_strict_json(tmp_path):
    from hf_memkit.atomic import write_json

    write_json(tmp_path / "s.json", {"perplexity_after": math.inf, "x": [math.nan, 1.0]})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {"perplexity_after": None, "x": [None, 1.0]}
    assert "Infinity" not in text and "NaN" not in text
