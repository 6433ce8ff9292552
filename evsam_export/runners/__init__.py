"""Runners: one contract (evsam_export.runners.base.Runner) for PyTorch, ONNX Runtime, OpenVINO, TensorRT and
onnxruntime-web in a headless browser."""

from __future__ import annotations

from pathlib import Path

from evsam_export.errors import RuntimeUnavailable
from evsam_export.manifest import Artifact
from evsam_export.runners.base import Availability, Runner

# artifact.target -> runtime that executes it
# "trt" artifacts are symmetric-QDQ ONNX graphs prepared for TensorRT's explicit quantization: ORT runs them
# too, which checks the quantized graph's numerics where no GPU is available (the engine is checked on a GPU).
RUNTIME_OF_TARGET = {"onnx": "onnxruntime", "ort": "onnxruntime", "trt": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt",
                     "web": "onnxruntime-web"}


def availability_of(runtime: str) -> Availability:
    """Availability of one runtime; imports only that runtime (OpenVINO's import alone takes a second)."""
    import importlib

    module, function = {
        "torch": ("evsam_export.runners.torch_runner", "torch_availability"),
        "onnxruntime": ("evsam_export.runners.ort_runner", "ort_availability"),
        "openvino": ("evsam_export.runners.openvino_runner", "openvino_availability"),
        "tensorrt": ("evsam_export.runners.tensorrt_runner", "tensorrt_availability"),
        "onnxruntime-web": ("evsam_export.runners.browser_runner", "browser_availability"),
    }[runtime]
    return getattr(importlib.import_module(module), function)()


def runtime_availability() -> dict[str, Availability]:
    return {name: availability_of(name) for name in ("torch", "onnxruntime", "openvino", "tensorrt", "onnxruntime-web")}


def runner_for_artifact(folder: Path, artifact: Artifact, threads: int | None = None) -> Runner:
    """The runner that executes `artifact` (raises RuntimeUnavailable with the reason when it cannot)."""
    runtime = RUNTIME_OF_TARGET.get(artifact.target)
    if runtime is None:
        raise RuntimeUnavailable(f"{artifact.id}: no runner for target {artifact.target!r}")
    availability = availability_of(runtime)
    if not availability.available:
        raise RuntimeUnavailable(f"{artifact.id}: {runtime} unavailable: {availability.reason}")
    path = Path(folder) / artifact.path
    label = artifact.id
    if runtime == "onnxruntime":
        from evsam_export.runners.ort_runner import OrtRunner

        return OrtRunner(path, artifact.inputs, artifact.outputs, label, threads=threads)
    if runtime == "openvino":
        from evsam_export.runners.openvino_runner import OpenVINORunner

        return OpenVINORunner(path, artifact.inputs, artifact.outputs, label, precision=artifact.precision, threads=threads)
    if runtime == "onnxruntime-web":
        from evsam_export.runners.browser_runner import BrowserRunner

        return BrowserRunner(path, artifact.inputs, artifact.outputs, label,
                             execution_provider=artifact.settings.get("execution_provider", "wasm"), threads=threads)
    from evsam_export.runners.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(path, artifact.inputs, artifact.outputs, label,
                          allow_host_code=bool(artifact.settings.get("version_compatible", False)))
