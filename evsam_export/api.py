"""The Python API: every `evsam-export` command does its work through these functions (the CLI parses options
and prints).

    from evsam_export import api
    result = api.export("l0", output="out/l0")              # synthetic:0 weights
    report = api.validate("out/l0")                          # parity gate
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from evsam_export.errors import UsageError
from evsam_export.pipeline.export import EXPORT_PASSES, ExportOptions, ExportResult, export, export_decoder
from evsam_export.progress import Reporter


def _weights_spec(checkpoint: str | None, folder: str | Path) -> str | None:
    """`--checkpoint` as the model loader reads it: `realistic[:STEPS]` becomes the trained checkpoint's path for
    the folder's variant."""
    from evsam_export.realistic import parse_realistic, resolve_realistic

    if checkpoint is None or parse_realistic(str(checkpoint)) is None:
        return checkpoint
    from evsam_export.manifest import read_manifest
    from evsam_export.model.variants import get_variant

    return resolve_realistic(str(checkpoint), get_variant(read_manifest(Path(folder)).variant))


def validate(
    folder: str | Path,
    suite: str | Path = "default",
    checkpoint: str | None = None,
    reference: str | Path | None = None,
    save_reference: str | Path | None = None,
    junit: str | Path | None = None,
    artifacts: list[str] | None = None,
    reporter: Reporter | None = None,
    threads: int | None = None,
    images: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    annotations: str | Path | None = None,
    max_drop: float | dict | None = None,
):
    """Run the parity gate on an artifact folder; writes parity.json, parity.md, junit.xml, overlays and
    report.html.

    `images`: a folder of the user's images replacing the suite's own (its prompt kinds and gates are kept),
    `limit` of them drawn with `seed` (all when None). `annotations`: a COCO-format file replacing the
    suite's images instead (`images` is then the folder of its file_names); the mIoU against it is measured
    for PyTorch and every lower-precision artifact, and with `max_drop` (points, one number or {kind: points})
    that drop decides for lower precisions (parity.task). Returns the ParityReport; `report.passed` is the
    gate (the CLI exits non-zero when it is False)."""
    from evsam_export.data.coco import AnnotationSet
    from evsam_export.data.images import ImageFolder
    from evsam_export.parity.report import write_reports
    from evsam_export.parity.suites import load_suite
    from evsam_export.parity.task_settings import parse_max_drop
    from evsam_export.parity.validate import validate_folder

    folder = Path(folder)
    loaded = load_suite(suite)
    if max_drop is not None and annotations is None:
        raise UsageError("--max-drop gates on the mIoU against ground truth", hint="add --annotations FILE (COCO-format instances JSON)")
    if annotations is not None:
        try:
            drop = parse_max_drop(max_drop) if max_drop is not None else None
        except ValueError as exc:
            raise UsageError(f"bad max_drop: {exc}", hint="give mIoU points: one number or {box: 1.0, point: 2.0}") from None
        spec = AnnotationSet(Path(annotations).expanduser(), Path(images).expanduser() if images is not None else None, limit, seed)
        spec.load()  # bad annotations are refused before any model runs
        loaded = loaded.with_annotations(spec, drop)
    elif images is not None:
        image_folder = ImageFolder(Path(images).expanduser(), limit=limit, seed=seed)
        image_folder.all_files()  # a missing or empty folder is refused before any model runs
        loaded = loaded.with_images(image_folder)
    report = validate_folder(
        folder,
        loaded,
        checkpoint=_weights_spec(checkpoint, folder),
        reference_path=Path(reference) if reference else None,
        save_reference=Path(save_reference) if save_reference else None,
        artifacts=artifacts,
        reporter=reporter,
        threads=threads,
    )
    write_reports(report, folder, Path(junit) if junit else None)
    record_validation(folder, report)
    return report


def record_validation(folder: Path, report) -> None:
    """Append the gate's verdict to manifest.json's history (the artifacts themselves are unchanged)."""
    from evsam_export.manifest import read_manifest

    manifest = read_manifest(folder)
    manifest.history.append({
        "step": "validate",
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "suite": report.suite,
        "images": report.images,
        "skipped_images": [item.to_json() for item in report.skipped_images],
        "reference": report.reference_source,
        "passed": report.passed,
        "stages": {f"{s.pairing or s.artifact}/{s.stage}": s.passed for s in report.stages},
        "failed_gates": [g.line() for g in report.failed_gates],
        "unavailable": report.unavailable,
        # With ground truth (parity.task): the drops that decided, and how many agreement gates did not.
        "task_drop_points": None if report.task is None else {
            f"{s.pairing} [{kind}]": round(entry["drop_points"], 3) for s in report.stages if s.stage == "task"
            for kind, entry in s.per_kind.items()},
        "advisory_misses": len(report.advisory_misses),
    })
    manifest.write(folder)


