"""``memkit plan`` checked: for each budget, the pick and the next candidates that fit, each trained for
``--steps`` steps with ``memkit train`` in its own process; measured peak RSS against the budget and the
prediction, eval perplexity against the pick's.

    python benchmarks/bench_plan.py [--budgets 0.8GiB 1GiB 1.5GiB 2GiB 3GiB] [--top 3] [--steps 40]

SmolLM2-135M, 4 x 256 tokens, the embedded corpus, ``memkit train``'s defaults (lr 5e-4 cosine), eval perplexity
on the held-out blocks after training. A candidate that appears in several budgets' top lists is run once. One
process at a time: check that the machine is idle first. Prints one table row per (budget, candidate): ``*`` marks
the pick; ``within`` is measured peak <= budget; ``best`` marks the lowest measured perplexity among the budget's
measured candidates, and the last column is the pick's perplexity gap to it (acceptance: within 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MiB = 2**20


def run(row: dict, model: str, seq_len: int, steps: int, folder: str) -> dict:
    import yaml

    from hf_memkit.planner.verify import measure

    recipe_file = os.path.join(folder, "recipe.yaml")
    with open(recipe_file, "w") as f:
        f.write(yaml.safe_dump(row["recipe"], sort_keys=False))
    try:
        m = measure(model, recipe_file, steps, seq_len, row["per_device_train_batch_size"],
                    row["gradient_accumulation_steps"], workdir=folder)
    except RuntimeError as exc:
        return {"error": str(exc).splitlines()[-1]}
    return {"peak_rss_bytes": m["measured_bytes"], "perplexity": m["perplexity"], "step_seconds": m["step_seconds"]}


def plan_in_child(model: str, budget: str) -> dict:
    """``memkit plan --json`` in its own process: this one never maps torch, so each training child hands its
    library pages back as it does when a user starts it (see hf_memkit/planner/verify.py)."""
    r = subprocess.run([sys.executable, "-m", "hf_memkit.cli", "plan", "--model", model, "--budget", budget,
                        "--seq-len", "256", "--batch-size", "4", "--json"], capture_output=True, text=True)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", nargs="+", default=["0.8GiB", "1GiB", "1.5GiB", "2GiB", "3GiB"])
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--json")
    ns = ap.parse_args()
    plans = {b: plan_in_child(ns.model, b) for b in ns.budgets}
    done: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_plan-") as tmp:
        for b, p in plans.items():
            for i, s in enumerate(p["fitting"][: ns.top]):
                label = s["candidate"]
                if label not in done:
                    print(f"running {label} ...", file=sys.stderr, flush=True)
                    folder = os.path.join(tmp, str(len(done)))
                    os.makedirs(folder)
                    done[label] = run(s, ns.model, 256, ns.steps, folder)
                    print(f"  {label}: predicted {s['predicted_peak_bytes'] / MiB:,.0f} MiB, {done[label]}",
                          file=sys.stderr, flush=True)
                rows.append({"budget": b, "budget_bytes": p["budget_bytes"], "candidate": label, "pick": i == 0,
                             "predicted_bytes": s["predicted_peak_bytes"],
                             "expected_perplexity": s["expected_perplexity"], **done[label]})
            if not p["fitting"]:
                rows.append({"budget": b, "budget_bytes": p["budget_bytes"], "candidate": "(nothing fits)",
                             "note": p["suggestion"]})
    print(f"\nmemkit plan checked: {ns.model}, 4 x 256 tokens, {ns.steps} steps per candidate (MiB)")
    print("| budget | candidate | predicted | measured peak | within | expected ppl | measured ppl | s/step | pick gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in ns.budgets:
        mine = [r for r in rows if r["budget"] == b]
        ppls = [r["perplexity"] for r in mine if r.get("perplexity") is not None]
        best = min(ppls) if ppls else None
        for r in mine:
            if "note" in r:
                print(f"| {b} | nothing fits: {r['note']} |")
                continue
            if "error" in r:
                print(f"| {b} | {r['candidate']} | failed: {r['error']} |")
                continue
            gap = "" if not r["pick"] or best is None else f"{(r['perplexity'] - best) / best:+.2%}"
            print(f"| {b} | {'* ' if r['pick'] else ''}{r['candidate']}{' (best)' if r['perplexity'] == best else ''}"
                  f" | {r['predicted_bytes'] / MiB:,.0f} | {r['peak_rss_bytes'] / MiB:,.0f} | "
                  f"{'yes' if r['peak_rss_bytes'] <= r['budget_bytes'] else 'NO'} | {r['expected_perplexity']:.3f} | "
                  f"{r['perplexity']:.3f} | {r['step_seconds'] or 0:.2f} | {gap} |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
