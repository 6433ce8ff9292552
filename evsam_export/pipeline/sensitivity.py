"""Which part of an INT8 encoder carries the error: quantize one fallback group at a time, measure the embedding SNR.

For each `ort_int8.INT8_GROUPS` group that names encoder nodes, and for "ungrouped" (the quantizable nodes
no group names), the encoder is quantized with *only* those nodes in INT8 and every other one fp32; "all"
quantizes every node the recipe would. The SNR of each against the fp32 graph on a parity suite's images
says where the error comes from and what it costs (node count). "regions" instead lists every small region
(block) of quantized ops alone, from one quantization (the `rank` fallback's ranking). The fallback order in INT8_GROUPS was
chosen from this table on l0 with synthetic weights: run it with real weights before trusting that order
for another variant or checkpoint.

The INT8 settings are the folder's own (its `encoder.ort.int8` entry, as a `cpu-ort-int8` run wrote it) or
the step's defaults, so every row after the first reuses the calibration ranges from the ranges cache
($EVSAM_CACHE_DIR): one calibration per settings, not one per row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export.errors import RecipeError, UsageError
from evsam_export.files import write_atomic
from evsam_export.progress import Reporter
from evsam_export.steps.fallback import GATE_SUITE

ALL = "all"  # every node the recipe would quantize
UNGROUPED = "ungrouped"  # quantizable nodes that no fallback group names
REGIONS = "regions"  # one row per small region (block) of quantized ops: the recipe's ranking, on the suite
REPORT_FORMAT = "evsam-export/sensitivity"
REPORT_NAME = "sensitivity.json"
# The INT8 artifact whose settings a cpu-ort-int8 folder carries.
INT8_ARTIFACT = "encoder.ort.int8"
FP32_ARTIFACT = "encoder.onnx.fp32"


@dataclass
class GroupSensitivity:
    """One row: only `group`'s nodes INT8, every other node fp32."""

    group: str
    selected: int  # nodes this row asked to quantize
    quantized: int  # nodes of op_types_to_quantize the INT8 graph really quantized
    snr_min_db: float
    snr_mean_db: float
    seconds: float
    ranges_reused: bool

    def line(self) -> str:
        return (f"{self.group:<28} {self.quantized:4d} INT8   SNR {self.snr_min_db:6.2f} / {self.snr_mean_db:6.2f} dB   "
                f"({self.seconds:.0f} s, ranges reused: {'yes' if self.ranges_reused else 'no'})")


@dataclass
class SensitivityReport:
    folder: Path
    variant: str
    settings_from: str  # the artifact id whose settings were used, or "defaults"
    settings: dict  # the INT8 settings every row started from (fallback off)
    suite: str
    images: int
    quantizable: int  # nodes of op_types_to_quantize outside the step's exclusions
    skipped: list[str] = field(default_factory=list)  # asked-for groups with no quantizable node here
    results: list[GroupSensitivity] = field(default_factory=list)

    def header(self) -> str:
        ranges = self.settings["calibrate_method"]
        if ranges == "percentile":
            ranges += f" {self.settings['percentile']}"
        ops = "/".join(self.settings["op_types_to_quantize"])
        return (f"{self.variant} ({ranges} ranges, settings from {self.settings_from}): {self.quantizable} quantizable {ops} "
                f"nodes; SNR vs fp32 on {self.images} {self.suite} images (min / mean dB); only the named nodes INT8")

    def to_json(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "folder": str(self.folder),
            "variant": self.variant,
            "settings_from": self.settings_from,
            "settings": self.settings,
            "suite": self.suite,
            "images": self.images,
            "quantizable": self.quantizable,
            "skipped": self.skipped,
            "results": [{k: _json_number(v) for k, v in dataclasses.asdict(r).items()} for r in self.results],
        }


