"""The planner's search with fake priors and a fake estimator (the choice, the tie-break, the refusals), then the
real estimator and recipe loader on the tiny model, and the command line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from hf_memkit.errors import MemkitError
from hf_memkit.planner import Candidate, parse_size, plan
from hf_memkit.planner.priors import load_priors
from hf_memkit.planner.space import admissible, enumerate_candidates

MiB = 2**20


def write_priors(path, rows):
    data = {"source": {"command": "fake", "date": "2026-12-07", "model": "fake", "workload": "4 x 256",
                       "tokens_per_step": 1024},
            "rows": [{"family": list(f), "row": f"row-{i}", "eval_perplexity": ppl, "step_seconds": t,
                      "toggles": list(tog)} for i, (f, ppl, t, tog) in enumerate(rows)]}
    path.write_text(yaml.safe_dump(data))
    return load_priors(path)


@pytest.fixture
def priors(tmp_path):
    return write_priors(tmp_path / "priors.yaml", [
        (("full", "fp32", "adamw"), 10.0, 4.0, ["cce"]),      # best quality, most memory
        (("full", "fp32", "adamw"), 10.1, 4.0, ["release", "cce"]),  # release clips per parameter: its own row
        (("full", "bf16_sr", "adamw_8bit"), 10.2, 3.0, []),
        (("full", "bf16_sr", "adamw_8bit"), 10.3, 3.0, ["release"]),
        (("lora", "fp32", "adamw"), 11.0, 2.0, ["gc"]),
        (("lora", "fp32", "adamw"), 11.0, 2.0, ["release", "gc"]),
        (("lora", "bf16", "adamw_8bit"), 11.0, 2.0, ["gc"]),   # same quality and time as the previous family
        (("lora", "bf16", "adamw_8bit"), 11.0, 2.0, ["release", "gc"]),
    ])


def fake_peak(c: Candidate, batch: int, seq_len: int) -> int:
    """MiB: full fp32 adamw 2000, bf16 full 1200, LoRA 700; each exact toggle saves 100; x batch*seq/1024."""
    base = {"full": {"fp32": 2000, "bf16_sr": 1200, "bf16_rn": 1200}, "lora": {"fp32": 700, "bf16": 700},
            "qlora": {"fp32": 600, "bf16": 600}}[c.mode][c.precision]
    base -= 100 * len(c.toggles)
    return int(base * max(batch * seq_len, 1) / 1024) * MiB


def fake_estimator(c, batch, seq_len):
    return fake_peak(c, batch, seq_len), {"tensors": fake_peak(c, batch, seq_len)}


def accept_all(c, config):
    return None


def run(priors, budget, **kw):
    kw.setdefault("admit", accept_all)
    return plan("fake", budget, priors=priors, estimator=fake_estimator, **kw)


def test_the_best_fitting_candidate_is_picked(priors):
    p = run(priors, "1900MiB")  # full fp32 adamw with at least one toggle fits (1900 and less)
    assert p.pick.candidate.family == ("full", "fp32", "adamw")
    assert p.pick.peak_bytes <= p.budget_bytes and all(s.fits for s in p.fitting)
    # among that family the better row (without release: 10.0 against 10.1), then the fastest: no gradient
    # checkpointing (the row ran without it)
    assert "gc" not in p.pick.candidate.toggles
    assert p.pick.candidate.toggles == frozenset({"cce"})
    assert p.pick.perplexity == 10.0
    p = run(priors, "1300MiB")
    assert p.pick.candidate.family == ("full", "bf16_sr", "adamw_8bit")
    p = run(priors, "850MiB")  # the leanest full fine-tune needs 900
    assert p.pick.candidate.mode == "lora"
    assert all(s.peak_bytes > p.budget_bytes for s in p.over)
    assert p.recipe is not None and p.recipe.slot("adapter")[0].name == "lora"


def test_ties_break_the_same_way_whatever_the_order(priors):
    cands = enumerate_candidates()
    picks = set()
    for seed in range(5):
        random.Random(seed).shuffle(cands)
        p = run(priors, "850MiB", candidates=list(cands))
        picks.add(p.pick.label)
        order = [s.label for s in p.fitting]
        assert order == sorted(order, key=lambda lab: next(s for s in p.fitting if s.label == lab).sort_key())
    # lora fp32 adamw and lora bf16 adamw_8bit tie on quality, time and peak: the label decides
    assert picks == {"lora bf16 adamw_8bit release cce"}


def test_refused_combinations_are_never_proposed(priors):
    def no_release_with_8bit(c, config):
        return "8-bit and release refused here" if "release" in c.toggles and c.optimizer == "adamw_8bit" else None

    p = run(priors, "3GiB", admit=no_release_with_8bit)
    proposed = p.fitting + p.over
    assert proposed and not any("release" in s.candidate.toggles and s.candidate.optimizer == "adamw_8bit"
                                for s in proposed)
    assert p.refused and all("release" in k and "adamw_8bit" in k for k in p.refused)


def test_families_without_a_prior_are_not_ranked(priors):
    p = run(priors, "3GiB")
    families = {s.candidate.family for s in p.fitting + p.over}
    assert families == {("full", "fp32", "adamw"), ("full", "bf16_sr", "adamw_8bit"), ("lora", "fp32", "adamw"),
                        ("lora", "bf16", "adamw_8bit")}
    assert p.unmeasured > 0


def test_gradient_release_is_ranked_by_a_row_that_ran_with_it(tmp_path):
    """Under max_grad_norm, release clips per parameter: a row without release says nothing about it, and the
    other way round."""
    only_plain = write_priors(tmp_path / "plain.yaml", [(("full", "fp32", "adamw"), 10.0, 4.0, [])])
    p = run(only_plain, "3GiB")
    ranked = p.fitting + p.over
    assert ranked and not any("release" in s.candidate.toggles for s in ranked)
    only_release = write_priors(tmp_path / "release.yaml", [(("full", "fp32", "adamw"), 10.4, 4.0, ["release"])])
    p = run(only_release, "3GiB")
    ranked = p.fitting + p.over
    assert ranked and all("release" in s.candidate.toggles for s in ranked)
    assert {s.perplexity for s in ranked} == {10.4}
    both = write_priors(tmp_path / "both.yaml", [(("full", "fp32", "adamw"), 10.4, 4.0, ["release"]),
                                                 (("full", "fp32", "adamw"), 10.0, 4.0, [])])
    p = run(both, "1900MiB")  # 1900 fits without release (one toggle) and with it: the better row wins
    assert p.pick.perplexity == 10.0 and "release" not in p.pick.candidate.toggles


def test_full_finetune_keeps_full_recipes_only(priors):
    p = run(priors, "3GiB", full_finetune=True)
    assert {s.candidate.mode for s in p.fitting + p.over} == {"full"}


def test_a_budget_nothing_fits_says_what_it_would_take(priors):
    p = run(priors, "300MiB")
    assert p.pick is None and p.recipe is None
    assert "smallest predicted peak is 400 MiB" in p.suggestion  # lora with its three toggles: 700 - 300
    assert "it would fit with batch" in p.suggestion and "a machine with at least" in p.suggestion


def test_tokens_per_step_may_split_into_micro_batches(priors):
    p = run(priors, "1100MiB", tokens_per_step=2048, seq_len=256)  # 8 sequences; full bf16 would need 2000+
    assert p.pick is not None and p.pick.candidate.accumulation > 1
    args = p.training_args()
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 8
    assert "release" not in p.pick.candidate.toggles  # release keeps every gradient between micro-batches
    with pytest.raises(MemkitError, match="multiple of --seq-len"):
        run(priors, "1GiB", tokens_per_step=300, seq_len=256)


@pytest.mark.parametrize("text,expected", [("1GiB", 2**30), ("800MiB", 800 * MiB), ("1.5 GiB", 3 * 2**29),
                                           ("2G", 2**31), ("1GB", 10**9)])
def test_sizes_read_with_their_unit(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1", "lots", "-1GiB", "0MiB", "1 potato"])
def test_sizes_without_a_unit_or_nonsense_are_refused_with_the_fix(text):
    with pytest.raises(MemkitError, match="unit|positive"):
        parse_size(text)


def test_the_loader_refusals_are_real():
    """admissible() asks the recipe loader and the techniques: sst cannot release gradients."""
    from hf_memkit.data.models import tiny_config

    config = tiny_config()
    assert admissible(Candidate("full", "fp32", "sst", frozenset({"release"})), config) is not None
    assert admissible(Candidate("full", "fp32", "adamw", frozenset({"release", "cce", "gc"})), config) is None


def test_every_candidate_the_real_planner_proposes_loads_and_fits(tmp_path):
    """The real estimator, loader and priors on the tiny model's config."""
    from hf_memkit.recipe import load_recipe

    p = plan("tiny", "8GiB")
    assert p.pick is not None and p.fitting
    for s in p.fitting + p.over:
        load_recipe(s.candidate.recipe())
        assert s.fits == (s.peak_bytes <= p.budget_bytes)
    assert p.pick is p.fitting[0]
    text = p.explain()
    assert "pick: " + p.pick.label in text and "expected eval ppl" in text


