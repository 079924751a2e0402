"""Fault tests: `memkit compress` killed (SIGKILL) at named phases leaves the previous export intact or nothing —
never a half-written folder or new weights under old metadata. The child stops at a phase through the
HF_MEMKIT_TEST_PAUSE hook (hf_memkit.atomic.pause_point) and is killed there."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hf_memkit.export.hub import EXPORT_INFO, check_manifest

OLD = "memkit: 1\ncompress: [{rtn: {bits: 4, group_size: 32, symmetric: true}}]\n"
NEW = "memkit: 1\ncompress: [{rtn: {bits: 2, group_size: 32, symmetric: true}}, {lorc: {rank: 2}}]\n"


@pytest.fixture(scope="module")
def old_export(tmp_path_factory):
    from hf_memkit.quant.oneshot import compress

    root = tmp_path_factory.mktemp("old")
    (root / "old.yaml").write_text(OLD)
    compress("tiny", str(root / "old.yaml"), str(root / "out"), evaluate=False, log=lambda _m: None)
    return root / "out"


def _bits(folder):
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return qc["config_groups"]["group_0"]["weights"]["num_bits"]


def _kill_at(phase, out, recipe, timeout=300):
    env = {**os.environ, "HF_MEMKIT_TEST_PAUSE": phase, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hf_memkit.cli", "compress", "tiny", "--recipe", str(recipe),
                             "-o", str(out), "--no-eval", "--overwrite"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env)
    deadline, seen = time.monotonic() + timeout, b""
    try:
        while f"HF_MEMKIT_PAUSED {phase}".encode() not in seen:
            assert proc.poll() is None, f"the child ended before {phase}: {seen[-2000:].decode(errors='replace')}"
            assert time.monotonic() < deadline, f"no pause at {phase}"
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                seen += os.read(proc.stderr.fileno(), 65536)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def _state(out, old_files):
    """'old' when `out` is exactly the previous complete export, 'absent' when there is none."""
    if not out.exists():
        return "absent"
    data = check_manifest(str(out), hashes=True)  # every file there, with the hash the manifest lists
    files = sorted(os.path.relpath(os.path.join(r, f), out) for r, _d, fs in os.walk(out) for f in fs)
    assert files == sorted({*data["files"], *data["reports"], EXPORT_INFO})  # nothing merged in
    assert data["files"] == old_files and _bits(out) == 4
    return "old"


@pytest.mark.slow
@pytest.mark.parametrize("phase,expected", [("compress:loaded", "old"), ("export:weights", "old"),
                                            ("export:manifest", "old"), ("publish", "absent")])
def test_compress_killed_at_a_phase_leaves_the_old_export_or_nothing(phase, expected, old_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(old_export, out)
    old_files = check_manifest(str(out), hashes=True)["files"]
    (tmp_path / "new.yaml").write_text(NEW)
    _kill_at(phase, out, tmp_path / "new.yaml")
    assert _state(out, old_files) == expected
    # the next write (or `memkit export`) first puts a folder moved aside by a kill back in place
    from hf_memkit.export.checkpoint import check_output_dir

    check_output_dir(str(out))
    assert _state(out, old_files) == "old"
    # and a complete run then replaces it whole
    from hf_memkit.cli import main

    assert main(["compress", "tiny", "--recipe", str(tmp_path / "new.yaml"), "-o", str(out), "--no-eval",
                 "--overwrite"]) == 0
    assert _bits(out) == 2 and (out / "lorc_adapter").is_dir()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.slow
def test_compress_killed_mid_write_into_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "new.yaml").write_text(NEW)
    _kill_at("export:weights", out, tmp_path / "new.yaml")
    assert not out.exists()  # only a hidden staging folder, which the next write removes
