"""Runners: one contract (evsam_export.runners.base.Runner) for PyTorch, ONNX Runtime, OpenVINO, TensorRT."""

from __future__ import annotations

from pathlib import Path

from evsam_export.errors import RuntimeUnavailable
from evsam_export.manifest import Artifact
from evsam_export.runners.base import Availability, Runner

# artifact.target -> runtime that executes it
RUNTIME_OF_TARGET = {"onnx": "onnxruntime", "ort": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def runtime_availability() -> dict[str, Availability]:
    from evsam_export.runners.openvino_runner import openvino_availability
    from evsam_export.runners.ort_runner import ort_availability
    from evsam_export.runners.tensorrt_runner import tensorrt_availability
    from evsam_export.runners.torch_runner import torch_availability

    return {
        "torch": torch_availability(),
        "onnxruntime": ort_availability(),
        "openvino": openvino_availability(),
        "tensorrt": tensorrt_availability(),
    }


def runner_for_artifact(folder: Path, artifact: Artifact, threads: int | None = None) -> Runner:
    """The runner that executes `artifact` (raises RuntimeUnavailable with the reason when it cannot)."""
    runtime = RUNTIME_OF_TARGET.get(artifact.target)
    if runtime is None:
        raise RuntimeUnavailable(f"{artifact.id}: no runner for target {artifact.target!r}")
    availability = runtime_availability()[runtime]
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
    from evsam_export.runners.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(path, artifact.inputs, artifact.outputs, label)