def _cli(*args, timeout=300, runtime: int | None = 600 * MiB):
    """``memkit plan`` in a child; ``runtime`` skips its runtime probe (measured in-process by the test above)."""
    env = {**os.environ, "HF_MEMKIT_RUNTIME_BYTES": str(runtime)} if runtime else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "hf_memkit.cli", "plan", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_a_given_runtime_replaces_the_probe(monkeypatch):
    from hf_memkit.planner.runtime import measure_runtime

    measure_runtime.cache_clear()
    monkeypatch.setenv("HF_MEMKIT_RUNTIME_BYTES", str(123 * MiB))
    assert measure_runtime() == 123 * MiB
    measure_runtime.cache_clear()
    monkeypatch.setenv("HF_MEMKIT_RUNTIME_BYTES", "lots")
    with pytest.raises(MemkitError, match="HF_MEMKIT_RUNTIME_BYTES"):
        measure_runtime()
    measure_runtime.cache_clear()


def test_the_command_line_writes_a_recipe_that_loads(tmp_path):
    from hf_memkit.recipe import load_recipe

    out = tmp_path / "pick.yaml"
    r = _cli("--model", "tiny", "--budget", "8GiB", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "pick: " in r.stdout and "fits (" in r.stdout
    recipe = load_recipe(str(out))
    assert recipe.names()
    r = _cli("--model", "tiny", "--budget", "8GiB", "--json")
    data = json.loads(r.stdout)
    assert data["pick"]["fits"] and data["pick"]["predicted_peak_bytes"] <= data["budget_bytes"]


def test_the_command_line_refuses_bad_budgets_without_a_traceback():
    r = _cli("--model", "tiny", "--budget", "1 potato")
    assert r.returncode != 0 and "unit" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--model", "tiny", "--budget", "16MiB")  # below the interpreter's own footprint
    assert r.returncode == 1 and "nothing fits" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.slow
def test_verify_trains_the_pick_and_measures_it(tmp_path):
    r = _cli("--model", "tiny", "--budget", "8GiB", "--verify", "--verify-steps", "2", "--seq-len", "64",
             timeout=600, runtime=None)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verified: 2 steps measured" in r.stdout and "within the budget" in r.stdout


def test_a_malformed_priors_file_names_the_row(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("source: {command: x}\nrows:\n- {family: [full, fp32, adamw], row: a, eval_perplexity: 9, "
                   "step_seconds: 1}\n- {family: [full, fp32], row: b, eval_perplexity: 9, step_seconds: 1}\n")
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        load_priors(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="source"):
        load_priors(bad)


def test_the_shipped_priors_say_where_they_come_from():
    p = load_priors()
    assert p.rows and {"command", "date", "model", "workload"} <= set(p.source)
    assert "bench_peak.py" in p.source["command"]
    for prior in p.rows.values():
        assert prior.perplexity > 1 and prior.step_seconds > 0


def test_a_family_the_estimator_under_predicted_is_planned_with_its_measured_ratio(tmp_path):
    """A row that measured 1,200 MiB where the estimator said 1,000 scales that family's predicted peaks by 1.2;
    a row the estimator over-predicted changes nothing."""
    rows = [{"family": ["lora", "bf16", "adamw_8bit"], "row": "under", "eval_perplexity": 11.0, "step_seconds": 2.0,
             "toggles": [], "peak_rss_mib": 1200.0, "predicted_peak_mib": 1000.0},
            {"family": ["full", "fp32", "adamw"], "row": "over", "eval_perplexity": 10.0, "step_seconds": 4.0,
             "toggles": [], "peak_rss_mib": 900.0, "predicted_peak_mib": 1000.0}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"source": {"command": "fake", "tokens_per_step": 1024}, "rows": rows}))
    priors = load_priors(path)
    assert priors.get(("lora", "bf16", "adamw_8bit")).peak_factor() == pytest.approx(1.2)
    assert priors.get(("full", "fp32", "adamw")).peak_factor() == 1.0
    p = run(priors, "3GiB")
    for s in p.fitting + p.over:
        raw = fake_peak(s.candidate, 4, 256)
        if s.candidate.mode == "lora":
            assert s.peak_bytes == int(raw * 1.2) and s.breakdown["under_prediction_bytes"] == s.peak_bytes - raw
        else:
            assert s.peak_bytes == raw and "under_prediction_bytes" not in s.breakdown
    # nothing fits 300 MiB: the leanest ranked candidate (LoRA + cce + gc, no release row: 500 raw, 600 planned)
    # and the workload that would fit are both told with the measured ratio (batch 4 x 128: 250 raw, 300 planned)
    p = run(priors, "300MiB")
    assert "smallest predicted peak is 600 MiB" in p.suggestion
    assert "it would fit with batch 4 x 128 tokens (300 MiB predicted)" in p.suggestion
    lora_700 = run(priors, "800MiB", full_finetune=False)  # 700 MiB raw LoRA (no toggle) is 840 MiB planned
    assert all(s.peak_bytes <= 800 * MiB for s in lora_700.fitting)
    assert not any(s.candidate.mode == "lora" and not s.candidate.toggles for s in lora_700.fitting)
