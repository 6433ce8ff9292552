"""`evsam-export bench`: alternation, per-process memory, the baselines and the files it writes.
(No timing is asserted: a unit test must not depend on how fast this machine is.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evsam_export.bench import run as bench_run
from evsam_export.bench import tables as bench_tables
from evsam_export.bench import timing as bench_timing


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def infer(self, feeds):
        self.log.append(self.name)


def test_runs_alternate_between_subjects_after_warmup():
    log = []
    subjects = {name: Recorder(name, log) for name in ("a", "b", "c")}
    times = bench_timing.alternate(subjects, {name: None for name in subjects}, runs=3, warmup=2)
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, discarded
    assert log[6:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]  # no subject always first
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_callables_alternate_like_runners_and_summaries_order_their_quantiles():
    """The research scripts time ORT sessions, OpenVINO requests and torch modules as plain callables."""
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("x", "y")}
    times = bench_timing.alternate_calls(calls, runs=4, warmup=1)
    assert log == ["x", "y", "x", "y", "y", "x", "x", "y", "y", "x"]
    assert {name: len(values) for name, values in times.items()} == {"x": 4, "y": 4}
    summary = bench_timing.latency_summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert summary["median"] == 3.0 and summary["min"] == 1.0
    assert summary["min"] <= summary["p10"] < summary["median"] < summary["p90"] <= 5.0


def test_peak_memory_is_the_probe_process_own(l0_export):
    """Linux carries ru_maxrss across fork+exec: a probe started by a process that holds 1.5 GB must still
    report only what loading and running the decoder took."""
    ballast = np.ones(1536 * 2**20 // 8)  # touched: 1.5 GB resident in this process
    decoder_mb = bench_timing.peak_rss_mb(l0_export, "decoder.onnx.fp32", threads=1)
    encoder_mb = bench_timing.peak_rss_mb(l0_export, "encoder.onnx.fp32", threads=1)
    del ballast
    assert decoder_mb is not None and encoder_mb is not None
    assert 50 < decoder_mb < 1200, decoder_mb
    assert decoder_mb != encoder_mb


@pytest.mark.builds  # traces the plain upstream graphs it compares against
def test_bench_command_times_artifacts_and_baselines(copy_export):
    folder = copy_export("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "evsam_export.cli", "bench", str(folder), "--runs", "1", "--warmup", "0", "--no-memory"],
        capture_output=True, text=True, env={**os.environ, "CI": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((folder / "bench.json").read_text())
    assert data["format"] == "evsam-export/bench" and data["variant"] == "l0" and data["threads"] == 2
    rows = {(t["subject"], t["workload"]) for t in data["timings"]}
    for subject in ("encoder.onnx.fp32", "pytorch-eager", "plain-onnx"):
        assert (subject, "batch 1") in rows, subject
    for subject in ("decoder.onnx.fp32", "pytorch-eager"):
        assert (subject, "1 point") in rows and (subject, "16 boxes") in rows
    assert all(t["median_ms"] > 0 and t["min_ms"] <= t["median_ms"] <= t["p90_ms"] for t in data["timings"])
    assert (folder / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plain-onnx" in proc.stdout and "vs torch" in proc.stdout
    assert data["machine"]["cpu_flags"]  # the CPU flags that decide the numbers travel with them
    # Prompt latency as an app waits for it, against upstream's decoder graph traced as it is.
    for workload in bench_run.PROMPT_WORKLOADS:
        for subject in ("plain-decoder", "predictor", "predictor:decoder", "predictor:postprocess"):
            assert (subject, workload) in rows, (subject, workload)
    assert "as fast as the plain upstream decoder graph alone" in proc.stdout


def test_bench_refuses_unknown_baselines(l0_export):
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "bench", str(l0_export), "--compare", "tensorflow"],
                          capture_output=True, text=True, env={**os.environ, "CI": "1"})
    assert proc.returncode == 2 and "unknown baseline 'tensorflow'" in proc.stderr and "Traceback" not in proc.stderr


def test_result_rows_name_what_was_timed_and_compare_within_the_run():
    """`bench --record` rows: one per timing, keyed by variant, weights, subject and workload, ratios from this run."""
    timings = [bench_timing.Timing("encoder.ort.int8", "encoder", "batch 1", 100.0, 110.0, 90.0, 5, 1, peak_rss_mb=200.0),
               bench_timing.Timing("pytorch-eager", "encoder", "batch 1", 300.0, 310.0, 290.0, 5, 1),
               bench_timing.Timing("plain-onnx", "encoder", "batch 1", 150.0, 160.0, 140.0, 5, 1),
               bench_timing.Timing("decoder.onnx.fp32", "decoder", "1 point", 50.0, 55.0, 45.0, 10, 1)]
    result = bench_timing.BenchResult(Path("out/l0"), "l0", 2, timings, weights="/data/efficientvit_sam_l0.pt")
    rows = {key: (table, values) for table, key, values in bench_tables.result_rows(result)}
    table, values = rows["l0-efficientvit_sam_l0.pt-encoder.ort.int8-batch 1"]
    assert table == "encoder-latency" and values["vs_pytorch"] == "3.00x" and values["vs_plain_export"] == "1.50x"
    assert values["peak_rss_mb"] == 200.0 and values["threads"] == 2
    table, values = rows["l0-efficientvit_sam_l0.pt-decoder.onnx.fp32-1 point"]
    assert table == "prompts" and "vs_pytorch" not in values
    assert bench_tables.weights_label("synthetic:3") == "synthetic:3"
    assert bench_tables.weights_label("/c/realistic/ab/efficientvit_sam_l0_realistic.pt") == "realistic"
