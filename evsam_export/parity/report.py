"""Parity report writers: parity.json (every metric), parity.md (a table a person reads), JUnit XML
(one test case per artifact x stage x prompt kind) and overlay PNGs of the worst cases."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np

from evsam_export.output import write_atomic
from evsam_export.parity.compare import ParityReport, StageReport


def _clean(value):
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def report_json(report: ParityReport, overlays: list[dict] | None = None) -> dict:
    return _clean(
        {
            "format": "evsam-export/parity",
            "variant": report.variant,
            "suite": report.suite,
            "images": {"count": report.images, "skipped": [item.to_json() for item in report.skipped_images]},
            "reference": report.reference_source,
            "passed": report.passed,
            "stages": [
                {
                    "artifact": s.artifact,
                    "stage": s.stage,
                    "precision": s.precision,
                    "pairing": s.pairing,
                    "passed": s.passed,
                    "metrics": s.per_kind,
                    "gates": [g.to_json() for g in s.gates],
                }
                for s in report.stages
            ],
            "unavailable": report.unavailable,
            "failed_gates": [g.line() for g in report.failed_gates],
            "advisory_misses": [g.line() for g in report.advisory_misses],
            "task": task_summary(report),
            "overlays": overlays or [],
        }
    )


def task_summary(report: ParityReport) -> dict | None:
    """The ground-truth measurement with, per pipeline and prompt kind, both numbers side by side: mIoU and its
    drop against PyTorch, and the agreement with fp32 (mask IoU mean) of the stage the pipeline judges."""
    if report.task is None:
        return None
    rows = []
    for stage in report.stages:
        if stage.stage != "task":
            continue
        agreement = _agreement_stage(report, stage)
        for kind, entry in stage.per_kind.items():
            gate = next((g for g in stage.gates if g.kind == kind), None)
            iou = (agreement.per_kind.get(kind, {}).get("mask_iou", {}) if agreement else {}).get("mean")
            rows.append({"artifact": stage.artifact, "pipeline": stage.pairing, "precision": stage.precision, "prompt": kind,
                         **entry, "max_drop": gate.threshold if gate else None, "agreement_stage": agreement.stage if agreement else None,
                         "agreement_mask_iou_mean": iou, "agreement_passed": _agreement_passed(agreement),
                         "task_decides": bool(agreement and any(not g.decides for g in agreement.gates)),
                         "passed": None if gate is None else gate.passed})
    return {**report.task, "results": rows}


def _agreement_stage(report: ParityReport, task_stage: StageReport) -> StageReport | None:
    """The stage whose agreement numbers stand beside a task pipeline's: its end-to-end stage, else (a decoder
    after an fp32 encoder) the decoder stage of the judged artifact."""
    for stage in report.stages:
        if stage.stage == "end_to_end" and stage.pairing == task_stage.pairing:
            return stage
    return next((s for s in report.stages if s.stage == "decoder" and s.artifact == task_stage.artifact), None)


def _agreement_passed(stage: StageReport | None) -> bool | None:
    """Whether the stage's agreement gates (the suite's tolerances, deciding or not) all meet their thresholds."""
    if stage is None:
        return None
    return all(g.passed for g in stage.gates if not g.metric.endswith(".floor"))


def _headline(stage: StageReport) -> str:
    """The one number per stage a person looks at first."""
    if stage.stage == "task":
        drops = [f"{kind} {e['drop_points']:+.2f}" for kind, e in stage.per_kind.items()]
        return "mIoU drop vs PyTorch (points): " + (", ".join(drops) if drops else "not measured")
    if stage.stage == "encoder":
        entry = stage.per_kind.get("all", {})
        return f"SNR {entry.get('snr_db_min', float('nan')):.1f} dB, cos {entry.get('cosine_min', float('nan')):.6f}"
    ious = [e["mask_iou"]["mean"] for e in stage.per_kind.values() if e.get("mask_iou", {}).get("mean") is not None]
    stable = [e["stable_mask_iou"]["mean"] for e in stage.per_kind.values() if "stable_mask_iou" in e]
    text = f"mask IoU mean {min(ious):.4f} (worst kind)" if ious else "no masks"
    if stable:
        text += f", stable {min(stable):.4f}"
    return text


def report_markdown(report: ParityReport) -> str:
    lines = [
        f"# Parity report: EfficientViT-SAM-{report.variant}, suite `{report.suite}`",
        "",
        f"Reference: {report.reference_source}. Result: **{'PASS' if report.passed else 'FAIL'}**.",
        "",
        f"Images: {report.images}" + (f", {len(report.skipped_images)} unreadable file(s) skipped" if report.skipped_images else "") + ".",
        "",
        "| artifact | stage | precision | result | headline | gates |",
        "|---|---|---|---|---|---|",
    ]
    for s in report.stages:
        name = s.pairing or s.artifact
        deciding = [g for g in s.gates if g.decides]
        failed = sum(g.failed for g in deciding)
        advisory = len(s.gates) - len(deciding)
        lines.append(f"| {name} | {s.stage} | {s.precision} | {'pass' if s.passed else 'FAIL'} | {_headline(s)} | "
                     f"{len(deciding) - failed}/{len(deciding)}" + (f" (+{advisory} advisory)" if advisory else "") + " |")
    if report.unavailable:
        lines += ["", "## Not run (runtime unavailable)", ""]
        lines += [f"- `{artifact}`: {reason}" for artifact, reason in report.unavailable.items()]
    if report.skipped_images:
        lines += ["", "## Skipped images (unreadable)", ""]
        lines += [f"- `{item.name}`: {item.reason}" for item in report.skipped_images]
    if report.failed_gates:
        lines += ["", "## Failing gates", ""]
        lines += [f"- {g.line()}" for g in report.failed_gates]
    lines += _task_markdown(report)
    lines += [
        "",
        "## Per prompt kind",
        "",
        "| artifact | stage | kind | mask IoU mean | p5 | min | stable IoU | logit max abs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report.stages:
        if s.stage in ("encoder", "task"):
            continue
        for kind, e in s.per_kind.items():
            m = e["mask_iou"]
            stable = e.get("stable_mask_iou", {}).get("mean")
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            logit = e.get("logit_max_abs")
            lines.append(f"| {s.pairing or s.artifact} | {s.stage} | {kind} | {fmt(m['mean'])} | {fmt(m['p5'])} | {fmt(m['min'])} | "
                         f"{fmt(stable)} | {'-' if logit is None else f'{logit:.2e}'} |")
    return "\n".join(lines) + "\n"


def _task_markdown(report: ParityReport) -> list[str]:
    summary = task_summary(report)
    if summary is None:
        return []
    drop = summary["max_drop"]
    rule = (f"max_drop {', '.join(f'{k} {v:g}' for k, v in drop.items())} points; under it the agreement gates of a "
            f"covered lower-precision artifact are advisory and only NaN/Inf, embedding SNR >= {summary['embedding_snr_db_floor']:g} dB "
            f"and mask IoU mean >= {summary['mask_iou_floor']:g} still decide") if drop else "no max_drop: reported, agreement decides"
    reference = ", ".join(f"{k} {_pct(v)}" for k, v in summary["reference_miou"].items())
    lines = ["", "## Against ground truth (task gating)", "",
             f"{summary['images']} annotated images, {summary['instances']} instances, the evaluate protocol; PyTorch mIoU: "
             f"{reference}. Gate: {rule}.", "",
             "| pipeline | precision | prompt | mIoU | drop vs PyTorch (points) | max_drop | agreement: mask IoU mean vs fp32 "
             "| agreement gates | decides | result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["results"]:
        agreement = {True: "pass", False: "miss", None: "-"}[row["agreement_passed"]]
        iou, limit = row["agreement_mask_iou_mean"], row["max_drop"]
        lines.append(f"| {row['pipeline']} | {row['precision']} | {row['prompt']} | {_pct(row['miou'])} | {row['drop_points']:+.2f} | "
                     f"{'-' if limit is None else f'{limit:g}'} | {'-' if iou is None else f'{iou:.4f}'} | "
                     f"{agreement} ({row['agreement_stage'] or '-'}) | {'task' if row['task_decides'] else 'agreement'} | "
                     f"{'-' if row['passed'] is None else 'pass' if row['passed'] else 'FAIL'} |")
    lines += [f"- not measured: {name}: {why}" for name, why in summary["not_measured"].items()]
    if report.advisory_misses:
        lines += ["", "Agreement gates missed but not deciding (task gating):", ""]
        lines += [f"- {g.line()}" for g in report.advisory_misses]
    return lines


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


def report_junit(report: ParityReport) -> str:
    """One test case per artifact x stage x prompt kind, failing with its failed gates' lines."""
    from evsam_export.junit import junit_xml

    cases = [(f"{s.artifact}.{s.stage}", kind, [g.line() for g in s.gates if g.kind == kind and g.failed])
             for s in report.stages for kind in sorted({g.kind for g in s.gates})]
    return junit_xml(f"evsam-parity-{report.variant}-{report.suite}", cases, report.unavailable)