def evaluate(
    folder: str | Path,
    annotations: str | Path,
    images: str | Path | None = None,
    checkpoint: str | None = None,
    prompts: tuple[str, ...] = ("box", "point"),
    limit: int | None = None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    artifacts: list[str] | None = None,
    threads: int | None = None,
    reporter: Reporter | None = None,
):
    """mIoU against COCO-format ground truth (the paper's zero-shot protocol) for the PyTorch reference of
    `folder` and every encoder -> decoder pairing in it; returns an Evaluation (evsam_export.evaluation)."""
    from evsam_export.data.coco import load_coco
    from evsam_export.evaluation.pictures import draw_worst
    from evsam_export.evaluation.protocol import evaluate_folder
    from evsam_export.evaluation.report import results

    reporter = reporter or Reporter()
    dataset = load_coco(annotations, images, limit=limit, seed=seed, shard=shard)

    def draw(pipelines, evaluation) -> None:
        with reporter.step("draw the worst instances"):
            draw_worst(pipelines, dataset, evaluation, results(evaluation))

    return evaluate_folder(folder, dataset, prompts, artifacts, _weights_spec(checkpoint, folder), threads, reporter,
                           on_evaluated=draw)


def check_unseen(folder: str | Path, encoder: str | None = None, decoder: str | None = None, scenes: int = 8,
                 threads: int = 2, bench_runs: int = 6, record: str | Path | None = None, command: str = "") -> dict:
    """Score a lower-precision pair of `folder` (default: its lowest-precision encoder and decoder) on unseen
    synthetic scenes against its fp32 ONNX pair; the result's `failures` lists the floors it misses. With
    `record` (or $EVSAM_RESULTS_DIR) the result is also written as a benchmark result row."""
    from evsam_export.evaluation.unseen import check_folder, record_result

    result = check_folder(Path(folder), encoder, decoder, scenes, threads, bench_runs)
    record_result(result, Path(record) if record is not None else None, command)
    return result


def run(recipe, variant: str, output: str | Path | None = None, checkpoint: str | None = None, overrides=(),
        force: bool = False, dry_run: bool = False, use_cache: bool = True, threads: int | None = None,
        reporter: Reporter | None = None, command: str = ""):
    """Run a recipe (name or .toml path): export -> precision -> target -> validate, each step cached by content.
    Returns (recipe, folder, result); for an auto recipe (cpu-auto) every supported candidate is built, gated and
    timed, and the result is the auto run's (nothing is built on a dry run: `result` is then None)."""
    from evsam_export.pipeline.auto import is_auto_recipe, load_auto_recipe, run_auto
    from evsam_export.pipeline.cache import StepCache
    from evsam_export.pipeline.recipe import load_recipe
    from evsam_export.pipeline.runner import run_recipe

    reporter = reporter or Reporter()
    cache = StepCache(enabled=use_cache)
    if is_auto_recipe(recipe):
        auto = load_auto_recipe(recipe, list(overrides))
        folder = Path(output) if output is not None else Path("out") / f"{auto.name}-{variant}"
        if dry_run:
            return auto, folder, None
        return auto, folder, run_auto(auto, variant, folder, checkpoint, force, reporter, cache, command, threads)
    loaded = load_recipe(recipe, list(overrides))
    folder = Path(output) if output is not None else Path("out") / f"{loaded.name}-{variant}"
    return loaded, folder, run_recipe(loaded, variant, folder, checkpoint, force, dry_run, reporter, cache, command, threads)


def bench(folder: str | Path, threads: int = 2, runs: int = 20, warmup: int = 2, batches: tuple[int, ...] = (1,),
          baselines: tuple[str, ...] = ("pytorch", "plain-onnx"), memory: bool = True, reporter: Reporter | None = None):
    """Alternated timing of every artifact of `folder` beside the baselines; writes bench.json, bench.png and the
    folder report, returns the bench result."""
    import json

    from evsam_export.bench.run import run_bench
    from evsam_export.bench.tables import chart
    from evsam_export.folder_report import write_folder_report
    from evsam_export.output import write_atomic

    folder = Path(folder)
    result = run_bench(folder, threads, runs, warmup, tuple(batches), tuple(baselines), memory, reporter or Reporter())
    write_atomic(folder / "bench.json", json.dumps(result.to_json(), indent=2) + "\n")
    chart(result, folder / "bench.png")
    write_folder_report(folder)
    return result


def sensitivity(folder: str | Path, backend: str, groups: list[str], overrides: dict, threads: int = 2,
                suite: str = "calibration-gate", scenes: int = 4, bench_runs: int = 3, reporter: Reporter | None = None,
                on_result=None):
    """Which INT8 fallback group carries the encoder's error: one row per group kept fp32 (`backend` ort: ORT
    QDQ on the suite's images; openvino: NNCF, scored end to end on held-out scenes)."""
    from evsam_export.pipeline.sensitivity import measure_openvino_sensitivity, measure_sensitivity

    reporter = reporter or Reporter()
    if backend == "openvino":
        return measure_openvino_sensitivity(Path(folder), groups, overrides, scenes, threads, bench_runs, reporter, on_result=on_result)
    return measure_sensitivity(Path(folder), groups, overrides, suite, threads, reporter, on_result=on_result)


