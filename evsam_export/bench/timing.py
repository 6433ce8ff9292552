"""Timing helpers of the benchmarks: feeds, alternated repetitions across subjects, latency summaries, and peak
resident memory measured in a separate process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evsam_export import contract


@dataclass
class Timing:
    subject: str
    component: str
    workload: str  # e.g. "batch 1", "1 point", "16 boxes"
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    items: int  # images or prompt sets per call (throughput = items / median)
    load_s: float = 0.0
    peak_rss_mb: float | None = None
    note: str = ""  # how it was timed when not wall time in this process (browser subjects)

    @property
    def per_second(self) -> float:
        return self.items / (self.median_ms / 1000.0)


@dataclass
class BenchResult:
    folder: Path
    variant: str
    threads: int
    timings: list[Timing] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    weights: str = ""  # the manifest's weights spec: synthetic:SEED, or the checkpoint it was exported from

    def to_json(self) -> dict:
        return {
            "format": "evsam-export/bench",
            "variant": self.variant,
            "threads": self.threads,
            "machine": self.machine,
            "timings": [dict(asdict(t), per_second=t.per_second) for t in self.timings],
        }


def encoder_feed(size: int, batch: int, raw_image: bool = False) -> dict:
    """A host-preprocessed batch, or for an app-profile encoder (raw_image) the prompt workloads' photo."""
    if raw_image:
        return {contract.INPUT_IMAGE: prompt_image()}
    return {"input_image": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}


def takes_raw_image(runner) -> bool:
    """An app-profile encoder: one uint8 HWC image, no batch axis."""
    return runner.inputs[0].dtype == "uint8"


def decoder_feed(runner_inputs, prompts: int, boxes: bool) -> dict:
    rng = np.random.default_rng(1)
    if boxes:
        coords = np.sort(rng.uniform(0, 1000, (prompts, 2, 2)), axis=1).astype(np.float32)
        labels = np.tile(np.array([[2.0, 3.0]], np.float32), (prompts, 1))
    else:
        coords = np.concatenate([rng.uniform(0, 1000, (prompts, 1, 2)), np.zeros((prompts, 1, 2))], axis=1).astype(np.float32)
        labels = np.tile(np.array([[1.0, -1.0]], np.float32), (prompts, 1))
    embeddings = rng.standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32)
    return contract.decoder_feeds(runner_inputs, embeddings, coords, labels, original_size=(768, 1024))


def alternate(subjects: dict, feeds: dict, runs: int, warmup: int) -> dict[str, list[float]]:
    """Warm up every subject, then time `runs` rounds of one call per subject, in alternating order."""

    def timed(name: str) -> float:
        own_clock = getattr(subjects[name], "timed_run_ms", None)
        if own_clock is not None:
            return own_clock(feeds[name])
        started = time.perf_counter()
        subjects[name].infer(feeds[name])
        return (time.perf_counter() - started) * 1000.0

    for name in subjects:
        for _ in range(warmup):
            timed(name)
    times = {name: [] for name in subjects}
    order = list(subjects)
    for round_index in range(runs):
        for name in order if round_index % 2 == 0 else reversed(order):
            times[name].append(timed(name))
    return times


class Call:
    """A zero-argument callable in the shape `alternate` times (an object with `infer(feeds)`)."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call

    def infer(self, feeds) -> object:
        return self.call()


def alternate_calls(calls: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """`alternate` over zero-argument callables: an ORT session run, an OpenVINO request, a torch forward."""
    return alternate({name: Call(call) for name, call in calls.items()}, dict.fromkeys(calls), runs, warmup)


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    """Median, p10, p90 and min of one subject's timed runs, in ms."""
    array = np.asarray(values_ms, dtype=np.float64)
    return {"median": float(np.median(array)), "p10": float(np.percentile(array, 10)),
            "p90": float(np.percentile(array, 90)), "min": float(array.min())}


def timing_of(subject, component, workload, values, items, load_s, note: str = "") -> Timing:
    summary = latency_summary(values)
    return Timing(subject, component, workload, summary["median"], summary["p90"], summary["min"], len(values), items, round(load_s, 3),
                  note=note)


def timing_note(runner) -> str:
    """How a browser runner's times were taken ("onnxruntime-web 1.30.0 wasm, 2 threads, in-page session.run")."""
    if getattr(runner, "runtime", "") != "onnxruntime-web":
        return ""
    threads = f", {runner.threads} thread{'s' if runner.threads != 1 else ''}" if runner.threads else ""
    isolated = "" if runner.info.get("crossOriginIsolated") else " (page not cross-origin isolated)"
    return f"{runner.runtime} {runner.info.get('version')} {runner.execution_provider}{threads}, in-page session.run{isolated}"


MEMORY_PROBE = r"""
import json, resource, sys, numpy as np
from pathlib import Path
from evsam_export.manifest import read_manifest
from evsam_export.runners import runner_for_artifact
from evsam_export.bench.timing import encoder_feed, decoder_feed
folder, artifact_id, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
manifest = read_manifest(folder)
artifact = manifest.artifact(artifact_id)
runner = runner_for_artifact(folder, artifact, threads=threads).load()
feed = (encoder_feed(manifest.encoder_size, 1, runner.inputs[0].dtype == "uint8") if artifact.component == "encoder"
        else decoder_feed(runner.inputs, 1, False))
runner.infer(feed)
# VmHWM is this process's own high-water mark. ru_maxrss is not: Linux carries it across fork+exec, so a
# probe started from a bench holding every session reported the bench's peak for every artifact.
status = Path("/proc/self/status")
hwm = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
peak_kb = int(hwm[0]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_mb": peak_kb / 1024}))
"""


def peak_rss_mb(folder: Path, artifact_id: str, threads: int) -> float | None:
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), artifact_id, str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return round(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"], 1)


# Prompt latency is timed on a 1024x768 photo (H, W) with what an app sends: one foreground click
# (multimask) and 16 boxes in one call (one mask each).
PROMPT_IMAGE_SIZE = (768, 1024)
PLAIN_DECODER = "plain-decoder"


def prompt_image(size: tuple[int, int] = PROMPT_IMAGE_SIZE) -> np.ndarray:
    """A deterministic photo-like RGB image: smooth gradients plus noise (speed does not depend on content)."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = np.random.default_rng(3).normal(0, 20, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
