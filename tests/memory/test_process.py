"""Readers of the process's memory and the phase-labelled RSS sampler (hf_memkit.memory.process)."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from hf_memkit.memory import process

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc readers are Linux-only")


@linux
def test_readers_return_sane_values():
    st = process.read_status()
    assert {"rss", "peak_rss", "rss_anon", "rss_file"} <= set(st)
    rss = process.rss_bytes()
    assert 10 * 2**20 < rss < 2**40
    assert process.peak_rss_bytes() >= rss * 0.9  # VmHWM is never below the RSS (read a moment apart)
    assert abs(st["rss_anon"] + st["rss_file"] + st.get("rss_shmem", 0) - st["rss"]) < 64 * 2**20
    maps = process.file_mappings()
    assert any("libc" in p or "python" in p for _, _, p in maps)
    smaps = process.mapping_rss()
    assert smaps and sum(m["rss"] for m in smaps) == pytest.approx(process.rss_bytes(), rel=0.2)


@linux
def test_rss_follows_a_touched_allocation():
    before = process.rss_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    assert process.rss_bytes() - before > 48 * 2**20
    del x


@linux
def test_allocator_is_detected_and_its_free_bytes_read():
    name = process.allocator_name()
    assert name in ("glibc", "mimalloc", "jemalloc", "tcmalloc", "unknown")
    stats = process.allocator_stats()
    if name == "glibc":
        assert stats["allocator"] == "glibc" and stats["free_bytes"] >= 0 and stats["in_use_bytes"] > 0
        assert stats["top_bytes"] <= stats["free_bytes"]
    elif name == "mimalloc":
        assert stats["committed_bytes"] > 0 and stats["free_bytes"] is None
    info = process.allocator_info()
    assert "allocator" in info


@linux
def test_file_mapped_storages_are_told_apart(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.ones(1024, 256)}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]  # safetensors maps the file
    own = torch.ones(1024, 256)
    split = process.file_mapped([mapped, own, own.view(-1)])
    assert split["allocator"] == own.nbytes  # a storage once
    if split["file_mapped"]:  # safetensors versions that copy instead of mapping leave everything allocator-owned
        assert split["file_mapped"] == mapped.nbytes and str(tmp_path / "w.safetensors") in split["files"]
        float(mapped.sum())  # touch the pages
        assert process.mapping_resident(split["files"])["rss"] >= mapped.nbytes - 4096


def test_sampler_records_phases_and_the_peak():
    s = process.RssSampler(interval=0.002).start()
    try:
        s.mark("load")
        time.sleep(0.02)
        s.mark("build")
        # above glibc's largest mmap threshold (32 MiB): fresh pages whatever the heap of this process holds free
        # (a 32 MiB tensor could reuse freed heap memory and leave the RSS flat in a process that ran other tests)
        x = torch.ones(96 * 2**20 // 4)
        time.sleep(0.03)
        s.mark("save")
        del x
        time.sleep(0.02)
    finally:
        s.stop()
    tl = s.timeline()
    assert [sp["phase"] for sp in tl["spans"]] == ["load", "build", "save"]
    assert set(tl["by_phase"]) == {"load", "build", "save"}
    assert all(v["samples"] >= 1 for v in tl["by_phase"].values())
    assert len(tl["t"]) == len(tl["rss"]) == len(tl["phase"]) >= 6
    assert tl["by_phase"]["build"]["max_rss_bytes"] >= tl["by_phase"]["load"]["max_rss_bytes"]
    assert tl["peak"]["rss_bytes"] == max(tl["rss"]) and tl["peak"]["phase"] in ("build", "save")
    assert s.first_mark("load")["rss_bytes"] > 0 and s.first_mark("nothing") is None


def test_sampler_halving_keeps_the_peaks():
    s = process.RssSampler(max_samples=100)
    s.mark("a")
    for _ in range(450):
        s.sample()
    assert len(s.t) <= 101
    assert max(s.rss) == s.peak["rss_bytes"] or max(s.rss) >= s.peak["rss_bytes"] - 2**20
    assert s.by_phase()["a"]["samples"] == len(s.t)


def test_many_train_marks_fold_into_train_spans():
    s = process.RssSampler()
    for _ in range(30):
        for p in ("forward", "backward", "optimizer", "train"):
            s.marks.append((0.0, p))
    assert [sp["phase"] for sp in s.spans(max_spans=10)] == ["train"]


@linux
def test_own_file_mapped_copies_mapped_weights_out_of_the_file(tmp_path):
    """A module whose weights map a safetensors file gets its own copies (values and ties kept), so the mapping
    and its resident pages can go."""
    from safetensors.torch import load_file, save_file

    save_file({"a": torch.arange(4096.0).reshape(64, 64), "n": torch.ones(64)}, str(tmp_path / "m.safetensors"))
    sd = load_file(str(tmp_path / "m.safetensors"))
    lin = torch.nn.Linear(64, 64, bias=False)
    lin.weight = torch.nn.Parameter(sd["a"], requires_grad=False)
    model = torch.nn.Sequential(lin, torch.nn.LayerNorm(64))
    model[1].weight = torch.nn.Parameter(sd["n"])
    model.tied = lin  # the same module twice: copied once
    before = process.file_mapped(list(model.parameters()))
    if not before["file_mapped"]:
        pytest.skip("this safetensors version copies instead of mapping")
    copied = process.own_file_mapped_(model)
    assert copied == before["file_mapped"]
    after = process.file_mapped(list(model.parameters()) + list(model.buffers()))
    assert after["file_mapped"] == 0
    torch.testing.assert_close(lin.weight, torch.arange(4096.0).reshape(64, 64), rtol=0, atol=0)
    assert model.tied.weight is lin.weight and not lin.weight.requires_grad and model[1].weight.requires_grad
    assert process.own_file_mapped_(model) == 0  # nothing left to copy


@linux
def test_page_out_file_pages_hands_back_mapped_pages_and_keeps_the_values(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"w": torch.arange(1 << 20, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))
    w = load_file(str(tmp_path / "w.safetensors"))["w"]
    own = torch.ones(1 << 20)
    split = process.file_mapped([w])
    if not split["file_mapped"]:
        pytest.skip("this safetensors version copies instead of mapping")
    float(w.sum())  # resident
    before = process.mapping_resident(split["files"])["rss"]
    advised = process.page_out_file_pages([w, own])  # own memory is never advised
    assert 0 < advised <= w.nbytes and advised >= w.nbytes - 2 * 4096
    after = process.mapping_resident(split["files"])["rss"]
    if after >= before:  # the kernel may refuse MADV_PAGEOUT (before Linux 5.4, some sandboxes)
        pytest.skip("MADV_PAGEOUT had no effect here")
    assert after <= before - advised // 2
    torch.testing.assert_close(w, torch.arange(1 << 20, dtype=torch.float32), rtol=0, atol=0)  # read back
