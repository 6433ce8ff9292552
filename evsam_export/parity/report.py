"""Parity report writers: parity.json (every metric), parity.md (a table a person reads), JUnit XML
(one test case per artifact x stage x prompt kind) and overlay PNGs of the worst cases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_json(report: ParityReport) -> dict:
    return _clean(
        {
            "format": "evsam-export/parity",
            "variant": report.variant,
            "suite": report.suite,
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
        }
    )


def _headline(stage: StageReport) -> str:
    """The one number per stage a person looks at first."""
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
        "| artifact | stage | precision | result | headline | gates |",
        "|---|---|---|---|---|---|",
    ]
    for s in report.stages:
        name = s.pairing or s.artifact
        failed = sum(not g.passed for g in s.gates)
        lines.append(f"| {name} | {s.stage} | {s.precision} | {'pass' if s.passed else 'FAIL'} | {_headline(s)} | "
                     f"{len(s.gates) - failed}/{len(s.gates)} |")
    if report.unavailable:
        lines += ["", "## Not run (runtime unavailable)", ""]
        lines += [f"- `{artifact}`: {reason}" for artifact, reason in report.unavailable.items()]
    if report.failed_gates:
        lines += ["", "## Failing gates", ""]
        lines += [f"- {g.line()}" for g in report.failed_gates]
    lines += [
        "",
        "## Per prompt kind",
        "",
        "| artifact | stage | kind | mask IoU mean | p5 | min | stable IoU | logit max abs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report.stages:
        if s.stage == "encoder":
            continue
        for kind, e in s.per_kind.items():
            m = e["mask_iou"]
            stable = e.get("stable_mask_iou", {}).get("mean")
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            logit = e.get("logit_max_abs")
            lines.append(f"| {s.pairing or s.artifact} | {s.stage} | {kind} | {fmt(m['mean'])} | {fmt(m['p5'])} | {fmt(m['min'])} | "
                         f"{fmt(stable)} | {'-' if logit is None else f'{logit:.2e}'} |")
    return "\n".join(lines) + "\n"


def report_junit(report: ParityReport) -> str:
    suite = ET.Element("testsuite", name=f"evsam-parity-{report.variant}-{report.suite}")
    count = failures = skipped = 0
    for s in report.stages:
        kinds = sorted({g.kind for g in s.gates})
        for kind in kinds:
            gates = [g for g in s.gates if g.kind == kind]
            case = ET.SubElement(suite, "testcase", classname=f"{s.artifact}.{s.stage}", name=kind)
            count += 1
            bad = [g for g in gates if not g.passed]
            if bad:
                failures += 1
                failure = ET.SubElement(case, "failure", message=bad[0].line())
                failure.text = "\n".join(g.line() for g in bad)
    for artifact, reason in report.unavailable.items():
        case = ET.SubElement(suite, "testcase", classname=artifact, name="runtime")
        ET.SubElement(case, "skipped", message=reason)
        count += 1
        skipped += 1
    suite.set("tests", str(count))
    suite.set("failures", str(failures))
    suite.set("skipped", str(skipped))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def write_overlays(report: ParityReport, folder: Path) -> list[Path]:
    """Worst cases per non-encoder stage: image with reference mask (green) vs artifact mask (magenta)."""
    from PIL import Image

    from evsam_export.model import processing

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
            canvas = case.image.rgb.astype(np.float32) * 0.6
            canvas[ref_mask & ~test_mask] = [0, 220, 0]
            canvas[test_mask & ~ref_mask] = [230, 0, 230]
            canvas[ref_mask & test_mask] = canvas[ref_mask & test_mask] * 0.5 + np.array([60, 110, 230]) * 0.5
            name = f"{s.stage}-{(s.pairing or s.artifact).replace(' -> ', '__')}-{rank}-{case.image.name}-{case.kind}.png"
            path = out_dir / name.replace("/", "_")
            Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(path)
            written.append(path)
    return written


def write_reports(report: ParityReport, folder: Path, junit_path: Path | None = None, overlays: bool = True) -> dict[str, Path]:
    folder = Path(folder)
    paths = {
        "json": folder / "parity.json",
        "markdown": folder / "parity.md",
        "junit": Path(junit_path) if junit_path else folder / "junit.xml",
    }
    _write_atomic(paths["json"], json.dumps(report_json(report), indent=2) + "\n")
    _write_atomic(paths["markdown"], report_markdown(report))
    paths["junit"].parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(paths["junit"], report_junit(report))
    if overlays:
        write_overlays(report, folder)
    return paths


def console_table(report: ParityReport) -> str:
    rows = [f"{'artifact':<44} {'stage':<11} {'prec':<5} {'result':<6} headline"]
    for s in report.stages:
        rows.append(f"{(s.pairing or s.artifact):<44} {s.stage:<11} {s.precision:<5} {'pass' if s.passed else 'FAIL':<6} {_headline(s)}")
    for artifact, reason in report.unavailable.items():
        rows.append(f"{artifact:<44} {'-':<11} {'-':<5} {'skip':<6} unavailable: {reason}")
    return "\n".join(rows)
