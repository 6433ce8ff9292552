"""`evsam-export bench DIR`'s run: every artifact of the folder timed beside the baselines, and the prompt latency an
app waits for (Predictor.predict) against the plain decoder."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.bench.baselines import plain_decoder_export, plain_export
from evsam_export.bench.timing import (
    PLAIN_DECODER,
    PROMPT_IMAGE_SIZE,
    BenchResult,
    Call,
    Timing,
    alternate,
    alternate_calls,
    decoder_feed,
    encoder_feed,
    peak_rss_mb,
    prompt_image,
    takes_raw_image,
    timing_note,
    timing_of,
)
from evsam_export.environment import cpu_flags, cpu_model, package_versions
from evsam_export.manifest import read_manifest
from evsam_export.model.variants import get_variant
from evsam_export.progress import Reporter


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
        encoders[HOST_PREPROCESS] = Call(lambda image=image: preprocess_image(image, variant.encoder_size))
        single.add(HOST_PREPROCESS)

    def load_of(name, table):
        return load_times.get(name, load_times.get((name, id(table)), 0.0))

    for batch in batches:
        subjects = {name: runner for name, runner in encoders.items() if batch == 1 or name not in single}
        if len(subjects) < len(encoders):
            reporter.line(f"batch {batch}: {', '.join(sorted(single))} take one image per call: timed at batch 1 only")
        with reporter.step(f"encoder latency, batch {batch}, {runs} alternated runs over {len(subjects)} subjects"):
            feeds = {name: encoder_feed(variant.encoder_size, batch, name in raw) for name in subjects}
            times = alternate(subjects, feeds, runs, warmup)
        result.timings += [timing_of(n, "encoder", f"batch {batch}", t, batch, load_of(n, encoders), timing_note(encoders[n]))
                           for n, t in times.items()]
    for workload, prompts, boxes in (("1 point", 1, False), ("16 boxes", 16, True)):
        with reporter.step(f"decoder latency, {workload}"):
            feeds = {name: decoder_feed(runner.inputs, prompts, boxes) for name, runner in decoders.items()}
            times = alternate(decoders, feeds, runs * 2, warmup)
        result.timings += [timing_of(n, "decoder", workload, t, prompts, load_of(n, decoders), timing_note(decoders[n]))
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
        if not isinstance(runner, Call):
            runner.close()
    return result


PROMPT_WORKLOADS = ("app: 1 click", "app: 16 boxes")
HOST_PREPROCESS = "host preprocess"  # processing.preprocess_image on the app workload's photo (app folders)
PREDICTOR = "predictor"
# The predictor forced onto the single-graph decoder (split_decoder=False), to time the split decoder's gain.
PREDICTOR_SINGLE_GRAPH = "predictor-single-graph"


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
            timings += [timing_of(name, "prompt", workload, values, prompts, 0.0) for name, values in times.items()]
            for name, breakdown in breakdowns.items():
                for part in ("decoder_ms", "postprocess_ms"):
                    values = [meta[part] for meta in breakdown[warmup:]]
                    timings.append(timing_of(f"{name}:{part[:-3]}", "prompt", workload, values, prompts, 0.0))
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
