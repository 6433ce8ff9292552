"""Pictures and pages a person reads: comparison overlays (masks outlined and tinted, prompts drawn, legend
and caption under the image) and the self-contained report.html of an artifact folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from evsam_export import overlay
from evsam_export.folder_report import render_folder_report, write_folder_report


def picture(points=None, labels=None, boxes=None, size=(120, 160), masks=None):
    rgb = np.full((*size, 3), 90, np.uint8)
    if masks is None:
        reference = np.zeros(size, bool)
        reference[20:70, 30:90] = True
        artifact = np.zeros(size, bool)
        artifact[30:80, 40:100] = True
        masks = [overlay.LabelledMask("reference (PyTorch)", reference, overlay.REFERENCE),
                 overlay.LabelledMask("artifact (int8)", artifact, overlay.ARTIFACT)]
    return np.asarray(overlay.comparison_picture(rgb, masks, "decoder stage: img/point: mask IoU 0.5000", points, labels, boxes))


def test_prompts_masks_and_a_legend_band_are_drawn():
    points, labels = np.array([[10.0, 100.0], [150.0, 10.0]]), np.array([1.0, 0.0])
    boxes = np.array([[5.0, 5.0, 60.0, 50.0]])
    out = picture(points, labels, boxes)
    assert out.shape[0] > 120 and out.shape[1] >= 160  # the caption and legend sit under the image
    assert tuple(out[102, 12]) == overlay.POSITIVE  # a positive dot (off its '+' strokes)
    assert tuple(out[12, 152]) == overlay.NEGATIVE
    assert tuple(out[5, 30]) == overlay.BOX  # the box's top edge
    assert tuple(out[20, 75]) == overlay.REFERENCE  # the reference outline
    assert tuple(out[79, 70]) == overlay.ARTIFACT  # the artifact outline
    inside_both = out[60, 70].astype(int)
    assert inside_both[0] > 90 and inside_both[2] > 90  # both tints mixed where the masks overlap
    band = out[120:]
    assert (band == 255).all(axis=2).mean() > 0.5 and (band < 60).all(axis=2).any()  # white band with dark text
    for colour in (overlay.REFERENCE, overlay.ARTIFACT, overlay.POSITIVE, overlay.NEGATIVE):
        assert (band == colour).all(axis=2).any(), colour  # every legend swatch


def test_identical_masks_still_show_both_colours():
    mask = np.zeros((120, 160), bool)
    mask[30:90, 40:120] = True
    out = picture(masks=[overlay.LabelledMask("reference", mask, overlay.REFERENCE),
                         overlay.LabelledMask("artifact", mask, overlay.ARTIFACT)])
    assert tuple(out[30, 80]) == overlay.ARTIFACT and tuple(out[33, 80]) == overlay.REFERENCE  # two bands


def test_a_large_image_is_drawn_at_most_max_side_with_prompts_scaled():
    size = (1500, 3000)
    mask = np.zeros(size, bool)
    out = picture(np.array([[2000.0, 1000.0]]), np.array([1.0]), size=size,
                  masks=[overlay.LabelledMask("reference", mask, overlay.REFERENCE)])
    assert out.shape[1] == overlay.MAX_SIDE and out.shape[0] > 512
    assert tuple(out[1000 * 1024 // 3000 + 4, 2000 * 1024 // 3000 + 4]) == overlay.POSITIVE


def write(folder: Path, name: str, content) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)


def test_report_html_shows_parity_and_eval_with_relative_links_only(tmp_path):
    folder = tmp_path / "art"
    write(folder, "manifest.json", {"variant": "l0", "artifacts": [
        {"id": "encoder.ort.int8", "target": "ort", "precision": "int8", "path": "encoder.ort.int8.onnx", "size_bytes": 2048,
         "facts": {"calibration": {"source": "folder", "folder": "/data/<mine>", "count": 7, "files_sha256": "ab" * 32}}}]})
    (folder / "encoder.ort.int8.onnx").write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(folder / "worst one.png")
    write(folder, "parity.json", {"suite": "default+mine", "reference": "PyTorch (synthetic:0)", "passed": False,
                                  "images": {"count": 4, "skipped": [{"file": "mine/bad.png", "reason": "truncated"}]},
                                  "stages": [{"artifact": "decoder.onnx.fp32", "stage": "decoder", "precision": "fp32", "passed": False,
                                              "metrics": {"point": {"mask_iou": {"mean": 0.91}}, "box": {"mask_iou": {"mean": 0.99}}}}],
                                  "failed_gates": ["decoder.onnx.fp32 [decoder/point] mask_iou.mean = 0.91 (needs >= 0.999)"],
                                  "unavailable": {}, "overlays": [{"file": "worst one.png", "caption": "IoU <0.91>"},
                                                                  {"file": "gone.png", "caption": "missing"},
                                                                  {"file": "../outside.png", "caption": "outside"}]})
    write(folder, "parity.md", "# parity\n")
    write(folder, "eval.json", {"results": [{"pipeline": "pytorch", "prompt": "box", "miou": 0.7843, "instances": 12,
                                             "small": {"miou": 0.5}, "medium": {"miou": 0.8}, "large": {"miou": 0.9}}]})
    Image.new("RGB", (8, 8)).save(folder / "eval" / "instance-3.png") if (folder / "eval").mkdir() is None else None
    path = write_folder_report(folder)
    page = path.read_text()
    assert path == folder / "report.html" and not list(folder.glob(".report.html*"))
    assert "http:" not in page and "https:" not in page and "<script" not in page and "<link" not in page
    assert 'href="parity.md"' in page and 'href="junit.xml"' not in page  # only files that exist are linked
    assert 'src="worst%20one.png"' in page and "IoU &lt;0.91&gt;" in page
    assert "gone.png" not in page and "outside.png" not in page
    assert "0.9100 (worst kind: point)" in page and "FAIL" in page and "mine/bad.png" in page
    assert "7 files of <code>/data/&lt;mine&gt;</code>" in page
    assert "78.43" in page and "50.00" in page and 'src="eval/instance-3.png"' in page
    assert 'href="eval.json"' in page and 'href="eval.md"' not in page


def test_report_html_before_validation_says_how_to_validate(tmp_path):
    write(tmp_path, "manifest.json", {"variant": "xl1", "artifacts": []})
    page = render_folder_report(tmp_path)
    assert "EfficientViT-SAM-xl1" in page and "Not validated yet" in page and "evsam-export validate" in page


def test_report_html_shows_a_benchmark_when_the_folder_has_one(tmp_path):
    write(tmp_path, "bench.json", {"rows": []})
    Image.new("RGB", (8, 8)).save(tmp_path / "bench.png")
    page = render_folder_report(tmp_path)
    assert "<h2>Benchmark</h2>" in page and 'href="bench.json"' in page and 'src="bench.png"' in page