def _overlay_caption(stage: StageReport, worst: dict) -> str:
    case = worst["case"]
    sets = worst["ref_low"].shape[0]
    where = f"token {worst['token']}" + (f", prompt set {worst['prompt_set'] + 1} of {sets}" if sets > 1 else "")
    refine = " (second pass, fed its first mask)" if case.prompts.refine else ""
    return (f"{stage.pairing or stage.artifact}, {stage.stage} stage, {stage.precision}: {case.image.name} / "
            f"{case.kind}{refine}: mask IoU {worst['iou']:.4f} ({where})")


def write_overlays(report: ParityReport, folder: Path) -> list[dict]:
    """The worst cases of every non-encoder stage as pictures (parity/*.png): the image with the reference
    mask and the artifact's mask outlined and tinted, the prompt drawn, a caption with the IoU and a legend.
    Returns [{"file", "caption", "iou"}] in the order drawn (parity.json lists them for report.html)."""
    from evsam_export.model import processing
    from evsam_export.overlay import ARTIFACT, REFERENCE, LabelledMask, comparison_picture

    out_dir = folder / "parity"
    out_dir.mkdir(exist_ok=True)
    written = []
    for s in report.stages:
        for rank, worst in enumerate(s.worst):
            case = worst["case"]
            b, t = worst["prompt_set"], worst["token"]
            tokens_ref = worst["ref_low"]
            col = min(t, tokens_ref.shape[1] - 1)
            ref_mask = processing.binarize(processing.postprocess_masks(tokens_ref[b, col], case.geometry))
            test_mask = processing.binarize(processing.postprocess_masks(worst["test_low"][b, col], case.geometry))
            prompts = case.prompts
            caption = _overlay_caption(s, worst)
            picture = comparison_picture(
                case.image.rgb,
                [LabelledMask("reference (PyTorch)", ref_mask, REFERENCE),
                 LabelledMask(f"artifact ({s.precision})", test_mask, ARTIFACT)],
                caption,
                points=prompts.points,
                labels=prompts.labels,
                boxes=None if prompts.boxes is None else prompts.boxes[b : b + 1],
            )
            name = f"{s.stage}-{(s.pairing or s.artifact).replace(' -> ', '__')}-{rank}-{case.image.name}-{case.kind}.png"
            path = out_dir / re.sub(r"[^\w.-]", "_", name)  # a plain file name, the same in a link and on disk
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            write_atomic(path, buffer.getvalue())
            written.append({"file": path.relative_to(folder).as_posix(), "caption": caption, "iou": worst["iou"]})
    return written


