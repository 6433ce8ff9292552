"""Running artifacts in a web browser through onnxruntime-web (WASM, WebGPU), and the web folder layout.

A folder built by the `web` target (`run web-wasm -v l0 -o X`) holds everything a page needs offline:

    X/
      manifest.json                  artifacts (target "web"), runtime onnxruntime-web, its version, download sizes
      encoder.web.fp32.onnx          the graphs a page fetches (standard ONNX ops only; no com.microsoft fusions)
      decoder.web.int8.onnx
      index.html                     the demo app (open it through `evsam-export serve X`): image, clicks, mask
      app/app.js, worker.js, sam.js  its page script, its Web Worker (onnxruntime-web) and the IO contract in JS
      app/mask.onnx                  the app's mask graph: the shown mask upscaled and thresholded in WASM
      ort-web/                       onnxruntime-web's files copied from the npm package (WEB_RUNTIME_DIR):
        ort.wasm.min.mjs             the JS entry (ort.webgpu.min.mjs for the WebGPU recipe)
        ort-wasm-simd-threaded.mjs   the WASM module's loader and binary the entry imports
        ort-wasm-simd-threaded.wasm
        VERSION                      the onnxruntime-web version copied

`manifest.json` -> `web` says which entry file and execution provider the folder was built for
(`{"runtime_dir": "ort-web", "entry": "ort.wasm.min.mjs", "execution_provider": "wasm", ...}`), so a page
(or `serve`) finds them without knowing the recipe. Multi-threaded WASM needs a cross-origin isolated page:
serve the folder with `Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy:
require-corp` (CROSS_ORIGIN_ISOLATION_HEADERS); without them onnxruntime-web silently runs one thread.

Modules: `dist` finds the onnxruntime-web npm package, `browser` drives Debian's Chromium with Playwright,
`server` is the small 127.0.0.1 file server with those headers (a page's files and the runner's tensors go
through it; `evsam-export serve` uses it too), `assets/runner.html` is the page the browser runner loads.
"""

from pathlib import Path

WEB_RUNTIME_DIR = "ort-web"
# The demo app: index.html goes to the folder's root, its scripts into APP_DIR.
APP_DIR = "app"
APP_ASSETS = Path(__file__).parent / "assets" / "app"
# The app's mask graph (targets.web.mask_graph), written beside its scripts: the shown mask's upscale in WASM.
MASK_GRAPH = f"{APP_DIR}/mask.onnx"
# WASM threads the app runs: every core the browser reports, up to this many, when the page is cross-origin
# isolated (onnxruntime-web's own default takes half the cores, so one thread on 2 cores); else one.
# `?threads=N` in the page's URL overrides it.
MAX_WASM_THREADS = 8

# Response headers that make a page cross-origin isolated (SharedArrayBuffer, so WASM threads).
CROSS_ORIGIN_ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}
