"""The allocator choice and the library page-out (hf_memkit.memory.host_memory). Allocator settings are
process-wide and permanent, so every behavioural check runs in a child process."""

import os
import subprocess
import sys
import textwrap

import pytest

from hf_memkit.memory import host_memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc/mimalloc/madvise checks are Linux-only")

# 256 MiB of 4 MiB blocks freed after glibc's dynamic threshold was raised past them: how much RSS comes back
FREED = textwrap.dedent("""
    import ctypes, sys, torch
    from hf_memkit.memory.host_memory import active, release_host_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    release_host_memory()
    for _ in range(3):
        torch.empty(4 << 20).fill_(1)
    keep = [torch.empty(1 << 20).fill_(1) for _ in range(64)]
    hold = torch.empty(128 * 1024).fill_(1)  # pins the heap top
    before = rss()
    del keep
    if active() == "mimalloc":  # mimalloc purges after a short delay, when it next runs; make it run now
        ctypes.CDLL("libmimalloc.so.3").mi_collect(1)
    print(active(), (before - rss()) / 2**20)
""")


def _child(code: str, env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1].split()


def test_an_unknown_allocator_is_refused_with_the_choices():
    with pytest.raises(host_memory.AllocatorError, match="unknown allocator 'jemalloc'.*auto, mimalloc, glibc, system"):
        host_memory.choice("jemalloc")


def test_the_environment_variable_chooses_when_no_flag_is_given(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "GLIBC")
    assert host_memory.choice() == "glibc"
    assert host_memory.choice("system") == "system"


@linux
def test_glibc_gives_freed_blocks_back_and_the_stock_allocator_does_not():
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LD_PRELOAD"))}
    kind, freed = _child(FREED, {**base, host_memory.ENV: "glibc"})
    assert kind == "glibc" and float(freed) > 200, (kind, freed)
    kind, freed = _child(FREED, {**base, host_memory.ENV: "system"})
    assert kind == "glibc" and float(freed) < 100, (kind, freed)


@linux
@pytest.mark.skipif(host_memory.mimalloc_library() is None, reason="cmeel-mimalloc is not installed")
def test_a_child_started_with_mimalloc_runs_on_it_and_returns_freed_memory():
    env = host_memory.child_env({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "auto")
    assert host_memory.mimalloc_library() in env["LD_PRELOAD"].split(":")
    kind, freed = _child(FREED, env)
    assert kind == "mimalloc" and float(freed) > 200, (kind, freed)
    # describe() in that process names the allocator and its library (what the run report records)
    out = _child("import json; from hf_memkit.memory.host_memory import describe; d = describe(); "
                 "print(d['allocator'], bool(d.get('library')))", env)
    assert out == ["mimalloc", "True"]


def test_asking_for_mimalloc_in_process_names_the_way_to_start_it(monkeypatch):
    monkeypatch.setattr(host_memory, "active", lambda: "glibc")
    with pytest.raises(host_memory.AllocatorError, match="memkit train.*memkit run"):
        host_memory.release_host_memory("mimalloc")


def test_mimalloc_asked_for_but_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(host_memory, "mimalloc_library", lambda: None)
    with pytest.raises(host_memory.AllocatorError, match="cmeel-mimalloc"):
        host_memory.wants_mimalloc("mimalloc")
    assert host_memory.wants_mimalloc("auto") is False  # auto falls back to glibc quietly


@linux
def test_library_pages_are_handed_back_and_weights_files_are_not(tmp_path):
    """A file mapped under a shared-object name is paged out; a mmapped data file (as safetensors weights are)
    keeps its pages. (Real libraries are shared with the pytest process here, and the kernel only drops pages no
    other process maps, so stand-in files are used.)"""
    code = textwrap.dedent(f"""
        import mmap
        from hf_memkit.memory.host_memory import page_out_libraries
        def rss_of(path):
            rss, cur = 0, None
            for line in open("/proc/self/smaps"):
                parts = line.split()
                if "-" in parts[0] and not line.startswith(("Rss", "Size")) and len(parts) >= 5 and ":" not in parts[0]:
                    cur = parts[5] if len(parts) > 5 else None
                elif line.startswith("Rss:") and cur == path:
                    rss += int(parts[1]) * 1024
            return rss
        maps = []
        for name in ("libstandin.so.1", "weights.safetensors"):
            path = {str(tmp_path)!r} + "/" + name
            with open(path, "wb") as f:
                f.write(b"x" * (32 << 20))
            fh = open(path, "rb")
            m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
            sum(m[i] for i in range(0, len(m), 4096))  # touch every page
            maps.append((path, m, fh))
        lib, weights = (p for p, _, _ in maps)
        before = rss_of(lib), rss_of(weights)
        released = page_out_libraries()
        print(released >> 20, before[0] >> 20, rss_of(lib) >> 20, before[1] >> 20, rss_of(weights) >> 20)
    """)
    released, lib_before, lib_after, w_before, w_after = (int(x) for x in _child(code, dict(os.environ)))
    if lib_before == lib_after == 32 and released == 0:
        pytest.skip("madvise(MADV_PAGEOUT) is not supported by this kernel (Linux < 5.4)")
    assert lib_before == 32 and lib_after <= 1 and released >= 31
    assert w_before == w_after == 32
