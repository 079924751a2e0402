"""Token-budget batching: the sampler's guarantees (every index once, every batch within the budget, balanced
batches and ranks, deterministic), the collators, packed sequences that attend only to themselves (per-sequence
loss equal to the unpacked one), the Trainer wiring and ``memkit train --token-budget``."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys

import pytest
import torch

from hf_memkit.data.token_batching import (
    BatchStats,
    PackedCollator,
    PaddedCollator,
    SequenceTooLongError,
    TokenBudgetBatchSampler,
    batch_cost,
)

MODES = ("padded", "packed")


def long_tailed(n: int = 800, cap: int = 512, seed: int = 0) -> list[int]:
    """Lengths like the paragraphs of a document corpus: mostly short, a long tail up to ``cap``."""
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.paretovariate(1.1) * 6))) for _ in range(n)]


def uniform(n: int, hi: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, hi) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("replicas", [1, 3])
def test_every_index_is_used_once_per_epoch_and_every_batch_fits_the_budget(mode, replicas):
    lengths = long_tailed()
    for epoch in (0, 1, 2):
        seen = []
        for rank in range(replicas):
            s = TokenBudgetBatchSampler(lengths, 1024, mode=mode, seed=1, num_replicas=replicas, rank=rank)
            s.set_epoch(epoch)
            for batch in s:
                assert batch, "an empty batch"
                assert batch_cost([lengths[i] for i in batch], mode) <= 1024
                seen.extend(batch)
        assert sorted(seen) == list(range(len(lengths)))


def test_packed_batches_are_full_and_balanced():
    lengths = uniform(3000, 128)
    s = TokenBudgetBatchSampler(lengths, 1024, mode="packed", seed=0)
    costs = [s.cost(b) for b in s]
    mean = statistics.mean(costs)
    assert max(costs) / mean <= 1.15
    assert mean >= 0.95 * 1024
    assert len(costs) <= math.ceil(sum(lengths) / 1024) + 2  # next to the lower bound of any packing


def test_padded_batches_fill_the_budget_with_little_padding():
    lengths = uniform(3000, 128)
    s = TokenBudgetBatchSampler(lengths, 2048, mode="padded", seed=0)
    costs = sorted(s.cost(b) for b in s)
    # a batch closes only when one more sequence would overflow it: all but the last one are within a longest
    # sequence (128) of the budget
    assert costs[1] > 2048 - 128
    assert max(costs) / statistics.mean(costs) <= 1.15
    budget_padding = s.summary()["padding_fraction"]
    # the stock way: random batches of a fixed number of sequences (16, the same 2048 slots at worst)
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    fixed = [order[k:k + 16] for k in range(0, len(order), 16)]
    fixed_padding = 1 - sum(lengths) / sum(batch_cost([lengths[i] for i in b], "padded") for b in fixed)
    assert budget_padding < 0.05 and fixed_padding > 0.3


@pytest.mark.parametrize("mode", MODES)
def test_ranks_get_equal_batch_counts_and_balanced_tokens(mode):
    lengths, budget, n = long_tailed(1200), 1024, 4
    samplers = [TokenBudgetBatchSampler(lengths, budget, mode=mode, seed=2, num_replicas=n, rank=r) for r in range(n)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(s) == len(per_rank[0]) for s in samplers)
    costs = [[samplers[0].cost(b) for b in batches] for batches in per_rank]
    totals = [sum(c) for c in costs]
    assert max(totals) - min(totals) <= budget, totals  # at most one batch apart over the epoch
    assert max(totals) / min(totals) <= 1.1, totals
    spread = [max(step) - min(step) for step in zip(*costs)]  # the ranks wait for the slowest at every step
    assert statistics.median(spread) <= 0.1 * budget, spread


def test_a_batch_count_that_does_not_divide_by_the_ranks_is_evened_out():
    # packed: 7 sequences of 5 tokens in budgets of 10 are 4 batches; 3 ranks get 2 each (batches are split)
    lengths = [5] * 7
    per_rank = [list(TokenBudgetBatchSampler(lengths, 10, mode="packed", num_replicas=3, rank=r)) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert sorted(i for b in per_rank for batch in b for i in batch) == list(range(7))
    # only single-sequence batches: two of the four sequences are repeated, as DistributedSampler pads
    per_rank = [list(TokenBudgetBatchSampler([10] * 4, 10, num_replicas=3, rank=r)) for r in range(3)]
    used = [i for b in per_rank for batch in b for i in batch]
    assert [len(b) for b in per_rank] == [2, 2, 2] and set(used) == {0, 1, 2, 3} and len(used) == 6


@pytest.mark.parametrize("mode", MODES)
def test_the_same_seed_and_epoch_give_the_same_batches(mode):
    lengths = long_tailed()
    a = TokenBudgetBatchSampler(lengths, 1024, mode=mode, seed=3)
    b = TokenBudgetBatchSampler(lengths, 1024, mode=mode, seed=3)
    assert list(a) == list(b)
    assert list(TokenBudgetBatchSampler(lengths, 1024, mode=mode, seed=4)) != list(a)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1)
    assert list(a) == list(b)
    counts = set()
    for epoch in range(4):  # the Trainer reads len() once: it must hold in every epoch
        a.set_epoch(epoch)
        counts.add(len(a))
        assert len(list(a)) == len(a)
    assert len(counts) == 1


def test_batches_do_not_depend_on_the_process_hash_seed():
    code = ("from hf_memkit.data.token_batching import TokenBudgetBatchSampler as S;"
            "print(list(S([3, 9, 4, 4, 8, 1, 7, 2] * 5, 16, mode='packed', seed=5))[:4])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(outs) == 1 and outs.pop().startswith("[[")


def test_a_sequence_longer_than_the_budget_is_a_clear_error_or_is_truncated():
    with pytest.raises(SequenceTooLongError) as exc:
        TokenBudgetBatchSampler([10, 300, 20], 256)
    msg = str(exc.value)
    assert "max_tokens=256" in msg and "300 tokens" in msg and "example 1" in msg
    assert "raise max_tokens" in msg and "truncate" in msg
    s = TokenBudgetBatchSampler([10, 300, 20], 256, mode="packed", truncate=True)
    assert all(s.cost(b) <= 256 for b in s)
    batch = PackedCollator(max_length=256)([{"input_ids": list(range(1, 301))}, {"input_ids": [1, 2]}])
    assert batch["input_ids"].shape == (1, 258)


@pytest.mark.parametrize("kwargs,needle", [
    ({"max_tokens": 0}, "positive integer"),
    ({"mode": "ragged"}, "mode must be one of"),
    ({"num_replicas": 2, "rank": 2}, "rank 2 is not in"),
])
def test_bad_arguments_name_the_fix(kwargs, needle):
    args = {"lengths": [3, 4], "max_tokens": 16, **kwargs}
    with pytest.raises(ValueError, match=needle) as exc:
        TokenBudgetBatchSampler(args.pop("lengths"), args.pop("max_tokens"), **args)
    assert "fix:" in str(exc.value)
    with pytest.raises(ValueError, match="empty examples"):
        TokenBudgetBatchSampler([3, 0], 16)


def test_lengths_come_from_a_length_column_or_the_input_ids():
    from datasets import Dataset

    from hf_memkit.data.token_batching import dataset_lengths

    assert dataset_lengths([{"input_ids": [1, 2]}, {"input_ids": [3]}]) == [2, 1]
    assert dataset_lengths(Dataset.from_dict({"input_ids": [[1, 2, 3]], "length": [7]})) == [7]
    assert dataset_lengths(Dataset.from_dict({"input_ids": [[1, 2, 3], [4]]})) == [3, 1]
    with pytest.raises(ValueError, match="fix:"):
        dataset_lengths([{"text": "no ids"}])


# ---------------------------------------------------------------------------------------------------------------
# collators and accounting


FEATURES = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5]}]


def test_padded_collator_pads_right_masks_and_keeps_padding_out_of_the_loss():
    b = PaddedCollator(pad_token_id=0)(FEATURES)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]
    stats = BatchStats()
    stats.add_batch(b)
    assert (stats.real_tokens, stats.slots) == (5, 6) and stats.padding_fraction == pytest.approx(1 / 6)
    stats.seconds = 2.0
    assert stats.log_fields() == {"padding_fraction": 0.1667, "real_tokens": 5, "tokens_per_second": 2.5}


def test_packed_collator_restarts_positions_and_masks_each_first_label():
    b = PackedCollator()(FEATURES)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert "attention_mask" not in b
    stats = BatchStats()
    stats.add_batch(b)
    assert stats.padding_fraction == 0.0 and stats.real_tokens == 5


# ---------------------------------------------------------------------------------------------------------------
# no attention across packed sequences: per-sequence loss of the packed row == each sequence alone


SEQ_LENGTHS = (7, 30, 2, 15, 48, 3)


def _sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in SEQ_LENGTHS]


def _loss(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy of one sequence from its own logits (fp32)."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))


def _load(tiny_path, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation=attn, dtype=torch.float32).eval()


def _packed_vs_alone(model, seqs, use_cache=False):
    packed = PackedCollator()([{"input_ids": s, "labels": s} for s in seqs])
    out = []
    with torch.no_grad():
        row = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=use_cache).logits[0]
        start = 0
        for s in seqs:
            alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
            out.append((_loss(row[start:start + len(s)], s).item(), _loss(alone, s).item()))
            start += len(s)
    return packed, out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batches_give_the_same_per_sequence_loss_as_unpacked(tiny_path, attn):
    model = _load(tiny_path, attn)
    seqs = _sequences(model.config.vocab_size)
    packed, losses = _packed_vs_alone(model, seqs)
    for packed_loss, alone_loss in losses:
        assert abs(packed_loss - alone_loss) <= 1e-5, losses
    # the model's own loss on the packed row is the token-weighted mean of the per-sequence losses
    with torch.no_grad():
        row_loss = model(**packed, use_cache=False).loss.item()
    weights = [len(s) - 1 for s in seqs]
    expected = sum(w * alone for w, (_, alone) in zip(weights, losses)) / sum(weights)
    assert abs(row_loss - expected) <= 1e-5


def test_the_packing_check_can_fail_a_kv_cache_turns_the_boundary_detection_off(tiny_path):
    """With a cache transformers skips find_packed_sequence_indices: attention crosses the boundaries and every
    sequence after the first sees the ones before it. The equality above is therefore not automatic."""
    model = _load(tiny_path, "sdpa")
    _, losses = _packed_vs_alone(model, _sequences(model.config.vocab_size), use_cache=True)
    assert abs(losses[0][0] - losses[0][1]) <= 1e-5  # the first sequence has nothing before it
    assert max(abs(p - a) for p, a in losses[1:]) > 1e-3


def test_padded_batches_give_the_same_per_sequence_loss_as_unpadded(tiny_path):
    model = _load(tiny_path, "sdpa")
    seqs = _sequences(model.config.vocab_size)
    batch = PaddedCollator(pad_token_id=0)([{"input_ids": s} for s in seqs])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        for k, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
            assert abs(_loss(logits[k, :len(s)], s).item() - _loss(alone, s).item()) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# the Trainer and memkit train


@pytest.fixture(scope="module")
def paragraphs_ds(tiny_tokenizer):
    from hf_memkit.data.corpus import paragraph_dataset, split_topics

    train, _ = split_topics()
    return paragraph_dataset(train, tiny_tokenizer, 64, max_examples=300)


def test_paragraph_corpus_has_lengths_from_a_few_tokens_to_thousands(tiny_tokenizer):
    from hf_memkit.data.corpus import paragraph_dataset, split_topics

    train, _ = split_topics()
    full = paragraph_dataset(train, tiny_tokenizer, 10**6)["length"]
    assert min(full) <= 5 and max(full) >= 1000
    cut = paragraph_dataset(train, tiny_tokenizer, 256)
    assert max(cut["length"]) == 256 and len(cut) == len(full)
    assert all(r["labels"] == r["input_ids"] and len(r["input_ids"]) == r["length"] for r in cut.select(range(50)))


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_batches_stay_within_the_budget_and_log_padding_and_throughput(tiny_model, tiny_tokenizer,
                                                                              paragraphs_ds, tmp_path, packing):
    from hf_memkit.integrations.token_budget import TokenBudgetTrainer
    from tests.conftest import make_args

    trainer = TokenBudgetTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=3), train_dataset=paragraphs_ds,
                                 processing_class=tiny_tokenizer, max_tokens=256, packing=packing)
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == len(trainer.token_budget.sampler)
    assert all(b["input_ids"].numel() <= 256 for b in batches)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) > 0
    if packing:
        assert all(b["input_ids"].shape[0] == 1 and "position_ids" in b for b in batches)
    result = trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all({"padding_fraction", "tokens_per_second", "real_tokens"} <= h.keys()
                                    for h in logged)
    stats = trainer.token_budget.stats
    assert stats.batches == 3 and stats.slots <= 3 * 256 and stats.seconds > 0
    assert result.metrics["padding_fraction"] == round(stats.padding_fraction, 4)
    assert (stats.padding_fraction == 0.0) if packing else (0.0 <= stats.padding_fraction < 0.5)


def test_packing_with_a_kv_cache_is_refused(tiny_model, tiny_tokenizer, paragraphs_ds, tmp_path):
    from hf_memkit.integrations.token_budget import TokenBudgetTrainer
    from tests.conftest import make_args

    with pytest.raises(ValueError, match="use_cache"):
        TokenBudgetTrainer(model=tiny_model, args=make_args(tmp_path, use_cache=True), train_dataset=paragraphs_ds,
                           max_tokens=256, packing=True)


@pytest.mark.slow
def test_memkit_train_token_budget_packed_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "hf_memkit.cli", "train", "--model", "tiny", "--max-seq-len", "64",
                        "--token-budget", "256", "--packing", "--max-steps", "2", "--no-eval-before",
                        "--output-dir", str(out), "--logging_steps", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["batching"]["mode"] == "packed"
    assert summary["batching"]["padding_fraction"] == 0.0 and 0 < summary["train_tokens"] <= 2 * 256
    assert "a budget of 256 tokens (packed" in r.stdout and "token budget 256 (packed)" in r.stdout


def test_memkit_train_token_budget_padded_in_process(tmp_path):
    from hf_memkit.train import TrainOptions, train

    summary = train(TrainOptions(model="tiny", max_steps=2, max_seq_len=64, output_dir=str(tmp_path / "run"),
                                 eval_before=False, extra=["--token-budget=256", "--logging_steps", "1"]))
    assert summary["batching"]["mode"] == "padded" and summary["batching"]["batches"] == 2
    assert summary["batching"]["token_slots"] <= 2 * 256 and 0 <= summary["batching"]["padding_fraction"] < 0.5


@pytest.mark.parametrize("extra,needle", [
    (["--token-budget", "16"], "--token-budget 16 is smaller than the longest training sequence"),
    (["--packing"], "no --token-budget was given"),
    (["--token-budget", "many"], "is not an integer"),
    (["--token-budget", "0"], "at least 1"),
])
def test_memkit_train_token_budget_user_errors(tmp_path, extra, needle):
    from hf_memkit.errors import MemkitError
    from hf_memkit.train import TrainOptions, train

    with pytest.raises(MemkitError, match=needle) as exc:
        train(TrainOptions(model="tiny", max_seq_len=64, output_dir=str(tmp_path / "run"), extra=extra))
    assert "fix:" in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_memkit_train_help_lists_the_batching_options(capsys):
    from hf_memkit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--token-budget N" in out and "--packing" in out
