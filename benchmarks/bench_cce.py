"""Cut Cross-Entropy benchmark: peak extra memory and fwd+bwd time of the linear cross-entropy
``loss(E @ C.T, y)`` with E (N, D) and C (V, D), both trainable, for

* ``plain`` — ``F.cross_entropy`` on materialised logits (``naive_linear_cross_entropy``, the same reference the
  tests compare against),
* ``peer``  — the ``cut-cross-entropy`` package (Apple) with ``impl="torch_compile"`` (its non-Triton path; on CPU
  the Triton kernels cannot run). It is installed only for this benchmark, in a separate ``--target`` folder
  (``--install-peer``), never as a project dependency,
* ``ours``  — ``hf_memkit.ops.linear_cross_entropy.linear_cross_entropy`` (impl auto: torch on CPU).

Memory: every (cell, method) runs in its own subprocess. It allocates the inputs, runs one warm-up fwd+bwd
(one-time costs: torch.compile, BLAS buffers, thread pools), drops the gradients, then measures the baseline RSS,
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and runs fwd+bwd once: ``peak RSS - baseline``
is the extra memory. glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go
back to the OS and the warm-up leaves no heap behind. A second measured run under a TorchDispatchMode counts
live tensor storages op by op ("tensor peak"; not available for the compiled peer). The floor is dE + dC, the
gradients any method must write.

Time: one subprocess per cell runs the methods alternately (plain, peer, ours, plain, ...) after a warm-up each,
and reports the median of ``--repeats`` runs.

    python benchmarks/bench_cce.py --quick                  # the required cell: N=4096, V=49152, D=576, fp32
    python benchmarks/bench_cce.py --n 1024 4096 --v 32000 49152 --d 576
    python benchmarks/bench_cce.py --full                   # the whole grid (hours on 2 CPU cores)
    python benchmarks/bench_cce.py --install-peer           # pip install --no-deps --target PEER_DIR cut-cross-entropy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20
GRID_N = (1024, 4096, 8192)
GRID_V = (32000, 49152, 128256)
GRID_D = (576, 2048)
REQUIRED = (4096, 49152, 576)
METHODS = ("plain", "peer", "ours")
PEER_VERSION = "25.1.1"
DEFAULT_PEER_DIR = Path(os.environ.get("HF_MEMKIT_CACHE", Path.home() / ".cache" / "hf_memkit")) / "bench_cce_peer"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# worker side (runs in a subprocess)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _method(name: str, peer_dir: str | None):
    if name == "plain":
        from hf_memkit.ops.linear_cross_entropy import naive_linear_cross_entropy

        return lambda e, c, y: naive_linear_cross_entropy(e, c, y)
    if name == "ours":
        from hf_memkit.ops.linear_cross_entropy import linear_cross_entropy

        return lambda e, c, y: linear_cross_entropy(e, c, y)
    if name == "peer":
        if peer_dir:
            sys.path.insert(0, str(peer_dir))
        from cut_cross_entropy import linear_cross_entropy as peer

        return lambda e, c, y: peer(e, c, y, impl="torch_compile")
    raise ValueError(name)


def _inputs(n: int, v: int, d: int, dtype: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    e = torch.randn(n, d, generator=g).to(dt).requires_grad_()
    c = (torch.randn(v, d, generator=g) / d**0.5).to(dt).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return e, c, y


def _step(fn, e, c, y) -> float:
    e.grad = c.grad = None
    loss = fn(e, c, y)
    loss.backward()
    return float(loss)


class _LiveTensors:
    """Peak bytes of live tensor storages created by ops, checked after every op (a TorchDispatchMode). Storages
    of ``inputs`` (and views of them, such as ``c.t()``) existed before and are not counted."""

    def __init__(self, inputs=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter.observe(out)
                return out

        self.mode = Mode()
        self.live: dict[int, tuple] = {}
        self.peak = 0
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}

    def observe(self, out) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if s.data_ptr() in self.inputs:
                    continue
                if s.data_ptr() not in self.live or self.live[s.data_ptr()][0].expired():
                    self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(nb for _, nb in self.live.values()))


def worker_memory(a) -> dict:
    import gc

    fn = _method(a.method, a.peer_dir)
    e, c, y = _inputs(a.n, a.v, a.d, a.dtype)
    _step(fn, e, c, y)  # warm-up: compile, BLAS workspaces, thread pools
    e.grad = c.grad = None
    gc.collect()
    base = _status("VmRSS")
    reset = _reset_peak()
    _step(fn, e, c, y)
    peak = _status("VmHWM")
    out = {"rss_extra": peak - base if reset else None, "baseline_rss": base}
    if a.method != "peer":  # the compiled peer allocates inside generated code that a dispatch mode cannot see
        e.grad = c.grad = None
        gc.collect()
        meter = _LiveTensors(inputs=(e, c, y))
        with meter.mode:
            _step(fn, e, c, y)
        out["tensor_peak"] = meter.peak
    return out


def worker_time(a) -> dict:
    import torch

    e, c, y = _inputs(a.n, a.v, a.d, a.dtype)
    fns, times, losses, notes = {}, {}, {}, {}
    for m in a.methods:
        try:
            fns[m] = _method(m, a.peer_dir)
            losses[m] = _step(fns[m], e, c, y)  # warm-up
            times[m] = []
        except Exception as exc:  # the peer may not install or run here: record why
            notes[m] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            fns.pop(m, None)
    for _ in range(a.repeats):
        for m in fns:  # alternating, so that machine load drifts hit every method alike
            t0 = time.perf_counter()
            _step(fns[m], e, c, y)
            times[m].append(time.perf_counter() - t0)
    return {"median_s": {m: statistics.median(t) for m, t in times.items()}, "runs_s": times, "loss": losses,
            "errors": notes, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# driver side


def _run_worker(kind: str, args: list[str], timeout: float) -> dict:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": tail[-1][:200] if tail else f"exit code {proc.returncode}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": "the worker printed no result"}


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def install_peer(peer_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(peer_dir),
           f"cut-cross-entropy=={PEER_VERSION}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def bench_cell(n: int, v: int, d: int, a) -> dict:
    dtype_bytes = 4 if a.dtype == "float32" else 2
    floor = (n * d + v * d) * dtype_bytes
    cell = {"n": n, "v": v, "d": d, "dtype": a.dtype, "floor": floor, "methods": {}}
    need = n * v * 4 * 4 + floor * 3  # plain: logits, log-softmax, two gradient buffers
    if "plain" in a.methods and need > 0.85 * _available_bytes():
        cell["skipped"] = f"plain path needs ~{need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB available"
        return cell
    common = ["--n", str(n), "--v", str(v), "--d", str(d), "--dtype", a.dtype]
    if a.peer_dir:
        common += ["--peer-dir", str(a.peer_dir)]
    timing = _run_worker("time", common + ["--repeats", str(a.repeats), "--methods", *a.methods], a.timeout)
    cell["time"] = timing
    for m in a.methods:
        if m in timing.get("errors", {}):
            cell["methods"][m] = {"error": timing["errors"][m]}
            continue
        cell["methods"][m] = _run_worker("memory", common + ["--method", m], a.timeout)
    return cell


def _fmt_mib(x) -> str:
    return "-" if x is None else f"{x / MiB:,.0f}"


def table(cells: list[dict]) -> str:
    head = (f"{'N':>6} {'V':>7} {'D':>5} {'method':<6} {'extra RSS':>10} {'tensor pk':>10} {'floor':>7} "
            f"{'above floor':>12} {'fwd+bwd s':>10} {'x plain':>8}  note")
    lines = [head, "-" * len(head)]
    for cell in cells:
        if "skipped" in cell:
            lines.append(f"{cell['n']:>6} {cell['v']:>7} {cell['d']:>5} {'all':<6}  skipped: {cell['skipped']}")
            continue
        med = cell.get("time", {}).get("median_s", {})
        for m, r in cell["methods"].items():
            if "error" in r:
                lines.append(f"{cell['n']:>6} {cell['v']:>7} {cell['d']:>5} {m:<6} {'-':>10} {'-':>10} "
                             f"{_fmt_mib(cell['floor']):>7} {'-':>12} {'-':>10} {'-':>8}  {r['error']}")
                continue
            extra = r.get("rss_extra")
            above = None if extra is None else extra - cell["floor"]
            t = med.get(m)
            ratio = f"{t / med['plain']:.2f}" if t and med.get("plain") else "-"
            lines.append(f"{cell['n']:>6} {cell['v']:>7} {cell['d']:>5} {m:<6} {_fmt_mib(extra):>10} "
                         f"{_fmt_mib(r.get('tensor_peak')):>10} {_fmt_mib(cell['floor']):>7} {_fmt_mib(above):>12} "
                         f"{t if t is None else round(t, 2)!s:>10} {ratio:>8}")
    return "\n".join(lines)


def targets(cells: list[dict]) -> list[str]:
    out = []
    for cell in cells:
        if (cell["n"], cell["v"], cell["d"]) != REQUIRED or cell["dtype"] != "float32" or "skipped" in cell:
            continue
        ms, med = cell["methods"], cell.get("time", {}).get("median_s", {})
        if "rss_extra" in ms.get("ours", {}) and "rss_extra" in ms.get("plain", {}):
            ours = ms["ours"]["rss_extra"] - cell["floor"]
            plain = ms["plain"]["rss_extra"] - cell["floor"]
            ok = ours <= 0.03 * plain
            out.append(f"memory: ours {ours / MiB:,.0f} MiB above the floor = {100 * ours / plain:.2f}% of plain's "
                       f"{plain / MiB:,.0f} MiB (target <= 3%): {'MET' if ok else 'MISSED'}")
        if med.get("ours") and med.get("plain"):
            ratio = med["ours"] / med["plain"]
            out.append(f"time: ours {med['ours']:.2f} s vs plain {med['plain']:.2f} s = {ratio:.3f}x "
                       f"(target <= 1.05x): {'MET' if ratio <= 1.05 else 'MISSED'}")
        if med.get("peer"):
            out.append(f"peer (cut-cross-entropy torch_compile): {med['peer']:.2f} s; ours/peer = "
                       f"{med['ours'] / med['peer']:.3f}x" if med.get("ours") else "")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the required cell N=4096, V=49152, D=576")
    p.add_argument("--full", action="store_true", help="the whole N x V x D grid")
    p.add_argument("--n", type=int, nargs="+", help=f"token counts (grid: {GRID_N})")
    p.add_argument("--v", type=int, nargs="+", help=f"vocabulary sizes (grid: {GRID_V})")
    p.add_argument("--d", type=int, nargs="+", help=f"hidden sizes (grid: {GRID_D})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median; at least 5)")
    p.add_argument("--peer-dir", type=Path, default=DEFAULT_PEER_DIR,
                   help="folder holding the cut-cross-entropy package (pip --target)")
    p.add_argument("--install-peer", action="store_true", help="install cut-cross-entropy into --peer-dir first")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker subprocess")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        a.n, a.v, a.d = a.n[0], a.v[0], a.d[0]
        result = worker_time(a) if a.worker == "time" else worker_memory(a)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if a.install_peer:
        install_peer(a.peer_dir)
    if "peer" in a.methods and not (a.peer_dir / "cut_cross_entropy").is_dir():
        print(f"note: cut-cross-entropy is not in {a.peer_dir}; run with --install-peer (the peer rows will show "
              "the import error)", file=sys.stderr)
    if a.repeats < 5:
        p.error("--repeats must be at least 5 (the benchmark reports medians of >= 5 alternating runs)")
    if a.full:
        ns, vs, ds = GRID_N, GRID_V, GRID_D
    elif a.quick or not (a.n or a.v or a.d):
        ns, vs, ds = (REQUIRED[0],), (REQUIRED[1],), (REQUIRED[2],)
    else:
        ns, vs, ds = a.n or GRID_N, a.v or GRID_V, a.d or GRID_D

    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, dtype {a.dtype}, "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    cells = []
    for d in ds:
        for v in vs:
            for n in ns:
                t0 = time.time()
                cells.append(bench_cell(n, v, d, a))
                print(f"# cell N={n} V={v} D={d} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(cells))
    for line in targets(cells):
        if line:
            print(line)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    if a.json:
        a.json.write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
