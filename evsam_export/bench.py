"""`evsam-export bench DIR`: honest latency, throughput, memory and load time of every artifact.

Method: every subject is loaded first, warm-up runs are discarded, then repetitions are *alternated*
across subjects (A B C A B C ...) inside one process, so machine noise hits all of them alike; we report
median, p90 and min, and compare subjects as ratios. Baselines in the same run: PyTorch eager fp32 and a
*plain* export (torch.onnx.export at opset 17, no graph work: what the official export script produces).
Prompt latency as an app waits for it (`Predictor.predict`: decoder and host post-processing) is timed
against the plain export of upstream's decoder alone, on the same embeddings and prompts (`prompt_bench`).
Peak resident memory is measured in a separate process per subject (load + one inference).
A subject with `timed_run_ms(feeds)` (the browser runner) reports its own time, measured where it runs (in
the page: onnxruntime-web's `session.run`, no transfer to Python), with its threads in the Timing's note.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.manifest import cpu_flags, cpu_model, package_versions, read_manifest
from evsam_export.model.variants import get_variant
from evsam_export.progress import Reporter


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


def _encoder_feed(size: int, batch: int, raw_image: bool = False) -> dict:
    """A host-preprocessed batch, or for an app-profile encoder (raw_image) the prompt workloads' photo."""
    if raw_image:
        return {contract.INPUT_IMAGE: prompt_image()}
    return {"input_image": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}


def takes_raw_image(runner) -> bool:
    """An app-profile encoder: one uint8 HWC image, no batch axis."""
    return runner.inputs[0].dtype == "uint8"


def _decoder_feed(runner_inputs, prompts: int, boxes: bool) -> dict:
    rng = np.random.default_rng(1)
    if boxes:
        coords = np.sort(rng.uniform(0, 1000, (prompts, 2, 2)), axis=1).astype(np.float32)
        labels = np.tile(np.array([[2.0, 3.0]], np.float32), (prompts, 1))
    else:
        coords = np.concatenate([rng.uniform(0, 1000, (prompts, 1, 2)), np.zeros((prompts, 1, 2))], axis=1).astype(np.float32)
        labels = np.tile(np.array([[1.0, -1.0]], np.float32), (prompts, 1))
    embeddings = rng.standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32)
    return contract.decoder_feeds(runner_inputs, embeddings, coords, labels, original_size=(768, 1024))