def write_reports(report: ParityReport, folder: Path, junit_path: Path | None = None, overlays: bool = True) -> dict[str, Path]:
    folder = Path(folder)
    paths = {
        "json": folder / "parity.json",
        "markdown": folder / "parity.md",
        "junit": Path(junit_path) if junit_path else folder / "junit.xml",
    }
    pictures = write_overlays(report, folder) if overlays else []
    write_atomic(paths["json"], json.dumps(report_json(report, pictures), indent=2) + "\n")
    write_atomic(paths["markdown"], report_markdown(report))
    paths["junit"].parent.mkdir(parents=True, exist_ok=True)
    write_atomic(paths["junit"], report_junit(report))
    from evsam_export.folder_report import write_folder_report

    paths["html"] = write_folder_report(folder)
    return paths


def console_table(report: ParityReport) -> str:
    rows = [f"{'artifact':<44} {'stage':<11} {'prec':<5} {'result':<6} headline"]
    for s in report.stages:
        rows.append(f"{(s.pairing or s.artifact):<44} {s.stage:<11} {s.precision:<5} {'pass' if s.passed else 'FAIL':<6} {_headline(s)}")
    for artifact, reason in report.unavailable.items():
        rows.append(f"{artifact:<44} {'-':<11} {'-':<5} {'skip':<6} unavailable: {reason}")
    return "\n".join(rows)
