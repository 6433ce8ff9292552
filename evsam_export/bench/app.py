"""Timing the demo app (index.html of a web folder) in headless Chromium with real mouse clicks.

The page takes its own times (app.js `timings`): the page load (navigation start to the model ready), the
encoder, and for each click the time from the pointer event to the frame after the overlay is drawn. Each
click here is a Playwright mouse move (the pointer preview runs and is waited for), then a press and release
on a spot of CLICK_SPOTS; the prompts are cleared between clicks, so each one is a lone click that decodes
and draws its own mask.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# Where the clicks land, as fractions of the image (x, y): spread over the image, none on the border.
CLICK_SPOTS = [(0.35, 0.5), (0.75, 0.4), (0.2, 0.2), (0.6, 0.75), (0.5, 0.3), (0.85, 0.85), (0.15, 0.7), (0.45, 0.55),
               (0.7, 0.15), (0.3, 0.85)]
BENCH_TABLE = "browser"
# Seconds the page may take to load the model or encode the image (fp32 l0 on one busy core).
PAGE_TIMEOUT_S = 600


def app_url(origin: str, threads: int | None, extra: str = "") -> str:
    query = "&".join(filter(None, [f"threads={threads}" if threads else "", extra]))
    return f"{origin}/" + (f"?{query}" if query else "")


def click_times(page, width: int, height: int, clicks: int) -> list[dict]:
    """`clicks` real mouse clicks on the loaded image (width x height pixels) of an open app page, each
    after the pointer's preview has been drawn; the page's timing of each (ms, decodeMs, maskMs)."""
    box = page.locator("#image").bounding_box()
    done = page.evaluate("evsam.timings().clicks.length")
    for index in range(clicks):
        fx, fy = CLICK_SPOTS[index % len(CLICK_SPOTS)]
        x, y = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
        page.evaluate("evsam.clear()")
        page.mouse.move(x, y)
        page.wait_for_function("evsam.previewIdle()")
        page.mouse.down()
        page.mouse.up()
        page.wait_for_function(f"evsam.timings().clicks.length === {done + index + 1}")
    return page.evaluate(f"evsam.timings().clicks.slice({done})")


def preview_times(page, width: int, height: int, moves: int = 10) -> list[dict]:
    """The pointer preview's timings while the mouse moves over the image in small steps."""
    box = page.locator("#image").bounding_box()
    page.evaluate("evsam.clear()")
    done = page.evaluate("evsam.timings().previews.length")
    page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.5 * box["height"])
    page.wait_for_function("evsam.previewIdle()")
    page.mouse.move(box["x"] + 0.8 * box["width"], box["y"] + 0.5 * box["height"], steps=moves)
    page.wait_for_function("evsam.previewIdle()")
    return page.evaluate(f"evsam.timings().previews.slice({done + 1})")


@contextmanager
def open_app(origin: str, threads: int | None, extra: str = ""):
    """The app at `origin` in headless Chromium, its model loaded; yields (page, the app's load info)."""
    from playwright.sync_api import sync_playwright

    from evsam_export.runners.browser import CHROMIUM_ARGS, chromium_executable

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(chromium_executable()), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            page.goto(app_url(origin, threads, extra))
            yield page, page.evaluate("evsam.ready()")
        finally:
            browser.close()


