"""Weight quantization on SmolLM2-135M: eval perplexity and checkpoint size, ours against two peers.

Rows: fp32; RTN, GPTQ, GPTQ + LoRC r8 and EfficientQAT (Block-AP + E2E-QP) at 4 bits, EfficientQAT w2g64 (ours,
exported as compressed-tensors pack-quantized); bitsandbytes nf4 (peer, quantized on load); llm-compressor's
GPTQ (peer, same calibration token ids, bits, group size, damping and block size, no act-order), run in its own
environment (``--llmc-path``, e.g. ``pip install --target /tmp/llmc llmcompressor``) because it pins other
transformers / compressed-tensors versions.

Perplexity: the eval split of the embedded corpus (24 blocks x 256 tokens, the blocks ``memkit train`` uses),
computed in memory for our rows and bnb, and on the saved checkpoint reloaded in llm-compressor's environment for
that peer. Size: bytes of the weight files written (``*.safetensors``); the LoRC adapter is listed separately.

Group size: SmolLM2's hidden width is 576, which 128 does not divide, and compressed-tensors (like vLLM) needs
whole groups, so ``--group-size`` defaults to 64 (576 = 9 x 64); ``--group-size 128`` stops with the error
hf_memkit raises for it.

    python benchmarks/bench_quant.py                      # full table (about an hour on 2 CPU cores)
    python benchmarks/bench_quant.py --model tiny --quick # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROWS = ("fp32", "rtn", "gptq", "gptq_lorc", "eqat_w4", "eqat_w2", "bnb_nf4", "llmc_gptq")
#: not in the default list: 2-bit post-training baselines, to place EfficientQAT w2g64 (``--rows ...,rtn_w2``)
EXTRA_ROWS = ("rtn_w2", "gptq_w2", "eqat_w4_fastlr", "eqat_w2_fastlr")

LLMC_SCRIPT = r'''
import json, math, os, sys, time
import torch
cfg = json.load(open(sys.argv[1]))
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
import llmcompressor, compressed_tensors, transformers

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
calib = cfg["calibration"]
ds = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(x) for x in calib]})
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=cfg["bits"], type="int", symmetric=False, strategy="group", group_size=cfg["group_size"]))
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                      dampening_frac=cfg["damp"], actorder=None)
t0 = time.time()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
        max_seq_length=len(calib[0]), pipeline="sequential")
seconds = time.time() - t0
model.save_pretrained(cfg["out"], save_compressed=True)
del model
loaded = AutoModelForCausalLM.from_pretrained(cfg["out"])
loaded.eval()
total = 0.0
with torch.no_grad():
    blocks = cfg["eval_blocks"]
    for i in range(0, len(blocks), 8):
        ids = torch.tensor(blocks[i:i + 8])
        total += float(loaded(input_ids=ids, labels=ids).loss) * ids.shape[0]
print("LLMC_RESULT " + json.dumps({"perplexity": math.exp(total / len(blocks)), "seconds": seconds,
      "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                   "transformers": transformers.__version__}}))
'''


def log(msg: str) -> None:
    print(msg, flush=True)


def folder_bytes(folder: str) -> int:
    from hf_memkit.export.hub import folder_bytes as fb

    return fb(folder)


def linear_bytes(folder: str, model) -> int:
    """Bytes the quantized layers' tensors take in the checkpoint (packed codes, scales, zero points, shapes)."""
    from hf_memkit.export.compressed_tensors import quantized_bytes_on_disk
    from hf_memkit.compress.linear import quantized_modules

    return quantized_bytes_on_disk(folder, [n for n, _m, _q in quantized_modules(model)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated subset of {','.join(ROWS)} (also: {','.join(EXTRA_ROWS)})")
    p.add_argument("--group-size", type=int, default=64, help="group size of the 4-bit rows")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (GPTQ, LoRC, peers)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--bap-samples", type=int, default=32, help="Block-AP training sequences")
    p.add_argument("--bap-seq-len", type=int, default=256, help="Block-AP tokens per sequence")
    p.add_argument("--bap-epochs", type=int, default=1, help="Block-AP epochs per block")
    p.add_argument("--bap-batch", type=int, default=2, help="Block-AP sequences per step")
    p.add_argument("--fast-lr-quant", type=float, default=1e-3, help="Block-AP lr_quant of the *_fastlr rows")
    p.add_argument("--fast-lr-weight", type=float, default=1e-4, help="Block-AP lr_weight of the *_fastlr rows")
    p.add_argument("--e2e-steps", type=int, default=10, help="E2E-QP optimizer steps")
    p.add_argument("--e2e-batch", type=int, default=2, help="E2E-QP sequences (256 tokens) per step")
    p.add_argument("--llmc-path", default="/tmp/llmc", help="folder with llmcompressor and its pinned deps")
    p.add_argument("--out", default="runs/bench_quant", help="checkpoints and results.jsonl go here")
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    p.add_argument("--fresh", action="store_true", help="recompute rows already in OUT/results.jsonl")
    a = p.parse_args(argv)
    if a.quick:
        a.calib_samples, a.calib_seq_len, a.bap_samples, a.bap_seq_len, a.e2e_steps = 8, 64, 8, 64, 2

    import logging

    import torch

    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    logging.getLogger("hf_memkit").setLevel(logging.DEBUG)
    from hf_memkit.data.models import load_model_and_tokenizer, resolve_model_path
    from hf_memkit.compress.calibration import from_corpus
    from hf_memkit.quant.evaluate import corpus_perplexity, eval_blocks

    torch.manual_seed(0)
    path = str(resolve_model_path(a.model))
    _, tok = load_model_and_tokenizer(path)
    blocks = eval_blocks(tok)
    calib = from_corpus(tok, a.calib_samples, a.calib_seq_len)
    os.makedirs(a.out, exist_ok=True)
    results_path = os.path.join(a.out, "results.jsonl")
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    g = a.group_size
    log(f"bench_quant: model {a.model}, rows {rows}, calibration {calib.describe()}, eval {len(blocks)} x "
        f"{len(blocks[0])} tokens")

    def fresh():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def export(model, name):
        from hf_memkit.export.checkpoint import export_compressed_tensors

        out = os.path.join(a.out, name)
        shutil.rmtree(out, ignore_errors=True)
        export_compressed_tensors(model, out, tokenizer=tok, model_card=False)
        adapter = os.path.join(out, "lorc_adapter")
        return {"bytes": folder_bytes(out) - folder_bytes(adapter), "adapter_bytes": folder_bytes(adapter),
                "quantized_layer_bytes": linear_bytes(out, model)}

    def record(entry):
        log(f"bench_quant: {json.dumps(entry)}")
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        results.append(entry)

    results: list[dict] = []
    done = {}
    if os.path.isfile(results_path) and not a.fresh:  # an interrupted run continues where it stopped
        with open(results_path, encoding="utf-8") as f:
            done = {r["row"]: r for r in map(json.loads, f) if "error" not in r}
    for row in rows:
        if row in done:
            log(f"bench_quant: {row} already measured in {results_path} (use --fresh to redo)")
            results.append(done[row])
            continue
        t0 = time.perf_counter()
        if row == "fp32":
            m = fresh()
            out = os.path.join(a.out, "fp32")
            shutil.rmtree(out, ignore_errors=True)
            m.save_pretrained(out)
            record({"row": row, "method": "fp32 (reference)", "bits": 32, "perplexity": corpus_perplexity(m, blocks=blocks),
                    "bytes": folder_bytes(out), "seconds": 0.0})
        elif row in ("rtn", "gptq", "gptq_lorc", "rtn_w2", "gptq_w2"):
            from hf_memkit.quant.gptq.config import GPTQConfig
            from hf_memkit.quant.lorc.config import LorcCompensatorConfig
            from hf_memkit.quant.pipeline import quantize_model_
            from hf_memkit.quant.rtn.config import RTNConfig

            m = fresh()
            q = "rtn" if row.startswith("rtn") else "gptq"
            bits, gs = (2, 64) if row.endswith("_w2") else (4, g)
            cfg = RTNConfig(bits=bits, group_size=gs) if q == "rtn" else GPTQConfig(
                bits=bits, group_size=gs, num_samples=a.calib_samples, seq_len=a.calib_seq_len)
            lorc = LorcCompensatorConfig(rank=8) if row == "gptq_lorc" else None
            quantize_model_(m, q, cfg, lorc=lorc, calibration=calib if q == "gptq" else None)
            secs = time.perf_counter() - t0
            label = f"{q.upper()} w{bits}g{gs}" + (" + LoRC r8" if lorc else "")
            record({"row": row, "method": label + " (ours)", "bits": bits, "perplexity": corpus_perplexity(m, blocks=blocks),
                    "seconds": round(secs, 1), **export(m, row)})
        elif row in ("eqat_w4", "eqat_w2", "eqat_w4_fastlr", "eqat_w2_fastlr"):
            bits, gs = (4, g) if row.startswith("eqat_w4") else (2, 64)
            fast = row.endswith("_fastlr")
            m, secs, note = run_eqat(a, path, tok, bits, gs, fast)
            label = f"EfficientQAT w{bits}g{gs} (ours: Block-AP + E2E-QP{', short-budget lrs' if fast else ''})"
            record({"row": row, "method": label, "bits": bits,
                    "perplexity": corpus_perplexity(m, blocks=blocks), "seconds": round(secs, 1), "note": note,
                    **export(m, row)})
        elif row == "bnb_nf4":
            record(run_bnb(a, path, blocks))
        elif row == "llmc_gptq":
            record(run_llmc(a, path, calib, blocks, g))
        else:
            raise SystemExit(f"unknown row {row!r}; choose from {', '.join(ROWS + EXTRA_ROWS)}")
    print_table(results, a)
    return 0


def run_eqat(a, path, tok, bits, gs, fast=False):
    """Block-AP before training, then E2E-QP as a Trainer run on the corpus (the recipe path). ``fast``: Block-AP
    learning rates for short budgets instead of the reference's (tuned for ~4000 steps per block)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator

    from hf_memkit import MemkitTrainer
    from hf_memkit.data.corpus import block_dataset, split_topics

    recipe = {"compress": [{"block_ap": {"bits": bits, "group_size": gs, "num_samples": a.bap_samples,
                                         "seq_len": a.bap_seq_len, "epochs": a.bap_epochs,
                                         "batch_size": a.bap_batch, "calibration": "corpus",
                                         **({"lr_quant": a.fast_lr_quant, "lr_weight": a.fast_lr_weight}
                                            if fast else {})}},
                           {"e2e_qp": {}}]}
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train, _ = split_topics()
    data = block_dataset(train, tok, 256, max_blocks=a.e2e_steps * a.e2e_batch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=a.e2e_steps, per_device_train_batch_size=a.e2e_batch,
                                 learning_rate=2e-5 if bits == 2 else 1e-5, lr_scheduler_type="cosine",
                                 warmup_steps=0.03, max_grad_norm=0.3, save_strategy="no", report_to=[], seed=0,
                                 logging_steps=max(a.e2e_steps // 5, 1), disable_tqdm=True,
                                 dataloader_pin_memory=False)
        trainer = MemkitTrainer(model=m, args=args, train_dataset=data, data_collator=default_data_collator,
                                processing_class=tok, recipe=recipe)
        t1 = time.perf_counter()
        trainer.train()
        secs_e2e = time.perf_counter() - t1
    bap = recipe["compress"][0]["block_ap"]
    lrs = f"lr_quant {bap.get('lr_quant', 1e-4):g}, lr_weight {bap.get('lr_weight', 2e-5 if bits == 2 else 1e-5):g}"
    note = (f"Block-AP {a.bap_samples}x{a.bap_seq_len} tokens, {a.bap_epochs} epoch(s), batch {a.bap_batch}, {lrs} "
            f"({t1 - t0:.0f} s); E2E-QP {a.e2e_steps} steps x {a.e2e_batch}x256 tokens ({secs_e2e:.0f} s)")
    return trainer.model, time.perf_counter() - t0, note


def run_bnb(a, path, blocks):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_memkit.quant.evaluate import corpus_perplexity

    t0 = time.perf_counter()
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                            bnb_4bit_use_double_quant=False)
    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.float32, device_map="cpu")
    secs = time.perf_counter() - t0
    out = os.path.join(a.out, "bnb_nf4")
    shutil.rmtree(out, ignore_errors=True)
    m.save_pretrained(out)
    return {"row": "bnb_nf4", "method": "bitsandbytes nf4, blocksize 64 (peer)", "bits": 4,
            "perplexity": corpus_perplexity(m, blocks=blocks), "bytes": folder_bytes(out), "seconds": round(secs, 1)}


def run_llmc(a, path, calib, blocks, g):
    if not os.path.isdir(os.path.join(a.llmc_path, "llmcompressor")):
        return {"row": "llmc_gptq", "method": f"llm-compressor GPTQ w4g{g} (peer)", "error":
                f"llmcompressor not found in {a.llmc_path}: pip install --target {a.llmc_path} llmcompressor"}
    import torch

    out = os.path.abspath(os.path.join(a.out, "llmc_gptq"))  # the peer runs in another working directory
    shutil.rmtree(out, ignore_errors=True)
    ids = [row.tolist() for b in calib.batches for row in b["input_ids"]]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"model": path, "calibration": ids, "eval_blocks": blocks, "bits": 4, "group_size": g,
                   "damp": 0.01, "out": out}, f)
        cfg = f.name
    env = dict(os.environ, PYTHONPATH=a.llmc_path + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", LLMC_SCRIPT, cfg], capture_output=True, text=True, env=env,
                       cwd=tempfile.gettempdir())
    os.unlink(cfg)
    entry = {"row": "llmc_gptq", "method": f"llm-compressor GPTQ w4g{g} (peer)", "bits": 4,
             "seconds_total": round(time.perf_counter() - t0, 1)}
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("LLMC_RESULT ")), None)
    if r.returncode != 0 or line is None:
        entry["error"] = (r.stderr or r.stdout)[-3000:]
        return entry
    res = json.loads(line[len("LLMC_RESULT "):])
    entry.update(perplexity=res["perplexity"], seconds=round(res["seconds"], 1), versions=res["versions"],
                 bytes=folder_bytes(out))
    del torch
    return entry


def print_table(results, a):
    ref = next((r["perplexity"] for r in results if r["row"] == "fp32" and "perplexity" in r), None)
    print()
    print(f"| method | perplexity | vs fp32 | weights on disk (MB) | quantized layers (MB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error'].strip().splitlines()[-1][:120]} | | | | |")
            continue
        ppl = r.get("perplexity")
        delta = f"{(ppl / ref - 1) * 100:+.2f}%" if ref and ppl and math.isfinite(ppl) else "-"
        size = f"{r['bytes'] / 1e6:.1f}" + (f" (+{r['adapter_bytes'] / 1e6:.2f} adapter)" if r.get("adapter_bytes") else "")
        ql = f"{r['quantized_layer_bytes'] / 1e6:.2f}" if r.get("quantized_layer_bytes") else "-"
        print(f"| {r['method']} | {ppl:.3f} | {delta} | {size} | {ql} | {r.get('seconds', '-')} |")
    for r in results:
        if r.get("note"):
            print(f"  {r['row']}: {r['note']}")
        if r.get("versions"):
            print(f"  {r['row']}: {r['versions']}")


if __name__ == "__main__":
    sys.exit(main())
