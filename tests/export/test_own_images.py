"""The user's own images: folders read like the runtime reads files, sampled deterministically, in parity
suites (`[[suite.images]] folder = ...`, `validate --images`), unreadable files skipped and counted, and
the readable reports (overlays with prompts and legend, report.html)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evsam_export.data.images import ImageFolder, SkippedImage, files_sha256, read_folder, read_image_file
from evsam_export.data.scenes import synthetic_scene
from evsam_export.errors import RecipeError, UsageError
from evsam_export.model import processing
from evsam_export.parity.reference import build_cases
from evsam_export.parity.suites import load_suite, parse_suite


def make_image_folder(root: Path) -> dict[str, np.ndarray]:
    """PNG, JPEG (in a subfolder), grayscale, 16-bit, RGBA, WebP, BMP and TIFF files, a truncated PNG, a
    text file and a dot-file; returns the arrays written (before lossy JPEG/WebP coding) by name."""
    (root / "sub").mkdir(parents=True)
    written = {
        "a.png": synthetic_scene(3, 60, 80).rgb,
        "sub/b.jpg": synthetic_scene(4, 72, 48).rgb,
        "gray.png": synthetic_scene(5, 50, 64).rgb[..., 0],
        "deep16.png": synthetic_scene(6, 40, 56).rgb[..., 1].astype(np.uint16) * 257 + 3,
        "alpha.png": np.dstack([synthetic_scene(7, 48, 48).rgb, np.full((48, 48), 90, np.uint8)]),
        "c.bmp": synthetic_scene(8, 32, 40).rgb,
        "d.tif": synthetic_scene(9, 36, 36).rgb,
        "e.webp": synthetic_scene(10, 40, 40).rgb,
    }
    for name, array in written.items():
        Image.fromarray(array).save(root / name)
    data = (root / "a.png").read_bytes()
    (root / "broken.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(data)
    return written


@pytest.fixture()
def image_folder(tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "photos"
    return folder, make_image_folder(folder)


def test_a_folder_lists_image_files_sorted_recursively_without_dot_files(image_folder):
    folder, written = image_folder
    names = ImageFolder(folder).all_files()
    assert names == sorted([*written, "broken.png"])
    assert "sub/b.jpg" not in ImageFolder(folder, recursive=False).all_files()


def test_a_sample_is_deterministic_and_depends_on_the_seed(image_folder):
    folder, _ = image_folder
    first = ImageFolder(folder, limit=4, seed=1).files()
    assert first == ImageFolder(folder, limit=4, seed=1).files() and len(first) == 4 and first == sorted(first)
    assert any(ImageFolder(folder, limit=4, seed=seed).files() != first for seed in range(2, 6))
    assert ImageFolder(folder, limit=100).files() == ImageFolder(folder).all_files()


def test_folder_images_are_converted_like_the_runtime_and_a_truncated_file_is_skipped(image_folder):
    folder, written = image_folder
    items = {item.name: item for item in read_folder(ImageFolder(folder))}
    assert isinstance(items["broken.png"], SkippedImage)
    assert "broken.png" in items["broken.png"].reason and "truncated" in items["broken.png"].reason
    for name in ("a.png", "gray.png", "deep16.png", "alpha.png", "c.bmp", "d.tif"):
        # the runtime's conversion of the same pixels: grayscale stacked, 16-bit / 257, alpha dropped
        np.testing.assert_array_equal(items[name].rgb, processing.as_rgb_uint8(written[name]), err_msg=name)
    for name in ("sub/b.jpg", "e.webp"):  # lossy: the reader equals Pillow's decode through the runtime's rule
        with Image.open(folder / name) as opened:
            np.testing.assert_array_equal(items[name].rgb, processing.pil_to_rgb_uint8(opened))
    assert items["gray.png"].rgb.shape == (50, 64, 3)
    np.testing.assert_array_equal(read_image_file(folder / "alpha.png"), items["alpha.png"].rgb)


def test_missing_and_empty_folders_are_refused_with_one_line(tmp_path):
    with pytest.raises(UsageError, match="image folder not found"):
        ImageFolder(tmp_path / "nope").all_files()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UsageError, match="no images in"):
        ImageFolder(tmp_path / "empty").all_files()


def test_the_fingerprint_changes_when_a_file_changes_and_the_file_hash_follows_content(image_folder):
    folder, _ = image_folder
    spec = ImageFolder(folder)
    before = spec.fingerprint()
    assert spec.fingerprint() == before
    target = folder / "c.bmp"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = spec.fingerprint()
    assert touched != before
    Image.fromarray(synthetic_scene(11, 32, 32).rgb).save(folder / "sub" / "new.png")
    assert spec.fingerprint() != touched
    names = ["a.png", "c.bmp"]
    digest = files_sha256(folder, names)
    assert files_sha256(folder, list(reversed(names))) == digest
    Image.fromarray(synthetic_scene(12, 32, 40).rgb).save(target)
    assert files_sha256(folder, names) != digest


def folder_suite(tmp_path: Path, entry: str, kinds=("point", "box")) -> Path:
    """A suite file in tmp_path whose one [[suite.images]] entry is `entry` (shipped default tolerances)."""
    from conftest import quick_suite_text

    path = tmp_path / "mine.toml"
    path.write_text(quick_suite_text("mine", tuple(kinds)).replace("synthetic = 0\nsize = [240, 320]", entry))
    return path


def test_a_suite_folder_is_read_beside_the_suite_file_and_sampled(image_folder, tmp_path):
    suite = load_suite(folder_suite(tmp_path, 'folder = "photos"\nlimit = 3\nseed = 2\nrecursive = false'))
    (spec,) = suite.images
    assert spec == ImageFolder(tmp_path / "photos", limit=3, seed=2, recursive=False)
    cases = build_cases(suite, 512)
    assert len(cases.images) + len(cases.skipped) == 3
    assert [c.key for c in cases.cases] == [f"{i.name}/{k}" for i in cases.images for k in ("point", "box")]
    for case in cases.cases:  # prompts lie inside the image, as for the sample photos
        height, width = case.image.rgb.shape[:2]
        coords = case.prompts.points if case.prompts.points is not None else case.prompts.boxes.reshape(-1, 2)
        assert np.all(coords >= 0) and np.all(coords[:, 0] <= width - 1) and np.all(coords[:, 1] <= height - 1)


def test_a_suite_counts_the_unreadable_file_and_warns(image_folder, tmp_path):
    suite = load_suite(folder_suite(tmp_path, 'folder = "photos"'))

    class Lines:
        lines: list = []

        def line(self, text):
            self.lines.append(text)

    reporter = Lines()
    cases = build_cases(suite, 512, reporter)
    assert [s.name for s in cases.skipped] == ["photos/broken.png"]
    assert len(cases.images) == 8 and reporter.lines == [f"warning: {cases.skipped[0].reason} (skipped; counted in the report)"]
    assert "photos/sub/b.jpg" in {i.name for i in cases.images}


@pytest.mark.parametrize("entry, error, match", [
    ('folder = "absent"', UsageError, "image folder not found"),
    ('folder = "photos"\nsample = "coffee"', RecipeError, "exactly one of"),
    ('synthetic = 0\nsize = [64, 64]\nlimit = 2', RecipeError, "only a folder entry"),
    ('folder = "photos"\nlimit = 0', RecipeError, "outside 1"),
    ('folder = "photos"\nrecursive = "yes"', RecipeError, "true or false"),
    ('folder = "photos"\nsize = [64, 64]', RecipeError, "keep their own size"),
])
def test_bad_folder_entries_are_refused_when_the_suite_loads(image_folder, tmp_path, entry, error, match):
    with pytest.raises(error, match=match):
        load_suite(folder_suite(tmp_path, entry))


def test_a_folder_whose_files_are_all_unreadable_is_refused(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    suite = parse_suite({"suite": {"name": "s", "description": "d", "images": [{"folder": "bad"}],
                                   "prompts": {"kinds": ["point"]}},
                         "tolerances": {"fp32": {"embedding_snr_db_min": 1.0, "embedding_cosine_min": 0.9,
                                                 "mask_iou_mean_min": 0.5, "mask_iou_p5_min": 0.5, "iou_pred_max_abs": 1.0}}},
                        tmp_path / "s.toml")
    with pytest.raises(UsageError, match="no readable image in"):
        build_cases(suite, 512)


def test_the_suite_fingerprint_follows_its_folder(image_folder, tmp_path):
    suite = load_suite(folder_suite(tmp_path, 'folder = "photos"'))
    before = suite.fingerprint()
    Image.fromarray(synthetic_scene(13, 32, 32).rgb).save(tmp_path / "photos" / "z.png")
    assert load_suite(suite.path).fingerprint() != before
    shipped = load_suite("default")
    import hashlib

    assert shipped.fingerprint() == hashlib.sha256(shipped.path.read_bytes()).hexdigest()  # cache keys unchanged


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def test_validate_images_refuses_a_missing_or_empty_folder_before_any_work(copy_export, tmp_path):
    folder = copy_export("bad-images")
    for images in (tmp_path / "absent", tmp_path):
        proc = cli("validate", folder, "--images", images)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert not (folder / "parity.json").exists() and not (folder / "report.html").exists()
    proc = cli("validate", folder, "--limit", "2")
    assert proc.returncode == 2 and "--images" in proc.stderr


@pytest.mark.full  # a validate run over an image folder
def test_validate_images_gates_on_the_folder_and_writes_a_readable_report(copy_export, tmp_path, quick_suite):
    folder = copy_export("own-images")
    images = tmp_path / "mine"
    images.mkdir()
    Image.fromarray(synthetic_scene(21, 60, 90).rgb).save(images / "one.png")
    Image.fromarray(synthetic_scene(22, 80, 50).rgb[..., 2]).save(images / "two.png")
    (images / "three.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    proc = cli("validate", folder, "--images", images, "--suite", quick_suite)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "three.jpg" in proc.stderr and "1 unreadable image(s) skipped" in proc.stderr
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["suite"] == "quick+mine" and parity["images"]["count"] == 2
    assert [item["file"] for item in parity["images"]["skipped"]] == ["mine/three.jpg"]
    assert "Skipped images" in (folder / "parity.md").read_text()
    assert parity["overlays"] and all((folder / o["file"]).is_file() and "mask IoU" in o["caption"] for o in parity["overlays"])
    page = (folder / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for overlay in parity["overlays"]:
        assert f'src="{overlay["file"]}"' in page
    assert 'href="parity.md"' in page and "1 unreadable file(s) skipped" in page
    history = json.loads((folder / "manifest.json").read_text())["history"][-1]
    assert history["images"] == 2 and history["skipped_images"][0]["file"] == "mine/three.jpg"
    assert not list(folder.glob(".*tmp*"))
