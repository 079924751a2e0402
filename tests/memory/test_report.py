"""Rendering of the memory report: the process-peak table (predicted beside measured) and the PNG panels."""

from __future__ import annotations

import json

from hf_memkit.memory.report import plot_report, summary_lines

MiB = 2**20


def _report():
    bd = {"runtime": 600 * MiB, "weights": 500 * MiB, "adapter_weights": 10 * MiB, "optimizer_states": 5 * MiB,
          "gradients": 0, "activations": 70 * MiB, "logits": 0, "transients": 60 * MiB, "slack": 180 * MiB,
          "unaccounted": 90 * MiB}
    peak = sum(bd.values())
    pred = dict(bd, gradients=10 * MiB, transients=40 * MiB, unaccounted=96 * MiB)
    return {
        "estimate": {"weights": 500 * MiB, "activations": 70 * MiB, "loss_buffers": 50 * MiB,
                     "predicted_peak": {"peak_bytes": sum(pred.values()), "breakdown": pred, "phase": "backward",
                                        "allocator": "glibc_fixed", "device_peak_bytes": 700 * MiB}},
        "measured": {
            "weights": 500 * MiB, "activations": 70 * MiB, "peak_rss_bytes": peak,
            "timeline": [{"step": 1, "peak_rss_bytes": peak, "activations": 70 * MiB}],
            "process": {
                "peak_rss_bytes": peak, "breakdown": bd, "peak_phase": "forward", "unaccounted_fraction": 0.06,
                "allocator": {"allocator": "glibc", "kind": "glibc_fixed"},
                "rss_timeline": {"t": [0.0, 1.0, 2.0, 3.0], "rss": [600 * MiB, 900 * MiB, peak, 1000 * MiB],
                                 "spans": [{"phase": "load", "start": 0.0, "end": 1.0},
                                           {"phase": "forward", "start": 1.0, "end": 2.0},
                                           {"phase": "backward", "start": 2.0, "end": 3.0}]},
                "peak_step": {"step": 2, "peak_ms": 5.0, "peak_phase": "forward",
                              "timeline": [[0.0, 30 * MiB], [5.0, 160 * MiB], [9.0, 40 * MiB]],
                              "phases": [{"phase": "forward", "start_ms": 0.0, "end_ms": 5.5},
                                         {"phase": "backward", "start_ms": 5.5, "end_ms": 9.0}]},
            },
        },
    }


def test_summary_shows_the_split_and_the_predicted_peak_beside_the_measured():
    text = "\n".join(summary_lines(_report()))
    for label in ("runtime (before the model)", "transients (at the peak)", "allocator slack (glibc_fixed)",
                  "unaccounted", "peak RSS (process)", "peak phase"):
        assert label in text, label
    row = next(ln for ln in text.splitlines() if ln.strip().startswith("peak RSS (process)"))
    assert row.split()[3:5] == ["1511", "1515"]  # predicted, measured (MiB)
    assert "process" not in text.split("process peak")[0]  # the nested dicts are not categories


def test_the_png_has_the_timeline_panels(tmp_path):
    path = plot_report(_report(), str(tmp_path / "m.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    json.dumps(_report(), allow_nan=False)


def test_a_report_without_the_process_part_still_renders(tmp_path):
    r = _report()
    del r["measured"]["process"], r["estimate"]["predicted_peak"]
    assert any("peak RSS (process)" in ln for ln in summary_lines(r))
    plot_report(r, str(tmp_path / "m.png"))
