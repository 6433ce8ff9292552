"""The demo app a web folder carries (index.html + app/), served by the real `evsam-export serve`, driven in
headless Chromium: a real mouse click, a shift-click and a dragged box give the masks our Predictor gives on
the same folder, image and prompts; the resize is Pillow's byte for byte; an image the browser cannot decode
is an error in the page. Skips like tests/builds/test_web.py when Chromium, Playwright or onnxruntime-web is missing."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from test_web import needs_browser, web_build

from evsam_export.manifest import read_manifest

IMAGE_SIZE = (480, 640)  # (H, W): larger than l0's 512 encoder input, so the resize is a downscale (antialiased)


def scene(height: int, width: int) -> np.ndarray:
    """A gradient with a red disc and a green square: objects for the clicks, texture for the resize check."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y) % 251], -1).astype(np.uint8)
    rgb[(x - width * 0.35) ** 2 + (y - height * 0.5) ** 2 < (height * 0.2) ** 2] = (230, 40, 40)
    rgb[height // 4 : height * 5 // 8, width * 5 // 8 : width * 7 // 8] = (30, 200, 60)
    return rgb


def serve(folder, port: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evsam_export.cli", "serve", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(*args: str):
    """The CLI in this process (the bad-input cases end before anything heavy is imported)."""
    from typer.testing import CliRunner

    from evsam_export.cli import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def app_folder(copy_export):
    """The session's l0 export plus fp32 web graphs with the split decoder's halves, as the web-wasm recipe ships
    them (the same graphs as the ONNX ones, so the Predictor on the folder's encoder.onnx.fp32 /
    decoder.onnx.fp32 is the reference), a test image and a broken one."""
    from PIL import Image

    folder = copy_export("web-app")
    for component in ("encoder", "decoder", "decoder_image", "decoder_prompt"):
        web_build(folder, component, "fp32")
    Image.fromarray(scene(*IMAGE_SIZE)).save(folder / "scene.png")
    (folder / "broken.png").write_bytes(b"these bytes are no image")
    return folder


@contextmanager
def app_page(folder, threads: int | None = None):
    """The folder served by the real `evsam-export serve` (stopped with Ctrl-C at the end, which must exit 0) and
    its index.html open in headless Chromium (?threads=N when given), the model loaded; yields (page, the app's
    load info)."""
    from evsam_export.bench.app import open_app

    server = serve(folder)
    try:
        line = server.stdout.readline()
        assert line.startswith(f"serving {folder} at http://127.0.0.1:"), line + server.stderr.read()
        with open_app(line.split(" at ")[1].split()[0].rstrip("/"), threads) as opened:
            yield opened
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "stopped" in out and "Traceback" not in err


def app_mask(page, height: int, width: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(page.evaluate("evsam.maskBytes()")), np.uint8).reshape(height, width).astype(bool)


@needs_browser
def test_the_app_segments_like_the_predictor_through_serve(app_folder):
    from PIL import Image

    from evsam_export.runtime import Predictor

    for name in ("index.html", "app/app.js", "app/worker.js", "app/sam.js"):
        assert (app_folder / name).is_file(), name
    rgb = np.asarray(Image.open(app_folder / "scene.png").convert("RGB"))
    height, width = IMAGE_SIZE
    with app_page(app_folder) as (page, info):
        assert info["variant"] == "l0" and info["encoder"] == "encoder.web.fp32" and info["isolated"]
        assert info["split"] and info["decoder"] == "decoder_image.web.fp32 + decoder_prompt.web.fp32"
        # Cross-origin isolated: every core up to the manifest's maximum, said on the page.
        most = read_manifest(app_folder).model["web"]["threads"]["max"]
        assert info["threads"] == min(info["cores"], most) >= 1
        assert f"{info['threads']} WASM thread" in page.locator("#model").inner_text()

        # The encoder's resize in JS is Pillow's BILINEAR (processing.preprocess_image), byte for byte.
        resized = page.evaluate("evsam.resized('scene.png')")
        expected = np.asarray(Image.fromarray(rgb).resize((resized["width"], resized["height"]), Image.BILINEAR))
        assert (resized["height"], resized["width"]) == (384, 512)
        got = np.frombuffer(base64.b64decode(resized["rgb"]), np.uint8).reshape(expected.shape)
        assert np.array_equal(got, expected), int(np.abs(got.astype(int) - expected).max())

        page.evaluate("evsam.loadImage('scene.png')")
        predictor = Predictor(app_folder, encoder="encoder.onnx.fp32", decoder="decoder.onnx.fp32", split_decoder=False)
        predictor.set_image(rgb)
        canvas = page.locator("#image").bounding_box()
        at = lambda x, y: (canvas["x"] + x * canvas["width"] / width, canvas["y"] + y * canvas["height"] / height)  # noqa: E731

        def settled(count: int) -> dict:
            page.wait_for_function(f"evsam.state().prompts.points.length + (evsam.state().prompts.box ? 1 : 0) === {count} "
                                   "&& evsam.state().status.startsWith('score')")
            return page.evaluate("evsam.state()")

        # A real mouse click on the disc: one positive point, multimask (best of tokens 1-3), like predict()'s default.
        page.mouse.click(*at(width * 0.35, height * 0.5))
        state = settled(1)
        points = np.array(state["prompts"]["points"])
        assert np.abs(points - [width * 0.35, height * 0.5]).max() < 1.5 and state["prompts"]["labels"] == [1]
        expected = predictor.predict(point_coords=points, point_labels=[1])
        assert abs(state["score"] - float(expected.best_scores()[0])) < 1e-4
        # fp32 graphs in WASM vs native ORT: logits within ~1e-5, so only a pixel on the 0 threshold may flip;
        # measured IoU 1.0 (0 pixels differ).
        assert iou(app_mask(page, height, width), expected.best()) >= 0.999
        # The overlay is drawn at the size shown, here the image's own: the mask graph's pixels are that mask
        # (but for the prompt's dot painted over it).
        drawn = page.evaluate("evsam.overlayBytes()")
        assert (drawn["height"], drawn["width"]) == (height, width)
        overlay = np.frombuffer(base64.b64decode(drawn["mask"]), np.uint8).reshape(height, width).astype(bool)
        assert (overlay & ~app_mask(page, height, width)).sum() == 0 and (app_mask(page, height, width) & ~overlay).sum() < 100
        timing = page.evaluate("evsam.timings()")
        last = timing["clicks"][-1]
        assert timing["loadMs"] > 0 and timing["image"]["encodeMs"] > 0 and last["ms"] > last["decodeMs"] > 0

        # Shift-click: a negative point; two points use token 0, like predict(multimask_output=False).
        page.keyboard.down("Shift")
        page.mouse.click(*at(width * 0.75, height * 0.4))
        page.keyboard.up("Shift")
        state = settled(2)
        assert state["prompts"]["labels"] == [1, 0]
        expected = predictor.predict(point_coords=np.array(state["prompts"]["points"]), point_labels=[1, 0], multimask_output=False)
        assert state["token"] == 0 and iou(app_mask(page, height, width), expected.best()) >= 0.999

        # Clear, then drag a box around the square.
        page.click("#clear")
        page.mouse.move(*at(width * 0.6, height * 0.2))
        page.mouse.down()
        page.mouse.move(*at(width * 0.9, height * 0.65), steps=4)
        page.mouse.up()
        state = settled(1)
        box = np.array(state["prompts"]["box"])
        assert state["prompts"]["points"] == [] and np.abs(box - [width * 0.6, height * 0.2, width * 0.9, height * 0.65]).max() < 1.5
        expected = predictor.predict(box=box, multimask_output=False)
        assert iou(app_mask(page, height, width), expected.best()) >= 0.999
        assert base64.b64decode(page.evaluate("evsam.maskPngBase64()")).startswith(b"\x89PNG")

        # An image the browser cannot decode: one line in the page.
        with pytest.raises(Exception, match="cannot decode broken.png"):
            page.evaluate("evsam.loadImage('broken.png')")
        assert page.locator("#error").inner_text().startswith("error: this browser cannot decode broken.png")
        predictor.close()


@needs_browser
def test_the_app_times_real_clicks_with_the_threads_asked(app_folder):
    """The benchmark's own path (evsam_export.bench.app) with one thread asked: the page runs one, times the
    load, the encoder, real clicks and the pointer preview (numbers, not limits: speed is a benchmark)."""
    from evsam_export.bench.app import click_times, native_decoder_ms, preview_times

    with app_page(app_folder, threads=1) as (page, info):
        assert info["threads"] == 1 and "1 WASM thread of" in page.locator("#model").inner_text()
        page.evaluate("evsam.loadImage('scene.png')")
        clicks = click_times(page, IMAGE_SIZE[1], IMAGE_SIZE[0], 2)
        previews = preview_times(page, IMAGE_SIZE[1], IMAGE_SIZE[0], moves=3)
    assert len(clicks) == 2 and all(c["ms"] >= c["decodeMs"] + c["maskMs"] > 0 for c in clicks)
    assert previews and all(p["ms"] > p["decodeMs"] > 0 for p in previews)
    # The same graph in native ONNX Runtime, the reference a recorded row carries for the machine's load.
    assert native_decoder_ms(app_folder, 1, 2) > 0


@needs_browser
def test_the_app_runs_the_single_decoder_graph_when_the_folder_has_no_halves(copy_export):
    from PIL import Image

    from evsam_export.runtime import Predictor

    folder = copy_export("web-app-single")
    for component in ("encoder", "decoder"):
        web_build(folder, component, "fp32")
    rgb = scene(*IMAGE_SIZE)
    Image.fromarray(rgb).save(folder / "scene.png")
    with app_page(folder) as (page, info):
        assert not info["split"] and info["decoder"] == "decoder.web.fp32"
        page.evaluate("evsam.loadImage('scene.png')")
        point = [IMAGE_SIZE[1] * 0.35, IMAGE_SIZE[0] * 0.5]
        page.evaluate("([x, y]) => evsam.click(x, y, true)", point)
        with Predictor(folder, encoder="encoder.onnx.fp32", decoder="decoder.onnx.fp32", split_decoder=False) as predictor:
            predictor.set_image(rgb)
            expected = predictor.predict(point_coords=[point], point_labels=[1])
        assert iou(app_mask(page, *IMAGE_SIZE), expected.best()) >= 0.999


def test_serve_refuses_bad_input_in_one_line(tmp_path):
    missing = cli("serve", str(tmp_path / "missing"))
    assert missing.exit_code == 2 and "no folder" in missing.stderr
    plain_folder = tmp_path / "plain"  # an export without the web target: a manifest without model.web
    plain_folder.mkdir()
    (plain_folder / "manifest.json").write_text('{"model": {"decoder_profile": "sam"}, "artifacts": []}')
    plain = cli("serve", str(plain_folder))
    assert plain.exit_code == 6 and "has no web artifacts" in plain.stderr and "run web-wasm" in plain.stderr
    for proc in (missing, plain):
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    folder = tmp_path / "web"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"model": {"web": {"encoder": "encoder.web.fp32"}}}')
    (folder / "index.html").write_text("<!doctype html>")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli("serve", str(folder), "--port", str(taken.getsockname()[1]))
    assert busy.exit_code == 2 and "is in use" in busy.stderr and "--port 0" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    no_image = cli("serve", str(folder), "--measure", str(tmp_path / "missing.png"))
    assert no_image.exit_code == 2 and "no image" in no_image.stderr and len(no_image.stderr.strip().splitlines()) == 1