def plain_export(model, variant, folder: Path) -> Path:
    """The official export script's encoder: torch.onnx.export, opset 17, no simplification or rewrites."""
    import torch

    from evsam_export.model.sam import EncoderGraph

    path = folder / "encoder.plain.onnx"
    module = EncoderGraph(model).eval()
    example = torch.zeros(1, 3, variant.encoder_size, variant.encoder_size)
    torch.onnx.export(module, (example,), str(path), input_names=["input_image"], output_names=["image_embeddings"],
                      dynamic_axes={"input_image": {0: "batch"}, "image_embeddings": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def plain_decoder_export(model, folder: Path) -> Path:
    """The decoder a user gets from upstream code with torch.onnx.export, the baseline of prompt latency:
    prompt encoder and mask decoder traced as they are (branch-free point embedding, the official
    deployment's IO: low-res logits and IoU of all four tokens, no image-size input), opset 17, no
    simplification and no graph passes."""
    import torch

    from evsam_export.model.sam import DecoderGraph

    spec = contract.decoder_spec("tensorrt")
    path = folder / "decoder.plain.onnx"
    module = DecoderGraph(model, "tensorrt").eval()
    example = contract.sample_feeds(spec, batch=2, num_points=3)
    with torch.no_grad():
        torch.onnx.export(module, tuple(torch.from_numpy(example[n]) for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=17, dynamo=False)
    return path


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


class _Call:
    """A zero-argument callable in the shape `alternate` times (an object with `infer(feeds)`)."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call

    def infer(self, feeds) -> object:
        return self.call()


def alternate_calls(calls: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, list[float]]:
    """`alternate` over zero-argument callables: an ORT session run, an OpenVINO request, a torch forward."""
    return alternate({name: _Call(call) for name, call in calls.items()}, dict.fromkeys(calls), runs, warmup)


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    """Median, p10, p90 and min of one subject's timed runs, in ms."""
    array = np.asarray(values_ms, dtype=np.float64)
    return {"median": float(np.median(array)), "p10": float(np.percentile(array, 10)),
            "p90": float(np.percentile(array, 90)), "min": float(array.min())}


def _timing(subject, component, workload, values, items, load_s, note: str = "") -> Timing:
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
from evsam_export.bench import _encoder_feed, _decoder_feed
folder, artifact_id, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
manifest = read_manifest(folder)
artifact = manifest.artifact(artifact_id)
runner = runner_for_artifact(folder, artifact, threads=threads).load()
feed = (_encoder_feed(manifest.encoder_size, 1, runner.inputs[0].dtype == "uint8") if artifact.component == "encoder"
        else _decoder_feed(runner.inputs, 1, False))
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


def run_bench(
    folder: Path,
    threads: int = 2,
    runs: int = 10,
    warmup: int = 2,
    batches: tuple[int, ...] = (1,),
    compare: tuple[str, ...] = ("pytorch", "plain-onnx"),
    memory: bool = True,
    reporter: Reporter | None = None,
) -> BenchResult:
    from evsam_export.errors import RuntimeUnavailable
    from evsam_export.runners import runner_for_artifact
    from evsam_export.runners.ort_runner import OrtRunner

    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    variant = get_variant(manifest.variant)
    result = BenchResult(
        folder, variant.name, threads, machine={"cpu": cpu_model(), "cpu_flags": cpu_flags(), "packages": package_versions()},
        weights=str(manifest.weights.get("spec", "")),
    )
    encoders, decoders, load_times = {}, {}, {}
    for artifact in manifest.artifacts:
        if artifact.facts.get("kit_only") or artifact.component not in ("encoder", "decoder"):
            continue
        try:
            runner = runner_for_artifact(folder, artifact, threads=threads)
            started = time.perf_counter()
            runner.load()
            load_times[artifact.id] = time.perf_counter() - started
        except RuntimeUnavailable as exc:
            reporter.line(f"skip {artifact.id}: {exc.message}")
            continue
        (encoders if artifact.component == "encoder" else decoders)[artifact.id] = runner
    scratch = Path(tempfile.mkdtemp(prefix="evsam-bench-"))
    if compare:
        import torch

        from evsam_export.model.checkpoint import load_model
        from evsam_export.runners.torch_runner import torch_reference_runners

        torch.set_num_threads(threads)
        model, _ = load_model(variant, manifest.weights["spec"])
        torch_encoder, torch_decoder = torch_reference_runners(model, variant, manifest.model.get("decoder_profile", "sam"))
        if "pytorch" in compare:
            for name, runner, table in (("pytorch-eager", torch_encoder, encoders), ("pytorch-eager", torch_decoder, decoders)):
                started = time.perf_counter()
                table[name] = runner.load()
                load_times[(name, id(table))] = time.perf_counter() - started
        if "plain-onnx" in compare:
            with reporter.step("plain export (torch.onnx.export, opset 17, no graph work)"):
                path = plain_export(model, variant, scratch)
            runner = OrtRunner(path, torch_encoder.inputs, torch_encoder.outputs, "plain-onnx", threads=threads)
            started = time.perf_counter()
            encoders["plain-onnx"] = runner.load()
            load_times["plain-onnx"] = time.perf_counter() - started

    raw = {name for name, runner in encoders.items() if takes_raw_image(runner)}
    single = set(raw)  # subjects that take one image per call
    for name in sorted(raw & {a.id for a in manifest.artifacts if a.target == "onnx"}):
        # The app graph's own host encoder (its preprocessing cut off) and the host preprocessing it replaces,
        # so the app encoder's time splits into graph preprocessing vs encoder within one run.
        from evsam_export.export.app_encoder import strip_preprocessing
        from evsam_export.model.processing import preprocess_image

        stripped = strip_preprocessing(folder / manifest.artifact(name).path, scratch / f"{name}.host.onnx", variant.encoder_size)
        spec = contract.encoder_spec(variant, dynamic_batch=False)
        started = time.perf_counter()
        encoders[f"{name} without preprocessing"] = OrtRunner(stripped, list(spec.inputs), list(spec.outputs), threads=threads).load()
        load_times[f"{name} without preprocessing"] = time.perf_counter() - started
        single.add(f"{name} without preprocessing")  # traced with batch 1, like the app graph
        image = prompt_image()
        encoders[HOST_PREPROCESS] = _Call(lambda image=image: preprocess_image(image, variant.encoder_size))
        single.add(HOST_PREPROCESS)

    def load_of(name, table):
        return load_times.get(name, load_times.get((name, id(table)), 0.0))

    for batch in batches:
        subjects = {name: runner for name, runner in encoders.items() if batch == 1 or name not in single}
        if len(subjects) < len(encoders):
            reporter.line(f"batch {batch}: {', '.join(sorted(single))} take one image per call: timed at batch 1 only")
        with reporter.step(f"encoder latency, batch {batch}, {runs} alternated runs over {len(subjects)} subjects"):
            feeds = {name: _encoder_feed(variant.encoder_size, batch, name in raw) for name in subjects}
            times = alternate(subjects, feeds, runs, warmup)
        result.timings += [_timing(n, "encoder", f"batch {batch}", t, batch, load_of(n, encoders), timing_note(encoders[n]))
                           for n, t in times.items()]
    for workload, prompts, boxes in (("1 point", 1, False), ("16 boxes", 16, True)):
        with reporter.step(f"decoder latency, {workload}"):
            feeds = {name: _decoder_feed(runner.inputs, prompts, boxes) for name, runner in decoders.items()}
            times = alternate(decoders, feeds, runs * 2, warmup)
        result.timings += [_timing(n, "decoder", workload, t, prompts, load_of(n, decoders), timing_note(decoders[n]))
                           for n, t in times.items()]
    if "plain-onnx" in compare:
        with reporter.step("plain decoder export (upstream's decoder traced as it is, no graph work)"):
            plain_decoder = plain_decoder_export(model, scratch)
        result.timings += prompt_bench(folder, plain_decoder, threads, runs, warmup, reporter)
    if memory:  # a browser subject's memory is the browser's, not the probe process's
        in_process = {a.id for a in manifest.artifacts if a.target != "web"}
        for timing in result.timings:
            if timing.subject in in_process:
                timing.peak_rss_mb = peak_rss_mb(folder, timing.subject, threads)
    for runner in list(encoders.values()) + list(decoders.values()):
        if not isinstance(runner, _Call):
            runner.close()
    return result


# Prompt latency is timed on a 1024x768 photo (H, W) with what an app sends: one foreground click
# (multimask) and 16 boxes in one call (one mask each).
PROMPT_IMAGE_SIZE = (768, 1024)
PROMPT_WORKLOADS = ("app: 1 click", "app: 16 boxes")
PLAIN_DECODER = "plain-decoder"
HOST_PREPROCESS = "host preprocess"  # processing.preprocess_image on the app workload's photo (app folders)
PREDICTOR = "predictor"
# The predictor forced onto the single-graph decoder (split_decoder=False), to time the split decoder's gain.
PREDICTOR_SINGLE_GRAPH = "predictor-single-graph"


def prompt_image(size: tuple[int, int] = PROMPT_IMAGE_SIZE) -> np.ndarray:
    """A deterministic photo-like RGB image: smooth gradients plus noise (speed does not depend on content)."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = np.random.default_rng(3).normal(0, 20, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def prompt_requests(size: tuple[int, int] = PROMPT_IMAGE_SIZE) -> dict[str, dict]:
    """Predictor.predict keyword arguments of each prompt workload, in original-image pixels."""
    height, width = size
    rng = np.random.default_rng(4)
    corners = np.sort(rng.uniform(0, 1, (16, 2, 2)) * np.array([width, height]), axis=1)
    return {
        PROMPT_WORKLOADS[0]: {"point_coords": [[0.4 * width, 0.55 * height]], "point_labels": [1], "multimask_output": True},
        PROMPT_WORKLOADS[1]: {"boxes": corners.reshape(16, 4), "multimask_output": False},
    }


def prompt_bench(folder: Path, plain_decoder: Path, threads: int, runs: int, warmup: int,
                 reporter: Reporter | None = None, predictors: dict[str, dict] | None = None) -> list[Timing]:
    """Prompt latency as an app sees it: `Predictor.predict` (decoder graph + host post-processing, masks at
    the original size) against the plain upstream decoder graph alone on the same embeddings and tokens,
    alternated in one process. `predictors`: subject name -> Predictor options (default one `predictor` with
    its own choices). `NAME:decoder` and `NAME:postprocess` split each predictor's time (from `Prediction.meta`
    of the timed calls)."""
    from contextlib import ExitStack

    from evsam_export.model import processing
    from evsam_export.runners.ort_runner import OrtRunner
    from evsam_export.runtime import Predictor

    reporter = reporter or Reporter()
    spec = contract.decoder_spec("tensorrt")
    timings = []
    with ExitStack() as stack:
        plain = stack.enter_context(OrtRunner(plain_decoder, list(spec.inputs), list(spec.outputs), PLAIN_DECODER, threads=threads))
        subjects = {name: stack.enter_context(Predictor(folder, threads=threads, **options))
                    for name, options in (predictors or {PREDICTOR: {}}).items()}
        for name, predictor in subjects.items():
            started = time.perf_counter()
            predictor.set_image(prompt_image())
            set_image_ms = (time.perf_counter() - started) * 1000
            decoder = "+".join(predictor.info["split_decoder"] or [predictor.decoder_artifact.id])
            reporter.line(f"{name}: set_image (encoder + preprocessing, {PROMPT_IMAGE_SIZE[1]}x{PROMPT_IMAGE_SIZE[0]}) "
                          f"{set_image_ms:.0f} ms; decoder {decoder}")
        first = next(iter(subjects.values()))
        for workload, request in prompt_requests().items():
            points = request.get("point_coords")
            tokens = processing.build_prompt_tokens(
                first.geometry, None if points is None else np.asarray(points), request.get("point_labels"), request.get("boxes"))
            feeds = contract.decoder_feeds(plain, first.image_embeddings, tokens.point_coords, tokens.point_labels)
            breakdowns: dict[str, list[dict]] = {name: [] for name in subjects}
            calls = {PLAIN_DECODER: lambda feeds=feeds: plain.infer(feeds)}
            for name, predictor in subjects.items():
                calls[name] = lambda request=request, log=breakdowns[name], p=predictor: log.append(p.predict(**request).meta)
            with reporter.step(f"prompt latency, {workload}: {', '.join(subjects)} vs plain decoder graph, {runs} alternated runs"):
                times = alternate_calls(calls, runs, warmup)
            prompts = int(tokens.point_coords.shape[0])
            timings += [_timing(name, "prompt", workload, values, prompts, 0.0) for name, values in times.items()]
            for name, breakdown in breakdowns.items():
                for part in ("decoder_ms", "postprocess_ms"):
                    values = [meta[part] for meta in breakdown[warmup:]]
                    timings.append(_timing(f"{name}:{part[:-3]}", "prompt", workload, values, prompts, 0.0))
    return timings


def prompt_ratios(timings: list[Timing]) -> dict[str, dict[str, float]]:
    """Per prompt workload: the predictor's speed-up over the plain decoder graph and the host share."""
    median = {(t.subject, t.workload): t.median_ms for t in timings if t.component == "prompt"}
    predictors = [s for s in dict.fromkeys(subject for subject, _ in median) if s != PLAIN_DECODER and ":" not in s]
    ratios = {}
    for workload in PROMPT_WORKLOADS:
        if (PLAIN_DECODER, workload) not in median:
            continue
        for name in predictors:
            if (name, workload) in median:
                # `predictor_vs_plain` / `host_share` for the default predictor, prefixed by the subject for others.
                prefix = "" if name == PREDICTOR else f"{name}:"
                entry = ratios.setdefault(workload, {})
                entry[f"{prefix}predictor_vs_plain"] = median[(PLAIN_DECODER, workload)] / median[(name, workload)]
                entry[f"{prefix}host_share"] = median.get((f"{name}:postprocess", workload), 0.0) / median[(name, workload)]
    return ratios


def table(result: BenchResult) -> str:
    baseline = {t.workload: t.median_ms for t in result.timings if t.subject == "pytorch-eager"}
    rows = [f"{'subject':<24} {'component':<8} {'workload':<14} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'items/s':>8} "
            f"{'vs torch':>8} {'load s':>7} {'peak MB':>8}"]
    for t in result.timings:
        speedup = f"{baseline[t.workload] / t.median_ms:.2f}x" if t.workload in baseline else "-"
        rows.append(f"{t.subject:<24} {t.component:<8} {t.workload:<14} {t.median_ms:>10.1f} {t.p90_ms:>8.1f} {t.min_ms:>8.1f} "
                    f"{t.per_second:>8.2f} {speedup:>8} {t.load_s:>7.2f} {t.peak_rss_mb or '-':>8}")
    notes = {t.subject: t.note for t in result.timings if t.note}
    rows += [f"{subject}: {note}" for subject, note in notes.items()]
    return "\n".join(rows)


def chart(result: BenchResult, path: Path) -> Path:
    """Horizontal bar chart of median latency per subject and workload (Pillow only)."""
    from PIL import Image, ImageDraw

    rows = result.timings
    width, bar_h, left = 900, 22, 330
    height = 40 + bar_h * len(rows) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 10),
        f"EfficientViT-SAM-{result.variant}: median latency (ms), {result.threads} threads, {result.machine.get('cpu', '')}",
        fill="black",
    )
    longest = max((t.median_ms for t in rows), default=1.0)
    colors = {"encoder": (66, 120, 200), "decoder": (230, 140, 40)}
    for index, t in enumerate(rows):
        y = 40 + index * bar_h
        draw.text((10, y + 4), f"{t.subject} / {t.workload}", fill="black")
        length = int((width - left - 80) * t.median_ms / longest)
        draw.rectangle([left, y + 3, left + max(length, 1), y + bar_h - 3], fill=colors.get(t.component, (120, 120, 120)))
        draw.text((left + length + 6, y + 4), f"{t.median_ms:.1f}", fill="black")
    image.save(path)
    return path


