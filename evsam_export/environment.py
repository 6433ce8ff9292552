"""The machine a result was built or measured on: Python, platform, CPU model and SIMD flags, package versions
(recorded in manifest.json, benchmark results and cache keys)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path


def package_versions(
    names: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "openvino", "nncf", "tensorrt", "numpy"),
) -> dict:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# Flags named here (comma-separated) are treated as absent: how a bf16-capable machine shows what a build
# on an older CPU would do (the bf16 refusal, VNNI-dependent INT8 settings) without one.
HIDE_CPU_FLAGS_ENV = "EVSAM_HIDE_CPU_FLAGS"


def cpu_flags() -> list[str]:
    """The SIMD flags that decide INT8/bf16 speed and numerics (from /proc/cpuinfo on Linux)."""
    import os

    interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "f16c", "fma")
    hidden = {flag.strip() for flag in os.environ.get(HIDE_CPU_FLAGS_ENV, "").split(",")}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split()) - hidden
            return [flag for flag in interesting if flag in present]
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import os

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
    }