def _json_number(value):
    """JSON has no infinity: an SNR of +inf (identical outputs) is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def int8_settings(manifest, overrides: dict):
    """The folder's INT8 settings (or the step's defaults) with `overrides` applied and the fallback off."""
    from evsam_export.precision import ort_int8

    known = {f.name for f in dataclasses.fields(ort_int8.Settings)}
    source = next((a for a in manifest.artifacts if a.id == INT8_ARTIFACT), None)
    recorded = {k: v for k, v in (source.settings if source else {}).items() if k in known}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = ort_int8.Settings(**{**recorded, **given, "fallback": False})
    except RecipeError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    return settings, (INT8_ARTIFACT if source else "defaults")


def quantizable_nodes(nodes: Sequence[tuple[str, str]], settings) -> list[tuple[str, str]]:
    """The (name, op_type) nodes the INT8 step would quantize: its op types, outside its exclusions."""
    from evsam_export.export import regions

    excluded = set(regions.protected_nodes(nodes, "encoder", settings.fp32_regions, settings.fp32_patterns, where="sensitivity"))
    return [(name, op) for name, op in nodes if op in settings.op_types_to_quantize and name not in excluded]


def group_selection(quantizable: Sequence[tuple[str, str]], wanted: Sequence[str]) -> tuple[dict[str, set[str]], list[str]]:
    """{row name: node names quantized in that row} and the asked-for rows that select no node here.

    `wanted` empty: every group with nodes, then "ungrouped" and "all"; "all" alone: only the every-node row."""
    from evsam_export.precision import ort_int8

    known = [g.name for g in ort_int8.INT8_GROUPS]
    unknown = sorted(set(wanted) - set(known) - {ALL, UNGROUPED})
    if unknown:
        raise UsageError(f"unknown group {unknown[0]!r}", hint=f"choose from {', '.join(known + [UNGROUPED, ALL, REGIONS])}")
    every = {name for name, _ in quantizable}
    grouped = {g.name: set(g.select(quantizable)) for g in ort_int8.INT8_GROUPS}
    selected = {name: grouped[name] for name in known if not wanted or name in wanted}
    if not wanted or UNGROUPED in wanted:
        selected[UNGROUPED] = every - set().union(*grouped.values())
    if not wanted or ALL in wanted:
        selected[ALL] = every
    skipped = [name for name, chosen in selected.items() if not chosen and (name in wanted or name in (UNGROUPED, ALL))]
    return {name: chosen for name, chosen in selected.items() if chosen}, skipped


def measure_sensitivity(
    folder: Path,
    groups: Sequence[str] = (),
    overrides: dict | None = None,
    suite: str = GATE_SUITE,
    threads: int | None = 2,
    reporter: Reporter | None = None,
    on_result: Callable[[GroupSensitivity], None] | None = None,
) -> SensitivityReport:
    """Quantize each selected group alone and measure its embeddings against the folder's fp32 encoder.

    `overrides`: INT8 settings to change (e.g. calibrate_method, percentile, calibration_images);
    `on_result` is called with each row as soon as it is measured (rows take seconds to minutes)."""
    import numpy as np

    from evsam_export.data.scenes import load_image_spec
    from evsam_export.manifest import read_manifest
    from evsam_export.metrics import snr_db
    from evsam_export.model.processing import preprocess_image
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.parity.suites import load_suite
    from evsam_export.precision import ort_int8
    from evsam_export.runners.ort_runner import OrtRunner
    from evsam_export.steps.fallback import graph_nodes
    from evsam_export.steps.step import StepContext

    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    variant = get_variant(manifest.variant)
    parent = manifest.artifact(FP32_ARTIFACT)
    settings, settings_from = int8_settings(manifest, overrides or {})
    quantizable = quantizable_nodes(graph_nodes(folder / parent.path), settings)
    by_region = REGIONS in groups
    if by_region and len(groups) > 1:
        raise UsageError(f"'{REGIONS}' is a table of its own", hint=f"run --groups {REGIONS} alone, or name groups without it")
    selected, skipped = ({ALL: {name for name, _ in quantizable}}, []) if by_region else group_selection(quantizable, groups)
    if not selected:
        raise UsageError(f"no quantizable {'/'.join(settings.op_types_to_quantize)} node in {', '.join(skipped)} of this encoder",
                         hint="name an encoder group, 'ungrouped' or 'all'")
    loaded_suite = load_suite(suite)
    images = [load_image_spec(spec) for spec in loaded_suite.images]
    input_name, output_name = parent.inputs[0].name, parent.outputs[0].name
    feeds = [{input_name: preprocess_image(image.rgb, variant.encoder_size)[0]} for image in images]

    def embeddings(path: Path, label: str) -> list:
        with OrtRunner(path, parent.inputs, parent.outputs, label, threads=threads) as runner:
            return [runner.infer(feed)[output_name] for feed in feeds]

    report = SensitivityReport(folder, manifest.variant, settings_from, dataclasses.asdict(settings), loaded_suite.name,
                               len(images), len(quantizable), skipped)
    with reporter.step(f"fp32 embeddings of {len(images)} {loaded_suite.name} images"):
        reference = embeddings(folder / parent.path, "fp32")
    work = Path(tempfile.mkdtemp(prefix="evsam-sensitivity-"))
    try:
        (work / parent.path).symlink_to((folder / parent.path).resolve())
        ctx = StepContext(folder=work, manifest=manifest, variant=variant, reporter=Reporter(quiet=True), threads=threads,
                          gating=ParityGate())
        every = {name for name, _ in quantizable}
        if by_region:
            _region_rows(ctx, parent, settings, feeds, reference, report, reporter, on_result)
            return report
        for name, quantized in selected.items():
            started = time.perf_counter()
            keep_fp32 = tuple(f"^{re.escape(node)}$" for node in sorted(every - quantized))
            with reporter.step(f"{name}: {len(quantized)} nodes INT8, the rest fp32"):
                artifact = ort_int8.build(ctx, parent, dataclasses.replace(settings, fp32_patterns=settings.fp32_patterns + keep_fp32))[0]
                snrs = [snr_db(r, t) for r, t in zip(reference, embeddings(ctx.path_of(artifact), name))]
            row = GroupSensitivity(
                group=name,
                selected=len(quantized),
                quantized=sum(artifact.facts["qdq"]["quantized"].get(op, 0) for op in settings.op_types_to_quantize),
                snr_min_db=round(float(min(snrs)), 3),
                snr_mean_db=round(float(np.mean(snrs)), 3),
                seconds=round(time.perf_counter() - started, 1),
                ranges_reused=bool(artifact.facts["calibration"]["ranges_reused"]),
            )
            _add_row(report, row, on_result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _region_rows(ctx, parent, settings, feeds: list, reference: list, report, reporter: Reporter,
                 on_result: Callable | None) -> None:
    """REGIONS: quantize every quantizable node once, then measure each small region of quantized ops alone
    (the Q/DQ pairs of every other op stripped, no re-quantization: the `rank` fallback's ranking), on the
    suite's images; the rows end sorted most harmful first, after an `all` row."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from evsam_export.metrics import snr_db
    from evsam_export.precision import ort_int8
    from evsam_export.steps.fallback import units_of

    started = time.perf_counter()
    read = ctx.folder / "quantizer-source.onnx"
    with reporter.step("every quantizable node INT8, once"):
        artifact = ort_int8.build(ctx, parent, settings, source_copy=read)[0]
    full = onnx.load(str(ctx.path_of(artifact)))
    fp32 = onnx.load(str(read))
    ops = ort_int8.quantized_nodes(full)
    options = ort.SessionOptions()
    if ctx.threads:
        options.intra_op_num_threads = ctx.threads

    def row(name: str, model, count: int, since: float) -> GroupSensitivity:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        output = session.get_outputs()[0].name
        snrs = [snr_db(r, session.run([output], feed)[0]) for r, feed in zip(reference, feeds)]
        return GroupSensitivity(group=name, selected=count, quantized=count, snr_min_db=round(float(min(snrs)), 3),
                                snr_mean_db=round(float(np.mean(snrs)), 3), seconds=round(time.perf_counter() - since, 1),
                                ranges_reused=bool(artifact.facts["calibration"]["ranges_reused"]))

    _add_row(report, row(ALL, full, len(ops), started), on_result)
    for name, names in units_of(ops):
        since = time.perf_counter()
        with reporter.step(f"{name}: {len(names)} ops INT8, the rest fp32"):
            model = onnx.ModelProto()
            model.CopyFrom(full)
            ort_int8.strip_qdq(model, fp32, set(ops) - set(names))
            _add_row(report, row(name, model, len(names), since), on_result)
    report.results[1:] = sorted(report.results[1:], key=lambda r: r.snr_min_db)


def _add_row(report, row, on_result: Callable | None) -> None:
    report.results.append(row)
    if on_result is not None:
        on_result(row)  # rows take minutes: the caller shows each as soon as it is measured


def write_report(report: SensitivityReport, path: Path) -> Path:
    """Write the JSON report atomically (a reader never sees half a report)."""
    path = Path(path)
    write_atomic(path, json.dumps(report.to_json(), indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------ OpenVINO / NNCF

# The NNCF INT8 artifact whose settings a cpu-openvino-int8 folder carries.
OPENVINO_INT8_ARTIFACT = "encoder.openvino.int8"
NONE = "none"  # the row with no group kept fp32: NNCF's round 0 (the base ignored scope only)
# Settings of the openvino step that describe the IR, not the quantization: never taken from a folder's entry.
_IR_FIELDS = ("precision", "static_batch", "inference_precision")


@dataclass
class OpenVINOGroupRow:
    """One row: `group` (regions joined by "+") kept fp32 on top of the base scope, every other node NNCF INT8,
    scored end to end against the fp32 ONNX pair (evaluation.unseen.score_pair)."""

    group: str
    ignored_nodes: int  # nodes of the ignored scope (base scope + the group), as NNCF matched them
    fake_quantize: int
    snr_min_db: float
    mask_iou: dict  # prompt kind -> mean mask IoU vs the fp32 pair
    mask_iou_p5: dict  # prompt kind -> 5th percentile
    miou_drop_points: dict  # prompt kind -> shape-mIoU points lost against the fp32 pair
    speedup: float  # encoder: ORT fp32 median / this IR's median, one alternated run
    seconds: float

    @property
    def worst_kind(self) -> str:
        return min(self.mask_iou, key=self.mask_iou.get)

    def line(self) -> str:
        worst = self.worst_kind
        return (f"{self.group:<28} {self.fake_quantize:4d} FQ   SNR {self.snr_min_db:6.2f} dB   mask IoU worst {worst} "
                f"{self.mask_iou[worst]:.4f} (p5 {self.mask_iou_p5[worst]:.3f})   mIoU drop max "
                f"{max(self.miou_drop_points.values()):+.2f}   {self.speedup:.2f}x ORT fp32   ({self.seconds:.0f} s)")


@dataclass
class OpenVINOSensitivityReport:
    folder: Path
    variant: str
    settings_from: str
    settings: dict
    scenes: list[int]
    results: list[OpenVINOGroupRow] = field(default_factory=list)

    def header(self) -> str:
        return (f"{self.variant} NNCF INT8 ({self.settings['preset']} preset, model_type {self.settings['model_type']}, "
                f"{self.settings['calibration_images']} calibration images, settings from {self.settings_from}): each row "
                f"keeps the named group fp32 and quantizes the rest; scored against the fp32 ONNX pair on "
                f"{len(self.scenes)} held-out scenes (SNR min, worst prompt kind's mean mask IoU, mIoU drop, encoder speed)")

    def to_json(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "backend": "openvino",
            "folder": str(self.folder),
            "variant": self.variant,
            "settings_from": self.settings_from,
            "settings": self.settings,
            "scene_seeds": self.scenes,
            "results": [{k: _json_number(v) for k, v in dataclasses.asdict(r).items()} for r in self.results],
        }


def openvino_int8_settings(manifest, overrides: dict):
    """The folder's NNCF INT8 settings (or the step's defaults) with `overrides` applied, precision int8 and the
    fallback off."""
    from evsam_export.targets import openvino

    known = {f.name for f in dataclasses.fields(openvino.Settings)} - set(_IR_FIELDS)
    source = next((a for a in manifest.artifacts if a.id == OPENVINO_INT8_ARTIFACT), None)
    recorded = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (source.settings if source else {}).items() if k in known}
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = openvino.Settings(**{**recorded, **given, "precision": "int8", "fallback": False})
    except RecipeError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    return settings, (OPENVINO_INT8_ARTIFACT if source else "defaults")


def openvino_rows(wanted: Sequence[str]):
    """{row name: FallbackGroup or None (the base scope)}: "none" and every encoder fallback group by default, or
    the asked-for rows, each a fallback group name or encoder regions joined by "+" (kept fp32 together)."""
    from evsam_export.errors import ExportError
    from evsam_export.export import regions
    from evsam_export.precision.nncf_int8 import ENCODER_GROUPS
    from evsam_export.steps.fallback import FallbackGroup

    if not wanted:
        return {NONE: None, **{g.name: g for g in ENCODER_GROUPS}}
    rows = {}
    for name in wanted:
        if name == NONE:
            rows[name] = None
            continue
        try:
            chosen = tuple(regions.region(part) for part in name.split("+"))
        except ExportError as exc:
            raise UsageError(exc.message, hint=f"a row is {NONE!r} or encoder regions joined by '+'; {exc.hint}") from None
        decoder = [r.name for r in chosen if r.component != "encoder"]
        if decoder:
            raise UsageError(f"region {decoder[0]!r} is not in the encoder", hint="name encoder regions only")
        rows[name] = FallbackGroup(chosen, "measured row")
    return rows


def measure_openvino_sensitivity(
    folder: Path,
    groups: Sequence[str] = (),
    overrides: dict | None = None,
    scenes: int = 4,
    threads: int | None = 2,
    bench_runs: int = 3,
    reporter: Reporter | None = None,
    on_result: Callable[[OpenVINOGroupRow], None] | None = None,
) -> OpenVINOSensitivityReport:
    """NNCF-quantize the folder's fp32 encoder once per row with that row's group kept fp32, and score each IR end
    to end (fp32 ONNX decoder) against the fp32 ONNX pair on held-out synthetic scenes with ground truth.

    Unlike the ORT rows (only a group INT8), a row here is what one fallback round would ship with only that group
    reverted, so the rows rank the groups by what reverting each alone buys on this checkpoint."""
    from evsam_export.evaluation.unseen import FP32_DECODER, reference_scenes, score_pair
    from evsam_export.manifest import read_manifest
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.realistic import HELD_OUT_SEED_BASE
    from evsam_export.runners import runner_for_artifact
    from evsam_export.runtime import Predictor
    from evsam_export.steps.step import StepContext
    from evsam_export.targets import openvino

    if scenes < 1 or bench_runs < 1:
        raise UsageError("--scenes and --bench-runs must be at least 1")
    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    variant = get_variant(manifest.variant)
    parent = manifest.artifact(FP32_ARTIFACT)
    decoder = manifest.artifact(FP32_DECODER)
    settings, settings_from = openvino_int8_settings(manifest, overrides or {})
    rows = openvino_rows(groups)
    seeds = [HELD_OUT_SEED_BASE + i for i in range(scenes)]
    report = OpenVINOSensitivityReport(folder, manifest.variant, settings_from, dataclasses.asdict(settings), seeds)
    reference = Predictor(folder, encoder=FP32_ARTIFACT, decoder=FP32_DECODER, threads=threads, split_decoder=False)
    work = Path(tempfile.mkdtemp(prefix="evsam-sensitivity-"))
    try:
        with reference:
            with reporter.step(f"fp32 pair on {scenes} held-out scenes"):
                known = reference_scenes(reference, seeds, variant.encoder_size)
            (work / parent.path).symlink_to((folder / parent.path).resolve())
            ctx = StepContext(folder=work, manifest=manifest, variant=variant, reporter=Reporter(quiet=True), threads=threads,
                          gating=ParityGate())
            for name, group in rows.items():
                started = time.perf_counter()
                extra = tuple(r.name for r in group.regions) if group else ()
                row_settings = dataclasses.replace(settings, fp32_regions=settings.fp32_regions + extra)
                with reporter.step(f"{name}: fp32, the rest NNCF INT8"):
                    artifact = openvino.build(ctx, parent, row_settings)[0]
                    encoder = runner_for_artifact(work, artifact, threads)
                    test = Predictor.from_runners(manifest, artifact, decoder, encoder, runner_for_artifact(folder, decoder, threads))
                    with test:
                        scored = score_pair(reference, test, seeds, variant.encoder_size, bench_runs, references=known)
                kinds = scored["per_kind"]
                row = OpenVINOGroupRow(
                    group=name,
                    ignored_nodes=int(artifact.facts["ignored_scope"]["matched_nodes"]),
                    fake_quantize=int(artifact.facts["fake_quantize"]),
                    snr_min_db=scored["embedding_snr_db"]["min"],
                    mask_iou={k: v["mask_iou_vs_fp32"]["mean"] for k, v in kinds.items()},
                    mask_iou_p5={k: v["mask_iou_vs_fp32"]["p5"] for k, v in kinds.items()},
                    miou_drop_points={k: v["miou_drop_points"] for k, v in kinds.items()},
                    speedup=scored["encoder_ms"]["speedup"],
                    seconds=round(time.perf_counter() - started, 1),
                )
                _add_row(report, row, on_result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report