def native_decoder_ms(folder: Path, threads: int, runs: int) -> float:
    """Median time of the graph a click runs in the page (the prompt half, else the single decoder) in native
    ONNX Runtime on this machine with `threads` intra-op threads, one click's prompt: the same machine, load
    and graph as the page's `decoder_ms`, so their ratio is the browser's own cost."""
    import time

    import onnxruntime as ort

    from evsam_export.contract import artifact_spec, sample_feeds
    from evsam_export.manifest import read_manifest

    manifest = read_manifest(folder)
    web = manifest.model["web"]
    artifact = manifest.artifact(web.get("decoder_prompt") or web["decoder"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(Path(folder) / artifact.path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in sample_feeds(artifact_spec(artifact), batch=1, num_points=2).items() if k in names}
    if "orig_im_size" in names:
        feeds["orig_im_size"] = np.array([1, 1024], np.float32)
    times = []
    for index in range(runs + 1):  # the first run allocates: not timed
        started = time.perf_counter()
        session.run(["iou_predictions", "low_res_masks"], feeds)
        if index:
            times.append((time.perf_counter() - started) * 1000)
    return median(times)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def measure_app(folder: Path, image: Path, threads: int | None, clicks: int = 10, extra: str = "") -> dict:
    """Serve `folder` (with `image` beside it), open its app with `threads` WASM threads (None: the app's
    default) and time the load, the encoder, `clicks` real clicks and the pointer preview, then the same
    graph natively (native_decoder_ms); the machine's 1-minute load average at the end."""
    import os

    from PIL import Image

    from evsam_export.manifest import read_manifest
    from evsam_export.web.server import FolderServer

    width, height = Image.open(image).size
    web = read_manifest(folder).model["web"]
    download = web["download_bytes"]["total"]
    app_bytes = sum((Path(folder) / name).stat().st_size for name in web["app"])
    server = FolderServer({"/": Path(folder), "/__bench__/": Path(image).parent}, accept_blobs=False)
    try:
        with open_app(server.origin, threads, extra) as (page, info):
            page.evaluate("(url) => evsam.loadImage(url)", f"/__bench__/{Path(image).name}")
            timings = page.evaluate("evsam.timings()")
            clicked = click_times(page, width, height, clicks)
            previews = preview_times(page, width, height)
    finally:
        server.close()
    return {
        "variant": info["variant"], "threads": info["threads"], "cores": info["cores"], "isolated": info["isolated"],
        "encoder": info["encoder"], "decoder": info["decoder"], "image": f"{width}x{height}", "download_bytes": download,
        "app_bytes": app_bytes,
        "load_ms": timings["loadMs"], "encode_ms": timings["image"]["encodeMs"],
        "click_ms": [c["ms"] for c in clicked], "decoder_ms": [c["decodeMs"] for c in clicked],
        "mask_ms": [c["maskMs"] for c in clicked], "preview_ms": [p["ms"] for p in previews],
        "native_decoder_ms": native_decoder_ms(folder, info["threads"], clicks), "load_average": round(os.getloadavg()[0], 2),
    }


def measure_rounds(folder: Path, image: Path, threads: list[int | None], clicks: int = 10, rounds: int = 1, progress=print) -> list[dict]:
    """`rounds` rounds, each timing the app once per thread count in turn (so a change in the machine's load
    falls on every thread count alike); one summary per thread count: medians over every click of every
    round, each round's median click, the load averages seen."""
    runs: dict = {}
    for round_index in range(rounds):
        for count in threads:
            run = measure_app(folder, image, count, clicks)
            runs.setdefault(count, []).append(run)
            progress(f"round {round_index + 1}/{rounds}, {run['threads']} threads: click to overlay "
                     f"{median(run['click_ms']):.0f} ms median, decoder {median(run['decoder_ms']):.0f} ms "
                     f"(native {run['native_decoder_ms']:.0f} ms), load average {run['load_average']}")
    return [_summary(measured) for measured in runs.values()]


def _summary(measured: list[dict]) -> dict:
    """One thread count's rounds (measure_app results) in one row."""

    def every(key: str) -> list[float]:
        return [value for run in measured for value in run[key]]

    first = measured[0]
    return {
        **{key: first[key] for key in ("variant", "threads", "cores", "isolated", "encoder", "decoder", "image", "download_bytes",
                                           "app_bytes")},
        "rounds": len(measured), "clicks": len(every("click_ms")),
        "load_ms": median([run["load_ms"] for run in measured]), "encode_ms": median([run["encode_ms"] for run in measured]),
        "click_to_overlay_ms_median": median(every("click_ms")),
        "click_to_overlay_ms_round_medians": [median(run["click_ms"]) for run in measured],
        "click_to_overlay_ms_max": round(max(every("click_ms")), 1),
        "decoder_ms_median": median(every("decoder_ms")),
        "native_decoder_ms_median": median([run["native_decoder_ms"] for run in measured]),
        "mask_ms_median": median(every("mask_ms")),
        "preview_ms_median": median(every("preview_ms")) if every("preview_ms") else None,
        "load_averages": [run["load_average"] for run in measured],
    }


def record_app_bench(rows: list[dict], record: Path | None, command: str) -> list[Path]:
    """One row of the `browser` table per thread count (docs/results/browser/demo-app-<variant>-<N>-threads.json)."""
    from evsam_export.measurements import record_measurement

    written = []
    for row in rows:
        values = {
            "what": "demo app",
            "subject": f"{row['variant']}: {row['encoder']}, {row['decoder']}",
            "workload": f"{row['image']} image, {row['clicks']} real clicks ({row['rounds']} rounds)",
            "threads": row["threads"],
            "bytes": row["download_bytes"],
            "app_bytes": row["app_bytes"],
            "load_s": round(row["load_ms"] / 1000, 1),
            "encode_s": round(row["encode_ms"] / 1000, 1),
            "per_click_ms": row["click_to_overlay_ms_median"],
            "per_click_max_ms": row["click_to_overlay_ms_max"],
            "per_click_round_medians_ms": row["click_to_overlay_ms_round_medians"],
            "decoder_ms": row["decoder_ms_median"],
            "native_decoder_ms": row["native_decoder_ms_median"],
            "mask_ms": row["mask_ms_median"],
            "preview_ms": row["preview_ms_median"],
            "load_average": row["load_averages"],
        }
        note = ("medians; per click: the pointer event to the frame after the overlay is drawn (decoder: its prompt "
                "half in the page; native decoder: the same graph in native ONNX Runtime with as many threads, right after "
                "the clicks; mask: the mask graph); bytes: what the page downloads (manifest model.web.download_bytes.total), "
                "app bytes: the demo app's own files (index.html, app/); "
                "load: navigation to the model ready; load average after each round")
        path = record_measurement(record, BENCH_TABLE, f"demo-app-{row['variant']}-{row['threads']}-threads", values,
                                  command=command, note=note)
        if path is not None:
            written.append(path)
    return written
