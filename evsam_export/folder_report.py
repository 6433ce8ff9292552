"""`report.html`: one self-contained page per artifact folder that a person opens first.

It is rebuilt from the files in the folder (manifest.json, parity.json, eval.json, bench.json and the
pictures they list), so every command that writes results into the folder (`validate`, `bench`; `evaluate`
calls `write_folder_report` the same way) refreshes it and the page shows whatever has been run. Links
are relative and nothing (script, stylesheet, font) comes from the network: the folder can be zipped,
mailed or served as it is. Written atomically.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from urllib.parse import quote

from evsam_export.output import write_atomic
from evsam_export.progress import human_size

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
.pass { color: #0a7a0a; font-weight: bold; } .fail { color: #c00; font-weight: bold; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; max-width: 520px; }
figure img { max-width: 520px; border: 1px solid #ccc; }
figcaption { font-size: 13px; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def _read_json(path: Path) -> dict | None:
    """A JSON file of the folder, or None when it is absent or unreadable (the page shows what it can)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _link(folder: Path, name: str) -> str:
    return f'<a href="{quote(name)}">{escape(name)}</a>' if (folder / name).is_file() else ""


def _links(folder: Path, names: list[str]) -> str:
    present = [link for link in (_link(folder, name) for name in names) if link]
    return f"<p>Files: {', '.join(present)}</p>" if present else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdict(passed) -> str:
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _figures(folder: Path, pictures: list[dict]) -> str:
    """<figure>s for pictures that exist in the folder ([{"file", "caption"}], paths relative to it)."""
    shown = []
    for picture in pictures:
        name = str(picture.get("file", ""))
        if name and (folder / name).is_file() and not Path(name).is_absolute() and ".." not in Path(name).parts:
            caption = escape(str(picture.get("caption", name)))
            shown.append(f'<figure><a href="{quote(name)}"><img src="{quote(name)}" alt="{caption}"></a>'
                         f"<figcaption>{caption}</figcaption></figure>")
    return "".join(shown)


def _artifacts_section(folder: Path, manifest: dict) -> str:
    rows = []
    for artifact in manifest.get("artifacts", []):
        path = str(artifact.get("path", ""))
        calibration = (artifact.get("facts") or {}).get("calibration") or {}
        data = ""
        if calibration.get("source") in ("folder", "annotations"):
            where = calibration.get("annotations") or calibration.get("folder")
            data = (f"{calibration.get('count')} files of <code>{escape(str(where))}</code> "
                    f"(sha256 {escape(str(calibration.get('files_sha256', ''))[:16])}...)")
        elif calibration:
            data = f"{calibration.get('count', '?')} built-in images (synthetic scenes, sample photos)"
        size = artifact.get("size_bytes")
        rows.append([escape(str(artifact.get("id", ""))), escape(str(artifact.get("target", ""))),
                     escape(str(artifact.get("precision", ""))), _link(folder, path) or escape(path),
                     human_size(size) if isinstance(size, int) else "-", data])
    if not rows:
        return ""
    return "<h2>Artifacts</h2>" + _table(["id", "target", "precision", "file", "size", "calibration data"], rows)


def _stage_headline(stage: dict) -> str:
    metrics = stage.get("metrics") or {}
    if stage.get("stage") == "task":
        drops = [f"{escape(str(kind))} {e['drop_points']:+.2f}" for kind, e in metrics.items()
                 if isinstance(e.get("drop_points"), (int, float))]
        return "mIoU drop vs PyTorch: " + (", ".join(drops) + " points" if drops else "not measured")
    if stage.get("stage") == "encoder":
        entry = metrics.get("all", {})
        snr = entry.get("snr_db_min")
        return f"SNR {snr:.1f} dB" if isinstance(snr, (int, float)) else "-"
    means = [(kind, e["mask_iou"]["mean"]) for kind, e in metrics.items()
             if isinstance(e.get("mask_iou", {}).get("mean"), (int, float))]
    if not means:
        return "no masks"
    kind, worst = min(means, key=lambda item: item[1])
    return f"mask IoU mean {worst:.4f} (worst kind: {escape(kind)})"


