"""Runners: one contract (evsam_export.runners.base.Runner) for PyTorch, ONNX Runtime, OpenVINO, TensorRT and
onnxruntime-web in a headless browser, and one record per backend (BACKENDS): its runtime, the artifact targets
it runs, how to ask whether it is available and how to load an artifact into its runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evsam_export.errors import RuntimeUnavailable
from evsam_export.manifest import Artifact
from evsam_export.runners.base import Availability, Runner


def _torch_availability() -> Availability:
    from evsam_export.runners.torch_runner import torch_availability

    return torch_availability()


def _ort_availability() -> Availability:
    from evsam_export.runners.ort_runner import ort_availability

    return ort_availability()


def _ort_load(path: Path, artifact: Artifact, threads: int | None) -> Runner:
    from evsam_export.runners.ort_runner import OrtRunner

    return OrtRunner(path, artifact.inputs, artifact.outputs, artifact.id, threads=threads)


def _openvino_availability() -> Availability:
    from evsam_export.runners.openvino_runner import openvino_availability

    return openvino_availability()


def _openvino_load(path: Path, artifact: Artifact, threads: int | None) -> Runner:
    from evsam_export.runners.openvino_runner import OpenVINORunner

    return OpenVINORunner(path, artifact.inputs, artifact.outputs, artifact.id, precision=artifact.precision, threads=threads)


def _tensorrt_availability() -> Availability:
    from evsam_export.runners.tensorrt_runner import tensorrt_availability

    return tensorrt_availability()


def _tensorrt_load(path: Path, artifact: Artifact, threads: int | None) -> Runner:
    from evsam_export.runners.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(path, artifact.inputs, artifact.outputs, artifact.id,
                          allow_host_code=bool(artifact.settings.get("version_compatible", False)))


def _browser_availability() -> Availability:
    from evsam_export.runners.browser_runner import browser_availability

    return browser_availability()


def _browser_load(path: Path, artifact: Artifact, threads: int | None) -> Runner:
    from evsam_export.runners.browser_runner import BrowserRunner

    return BrowserRunner(path, artifact.inputs, artifact.outputs, artifact.id,
                         execution_provider=artifact.settings.get("execution_provider", "wasm"), threads=threads)


@dataclass(frozen=True)
class Backend:
    runtime: str  # the runtime's name, as availability reports and manifests show it
    targets: tuple[str, ...]  # the artifact targets (manifest `target`) it executes
    availability: Callable[[], Availability]  # imports only this runtime (OpenVINO's import alone takes a second)
    load: Callable[[Path, Artifact, int | None], Runner] | None  # file, its manifest entry, threads -> runner


# "trt" artifacts are symmetric-QDQ ONNX graphs prepared for TensorRT's explicit quantization: ORT runs them
# too, which checks the quantized graph's numerics where no GPU is available (the engine is checked on a GPU).
BACKENDS: dict[str, Backend] = {backend.runtime: backend for backend in (
    Backend("torch", (), _torch_availability, None),  # the PyTorch reference runs the model, not an artifact
    Backend("onnxruntime", ("onnx", "ort", "trt"), _ort_availability, _ort_load),
    Backend("openvino", ("openvino",), _openvino_availability, _openvino_load),
    Backend("tensorrt", ("tensorrt",), _tensorrt_availability, _tensorrt_load),
    Backend("onnxruntime-web", ("web",), _browser_availability, _browser_load),
)}
# artifact.target -> runtime that executes it, read off BACKENDS
RUNTIME_OF_TARGET = {target: backend.runtime for backend in BACKENDS.values() for target in backend.targets}


def availability_of(runtime: str) -> Availability:
    """Availability of one runtime; imports only that runtime."""
    return BACKENDS[runtime].availability()


def runtime_availability() -> dict[str, Availability]:
    return {name: backend.availability() for name, backend in BACKENDS.items()}


def runner_for_artifact(folder: Path, artifact: Artifact, threads: int | None = None) -> Runner:
    """The runner that executes `artifact` (raises RuntimeUnavailable with the reason when it cannot)."""
    runtime = RUNTIME_OF_TARGET.get(artifact.target)
    if runtime is None:
        raise RuntimeUnavailable(f"{artifact.id}: no runner for target {artifact.target!r}")
    availability = availability_of(runtime)
    if not availability.available:
        raise RuntimeUnavailable(f"{artifact.id}: {runtime} unavailable: {availability.reason}")
    return BACKENDS[runtime].load(Path(folder) / artifact.path, artifact, threads)
