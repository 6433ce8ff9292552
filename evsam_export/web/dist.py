"""Where onnxruntime-web's files are: the npm package's `dist/` folder, found without touching the network.

`$EVSAM_ORT_WEB` when set (a `dist/` folder, an npm prefix holding node_modules/onnxruntime-web, or the
package folder), else the cache prefix `~/.cache/evsam-export/onnxruntime-web` that INSTALL_COMMAND fills.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The version the web target is tested with (tests/builds/test_web.py); another version is used as found and its
# number recorded in the manifest.
ORT_WEB_VERSION = "1.30.0"
ENV_VAR = "EVSAM_ORT_WEB"
CACHE_PREFIX = Path("~/.cache/evsam-export/onnxruntime-web")
INSTALL_COMMAND = f"npm install --prefix {CACHE_PREFIX} onnxruntime-web@{ORT_WEB_VERSION}"

# execution provider -> the dist files a page needs for it: the JS entry, then the WASM build it imports
# (ort.webgpu.min.mjs loads the asyncify build, which also holds the WASM CPU kernels).
BUNDLES: dict[str, tuple[str, ...]] = {
    "wasm": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "webgpu": ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"),
}


def _candidates() -> list[Path]:
    if os.environ.get(ENV_VAR):  # an explicit choice: never silently replaced by another copy
        given = Path(os.environ[ENV_VAR]).expanduser()
        return [given, given / "node_modules" / "onnxruntime-web" / "dist", given / "dist"]
    return [CACHE_PREFIX.expanduser() / "node_modules" / "onnxruntime-web" / "dist"]


def find_dist() -> Path | None:
    """The onnxruntime-web `dist/` folder holding every bundle's files, or None."""
    needed = {name for files in BUNDLES.values() for name in files}
    for folder in _candidates():
        if folder.is_dir() and all((folder / name).is_file() for name in needed):
            return folder
    return None


def missing_reason() -> str:
    where = f"${ENV_VAR} or {CACHE_PREFIX}" if not os.environ.get(ENV_VAR) else f"${ENV_VAR}={os.environ[ENV_VAR]}"
    return f"onnxruntime-web not found in {where} (install it: {INSTALL_COMMAND})"


def dist_version(dist: Path) -> str:
    """The version in the npm package's package.json beside `dist/` ("unknown" when there is none)."""
    try:
        return json.loads((dist.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"