def _parity_section(folder: Path, parity: dict) -> str:
    images = parity.get("images") or {}
    skipped = images.get("skipped") or []
    parts = [
        "<h2>Parity against PyTorch</h2>",
        f"<p>Result: {_verdict(parity.get('passed'))}. Suite <code>{escape(str(parity.get('suite')))}</code>, "
        f"reference {escape(str(parity.get('reference')))}, {images.get('count', '?')} images"
        + (f", <b>{len(skipped)} unreadable file(s) skipped</b>" if skipped else "") + ".</p>",
        _links(folder, ["parity.md", "parity.json", "junit.xml"]),
    ]
    rows = [[escape(str(s.get("pairing") or s.get("artifact"))), escape(str(s.get("stage"))),
             escape(str(s.get("precision"))), _verdict(s.get("passed")), _stage_headline(s)]
            for s in parity.get("stages", [])]
    parts.append(_table(["artifact", "stage", "precision", "result", "headline"], rows))
    parts.append(_task_table(parity.get("task")))
    if parity.get("failed_gates"):
        parts.append("<h3>Failing gates</h3><ul>" + "".join(f"<li>{escape(str(g))}</li>" for g in parity["failed_gates"]) + "</ul>")
    if parity.get("unavailable"):
        parts.append("<h3>Not run (runtime unavailable)</h3><ul>" + "".join(
            f"<li><code>{escape(str(a))}</code>: {escape(str(r))}</li>" for a, r in parity["unavailable"].items()) + "</ul>")
    if skipped:
        parts.append("<h3>Skipped images</h3><ul>" + "".join(
            f"<li><code>{escape(str(i.get('file')))}</code>: {escape(str(i.get('reason')))}</li>" for i in skipped) + "</ul>")
    figures = _figures(folder, parity.get("overlays") or [])
    if figures:
        parts.append("<h3>Worst cases</h3><p>Reference and artifact masks outlined and tinted, the prompt drawn; "
                     "the caption gives the mask IoU.</p>" + figures)
    return "".join(parts)


def _task_table(task: dict | None) -> str:
    """parity.json's ground-truth measurement: mIoU and its drop beside the agreement with fp32 (parity.task)."""
    if not isinstance(task, dict):
        return ""
    drop = task.get("max_drop")
    rule = ("max_drop " + ", ".join(f"{escape(str(k))} {v:g}" for k, v in drop.items()) + " points decides for lower precisions"
            if isinstance(drop, dict) else "measured only; agreement with fp32 decides")
    rows = []
    for row in task.get("results") or []:
        drop_points, iou = row.get("drop_points"), row.get("agreement_mask_iou_mean")
        rows.append([escape(str(row.get("pipeline"))), escape(str(row.get("prompt"))), _percent(row.get("miou")),
                     f"{drop_points:+.2f}" if isinstance(drop_points, (int, float)) else "-",
                     f"{iou:.4f}" if isinstance(iou, (int, float)) else "-",
                     "task" if row.get("task_decides") else "agreement",
                     _verdict(row.get("passed")) if row.get("passed") is not None else "-"])
    return ("<h3>Against ground truth (task gating)</h3>"
            f"<p>{task.get('images', '?')} annotated images, {task.get('instances', '?')} instances; {rule}.</p>"
            + _table(["pipeline", "prompt", "mIoU", "drop vs PyTorch (points)", "agreement: mask IoU vs fp32", "decides", "result"], rows))


def _percent(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "-"


def _eval_section(folder: Path, evaluation: dict) -> str:
    parts = ["<h2>Evaluation against ground truth</h2>", _links(folder, ["eval.md", "eval.json", "eval-junit.xml"])]
    results = evaluation.get("results") or []
    splits = [name for name in ("small", "medium", "large") if any(name in r for r in results)]
    rows = []
    for result in results:
        row = [escape(str(result.get("pipeline"))), escape(str(result.get("prompt"))), _percent(result.get("miou")),
               escape(str(result.get("instances", "-")))]
        for name in splits:
            split = result.get(name)
            row.append(_percent(split.get("miou") if isinstance(split, dict) else split))
        rows.append(row)
    if rows:
        parts.append(_table(["pipeline", "prompt", "mIoU (%)", "instances"] + [f"{n} mIoU (%)" for n in splits], rows))
    pictures = evaluation.get("pictures")
    if not pictures:  # an evaluation that does not list its pictures: show the PNGs it left in eval/
        pictures = [{"file": p.relative_to(folder).as_posix(), "caption": p.stem} for p in sorted((folder / "eval").glob("*.png"))]
    figures = _figures(folder, pictures)
    if figures:
        parts.append("<h3>Worst instances</h3>" + figures)
    return "".join(parts)


def render_folder_report(folder: Path) -> str:
    folder = Path(folder)
    manifest = _read_json(folder / "manifest.json") or {}
    title = f"EfficientViT-SAM-{manifest.get('variant', '?')} artifacts: {folder.resolve().name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
             _links(folder, ["manifest.json"]), _artifacts_section(folder, manifest)]
    parity = _read_json(folder / "parity.json")
    parts.append(_parity_section(folder, parity) if parity else "<h2>Parity against PyTorch</h2><p>Not validated yet: "
                 "run <code>evsam-export validate</code> on this folder.</p>")
    evaluation = _read_json(folder / "eval.json")
    if evaluation:
        parts.append(_eval_section(folder, evaluation))
    if (folder / "bench.json").is_file():
        bench_picture = [{"file": "bench.png", "caption": "bench.png"}]
        parts.append("<h2>Benchmark</h2>" + _links(folder, ["bench.json"]) + _figures(folder, bench_picture))
    parts.append("</body></html>\n")
    return "".join(parts)


def write_folder_report(folder: Path) -> Path:
    """(Re)write FOLDER/report.html from what the folder holds now."""
    return write_atomic(Path(folder) / "report.html", render_folder_report(folder))