def weights_label(spec: str) -> str:
    """A short name of the weights for a result row: synthetic:SEED, realistic, or the checkpoint's file name."""
    if not spec or spec.startswith("synthetic:"):
        return spec or "synthetic:0"
    name = Path(spec).name
    return "realistic" if spec == "realistic" or "_realistic" in name else name


def result_rows(result: BenchResult) -> list[tuple[str, str, dict]]:
    """(table, key, values) for each timing, as docs/benchmarks.md's tables take them: encoder timings in
    `encoder-latency`, decoder and prompt timings in `prompts`. The key names variant, weights, subject and
    workload, so re-measuring replaces the earlier row of the same thing."""
    weights = weights_label(result.weights)
    baseline = {t.workload: t.median_ms for t in result.timings if t.subject == "pytorch-eager"}
    plain = {t.workload: t.median_ms for t in result.timings if t.subject in ("plain-onnx", PLAIN_DECODER)}
    rows = []
    for t in result.timings:
        table = "encoder-latency" if t.component == "encoder" else "prompts"
        values = {"variant": result.variant, "weights": weights,
                  ("artifact" if table == "encoder-latency" else "subject"): t.subject,
                  "workload": t.workload, "threads": result.threads, "median_ms": round(t.median_ms, 1),
                  "p90_ms": round(t.p90_ms, 1)}
        if t.workload in baseline:
            values["vs_pytorch"] = f"{baseline[t.workload] / t.median_ms:.2f}x"
        if t.workload in plain:
            values["vs_plain_export" if table == "encoder-latency" else "vs_plain_graph"] = f"{plain[t.workload] / t.median_ms:.2f}x"
        if t.peak_rss_mb is not None:
            values["peak_rss_mb"] = t.peak_rss_mb
        rows.append((table, f"{result.variant}-{weights}-{t.subject}-{t.workload}", values))
    return rows
