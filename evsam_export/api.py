"""The Python API; the CLI is a thin layer over these functions.

    from evsam_export import api
    result = api.export("l0", output="out/l0")              # synthetic:0 weights
    report = api.validate("out/l0")                          # parity gate
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from evsam_export.errors import UsageError
from evsam_export.pipeline.export import ExportOptions, ExportResult, export, export_decoder
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


__all__ = ["ExportOptions", "ExportResult", "check_unseen", "evaluate", "export", "export_decoder", "validate"]
