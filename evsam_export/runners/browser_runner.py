"""onnxruntime-web in headless Chromium: the graph runs in a page through the WASM execution provider (or
WebGPU where the browser has it), exactly as a web app would run it.

One browser per runner (started in load(), closed in close()). Tensors cross as raw bytes through the page's
local server (web.server, measured 0.1 s for 20 MB; base64 through the DevTools protocol took seconds);
`last_run_ms` is the time of the last `session.run` measured inside the page, so benchmarks leave the
transfer out.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from evsam_export.errors import ArtifactError, RuntimeUnavailable
from evsam_export.manifest import TensorSpec
from evsam_export.runners.base import Availability, Runner

EXECUTION_PROVIDERS = ("wasm", "webgpu")
WEBGPU_HINT = "build with the web-wasm recipe instead, or validate in a browser that exposes WebGPU (Chrome with a GPU)"
# numpy dtype name <-> onnxruntime-web tensor type
ORT_WEB_TYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32", "uint8": "uint8",
                 "int8": "int8", "bool": "bool"}


def browser_availability() -> Availability:
    from evsam_export.runners.browser import browser_availability as availability

    return availability()


class BrowserRunner(Runner):
    runtime = "onnxruntime-web"

    def __init__(
        self,
        path: Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        label: str | None = None,
        execution_provider: str = "wasm",
        threads: int | None = None,
    ) -> None:
        super().__init__(inputs, outputs, label or Path(path).name)
        if execution_provider not in EXECUTION_PROVIDERS:
            raise ValueError(f"execution_provider {execution_provider!r} is not one of {EXECUTION_PROVIDERS}")
        self.path = Path(path)
        self.execution_provider = execution_provider
        self.requested_threads = threads
        self.threads: int | None = None  # what onnxruntime-web runs with (its default: min(4, cores / 2))
        self.info: dict = {}
        self.last_run_ms: float | None = None
        self._page = None
        self._runs = itertools.count()

    def _load(self) -> None:
        from evsam_export.runners.browser import BrowserError, BrowserPage
        from evsam_export.web.dist import BUNDLES, find_dist

        state = browser_availability()
        if not state.available:
            raise RuntimeUnavailable(f"{self.label}: onnxruntime-web unavailable: {state.reason}")
        page = BrowserPage({"/ort-web/": find_dist(), "/model/": self.path.parent},
                           {"entry": BUNDLES[self.execution_provider][0], "threads": self.requested_threads or 0})
        try:
            try:
                page.open()
            except BrowserError as error:
                raise RuntimeUnavailable(f"{self.label}: onnxruntime-web did not start in Chromium: {error}") from error
            if self.execution_provider == "webgpu":
                missing = page.call("evsam.webgpuMissing()")
                if missing:
                    raise RuntimeUnavailable(f"{self.label}: this browser has no WebGPU ({missing})", hint=WEBGPU_HINT)
            try:
                page.call("([url, provider]) => evsam.load('model', url, provider)", [f"/model/{self.path.name}", self.execution_provider])
            except BrowserError as error:  # the runtime is here and refuses the file: a fault of the artifact, not a skip
                raise ArtifactError(f"{self.label}: onnxruntime-web cannot load {self.path.name}: {error}",
                                    hint="docs/runtimes.md 'onnxruntime-web' lists what it refuses") from error
            self.info = page.call("evsam.info()")
        except BaseException:
            page.close()
            raise
        self.threads = self.info["threads"] if self.execution_provider == "wasm" else None
        self._page = page

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._infer_outputs(feeds, [o.name for o in self.outputs])

    def _infer_outputs(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        token = f"run{next(self._runs)}"
        answer = self._run_in_page(feeds, names, token)
        numpy_of = {value: key for key, value in ORT_WEB_TYPES.items()}
        blobs = self._page.blobs
        return {name: np.frombuffer(blobs.pop(f"{token}/{name}"), dtype=numpy_of[kind]).reshape(dims)
                for name, (kind, dims) in answer["outputs"].items()}

    def timed_run_ms(self, feeds: dict[str, np.ndarray]) -> float:
        """Milliseconds of one `session.run` in the page (every output computed, none sent back): what a web
        app waits for, without this harness's transfers. `bench` times browser runners with it."""
        if not self.loaded:
            self.load()
        from evsam_export.runners.base import check_feeds

        self._run_in_page(check_feeds(self.inputs, feeds, self.label), [o.name for o in self.outputs], None)
        return self.last_run_ms

    def _run_in_page(self, feeds: dict[str, np.ndarray], names: list[str], token: str | None) -> dict:
        from evsam_export.runners.browser import BrowserError

        feed_token = f"feeds{next(self._runs)}"
        blobs = self._page.blobs
        payload = {}
        for name, array in feeds.items():
            blobs[f"{feed_token}/{name}"] = array.tobytes()
            payload[name] = [ORT_WEB_TYPES[array.dtype.name], list(array.shape), f"{feed_token}/{name}"]
        try:
            answer = self._page.call("([feeds, names, token]) => evsam.run('model', feeds, names, token)", [payload, list(names), token])
        except BrowserError as error:
            if "Target crashed" in str(error) or "has been closed" in str(error):
                # The renderer process died (measured: the kernel's OOM killer picks Chromium's renderers first,
                # oom_score_adj 300, when the machine runs out of memory); the graph is not at fault.
                raise RuntimeUnavailable(f"{self.label}: the browser process died while running it ({error})",
                                         hint="out of memory? `dmesg | grep -i killed`; free memory or use fewer threads") from error
            raise ArtifactError(f"{self.label}: onnxruntime-web failed to run it: {error}",
                                hint="docs/runtimes.md 'onnxruntime-web' lists what it refuses") from error
        finally:
            for name in feeds:
                blobs.pop(f"{feed_token}/{name}", None)
        self.last_run_ms = float(answer["ms"])
        return answer

    def _close(self) -> None:
        if self._page is not None:
            self._page.close()
            self._page = None
