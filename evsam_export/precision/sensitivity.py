"""Which part of an INT8 encoder carries the error: quantize one fallback group at a time, measure the embedding SNR.

For each `ort_int8.INT8_GROUPS` group that names encoder nodes, and for "ungrouped" (the quantizable nodes
no group names), the encoder is quantized with *only* those nodes in INT8 and every other one fp32; "all"
quantizes every node the recipe would. The SNR of each against the fp32 graph on a parity suite's images
says where the error comes from and what it costs (node count). The fallback order in INT8_GROUPS was
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
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export.errors import RecipeError, UsageError
from evsam_export.pipeline.fallback import GATE_SUITE
from evsam_export.progress import Reporter

ALL = "all"  # every node the recipe would quantize
UNGROUPED = "ungrouped"  # quantizable nodes that no fallback group names
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
        raise UsageError(f"unknown group {unknown[0]!r}", hint=f"choose from {', '.join(known + [UNGROUPED, ALL])}")
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

    from evsam_export.calibration.images import load_image_spec
    from evsam_export.manifest import read_manifest
    from evsam_export.model.processing import preprocess_image
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.metrics import snr_db
    from evsam_export.parity.suites import load_suite
    from evsam_export.pipeline.fallback import graph_nodes
    from evsam_export.pipeline.step import StepContext
    from evsam_export.precision import ort_int8
    from evsam_export.runners.ort_runner import OrtRunner

    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    variant = get_variant(manifest.variant)
    parent = manifest.artifact(FP32_ARTIFACT)
    settings, settings_from = int8_settings(manifest, overrides or {})
    quantizable = quantizable_nodes(graph_nodes(folder / parent.path), settings)
    selected, skipped = group_selection(quantizable, groups)
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
        ctx = StepContext(folder=work, manifest=manifest, variant=variant, reporter=Reporter(quiet=True), threads=threads)
        every = {name for name, _ in quantizable}
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
            report.results.append(row)
            if on_result is not None:
                on_result(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def write_report(report: SensitivityReport, path: Path) -> Path:
    """Write the JSON report atomically (a reader never sees half a report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