def register_engines(folder: str | Path):
    """Replace the TensorRT build-kit entries of `folder` with the engines its kit built on a GPU."""
    from evsam_export.targets.tensorrt import register_engines as register

    return register(folder)


def step_cache():
    """The step cache `run` reuses ($EVSAM_CACHE_DIR/steps)."""
    from evsam_export.pipeline.cache import StepCache

    return StepCache()


def predictor(folder: str | Path, **options):
    """The torch-free runtime on `folder`'s artifacts (runtime.Predictor; options as it takes them)."""
    from evsam_export.runtime import Predictor

    return Predictor(folder, **options)


def mask_generator(predictor, **settings):
    """Segment-everything over a Predictor (runtime.MaskGenerator; settings as it takes them)."""
    from evsam_export.runtime import MaskGenerator

    return MaskGenerator(predictor, **settings)


def segment_decoder(folder: str | Path) -> str | None:
    """The decoder segment everything runs on `folder` when none is named (runtime.choice.segment_decoder: a
    gated lower-precision one, else None for the Predictor's own choice)."""
    from evsam_export.runtime.choice import segment_decoder as choose

    return choose(Path(folder))


def availability(runtime: str | None = None):
    """Every runtime backend's availability here (runners.BACKENDS), by runtime name; or one runtime's (only that
    runtime is imported)."""
    from evsam_export.runners import availability_of, runtime_availability

    return runtime_availability() if runtime is None else availability_of(runtime)


def targets() -> list:
    """The build targets (targets.registry.TargetInfo), each naming the runtime backend it needs."""
    from evsam_export.targets.registry import TARGETS

    return list(TARGETS.values())


def recipe_readiness(flags: set[str], runtimes: dict) -> dict[str, dict]:
    """Each shipped recipe: the CPU flags its precisions need (any one of each group), and whether this machine
    can build it (runtime installed, flags present). An auto recipe is ready when one candidate is."""
    from evsam_export.pipeline.auto import is_auto_recipe, load_auto_recipe
    from evsam_export.pipeline.recipe import load_recipe, recipes_dir
    from evsam_export.targets.registry import get_target, missing_cpu_features

    table = {}
    for path in sorted(recipes_dir().glob("*.toml")):
        if is_auto_recipe(path):
            continue
        recipe = load_recipe(path)
        target = get_target(recipe.target)
        precisions = (recipe.encoder_precision, recipe.decoder_precision)
        needs = [" or ".join(target.cpu_features[p]) for p in dict.fromkeys(precisions) if p in target.cpu_features]
        missing = missing_cpu_features(target, precisions, flags)
        runtime = runtimes[target.runtime]
        kit = " (writes a trtexec build kit instead)" if target.runtime == "tensorrt" else ""
        why_not = (f"{target.runtime} missing{kit}" if not runtime.available else
                   f"{', '.join(missing)} needs {' or '.join(next(iter(missing.values())))}" if missing else "")
        table[path.stem] = {"cpu_needs": ", ".join(needs), "ready": not why_not, "why_not": why_not}
    for path in sorted(recipes_dir().glob("*.toml")):
        if is_auto_recipe(path):
            candidates = load_auto_recipe(path).candidates
            ready = [c for c in candidates if table.get(c, {}).get("ready")]
            table[path.stem] = {"cpu_needs": "", "ready": bool(ready),
                                "why_not": "" if ready else "no candidate can be built here",
                                "candidates_ready": ready}
    return table


def serve_folder(folder: str | Path, host: str = "127.0.0.1", port: int = 8000):
    """A local HTTP server of `folder` with the cross-origin isolation headers multi-threaded WASM needs
    (web.server.FolderServer; no tensor uploads)."""
    from evsam_export.web.server import FolderServer

    return FolderServer({"/": Path(folder)}, port=port, host=host, accept_blobs=False)


def measure_app(folder: str | Path, image: str | Path, threads: list[int | None], clicks: int = 10, rounds: int = 1,
                progress=print) -> list[dict]:
    """The demo app of a web folder timed in headless Chromium: page load, encoder, real clicks, with each of
    `threads` WASM thread counts in turn for `rounds` rounds; one summary per thread count (bench.app)."""
    from evsam_export.bench.app import measure_rounds

    return measure_rounds(Path(folder), Path(image), list(threads), clicks, rounds, progress)


__all__ = ["EXPORT_PASSES", "ExportOptions", "ExportResult", "availability", "bench", "check_unseen", "evaluate",
           "export", "export_decoder", "mask_generator", "measure_app", "predictor", "recipe_readiness",
           "register_engines", "run", "sensitivity", "serve_folder", "step_cache", "targets", "validate"]
