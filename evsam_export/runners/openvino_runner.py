"""OpenVINO runner (CPU). The inference precision is always set explicitly: OpenVINO silently runs bf16
on CPUs with AVX512_BF16/AMX when no hint is given (docs/runtimes.md "OpenVINO: inference precision hint"), which would make an "fp32"
artifact something else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from evsam_export.manifest import TensorSpec
from evsam_export.runners.base import Availability, Runner

# artifact precision -> INFERENCE_PRECISION_HINT. INT8 IRs keep their non-quantized ops in f32; an fp16
# IR is stored compressed but computes in f32 on CPU unless asked otherwise.
PRECISION_HINTS = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}


@lru_cache(maxsize=1)
def openvino_core():
    """The process's one ov.Core. Each Core's CPU plugin registers a signal stack and puts back an older one
    when destroyed; one Core that lives as long as the process never puts back a freed one (signal_stack.py)."""
    import openvino as ov

    return ov.Core()


def openvino_availability() -> Availability:
    try:
        import openvino as ov
    except ImportError as exc:
        return Availability(False, f"{exc} (pip install 'evsam-export[openvino]')")
    return Availability(True, version=ov.get_version())


class OpenVINORunner(Runner):
    runtime = "openvino"

    def __init__(
        self,
        path: Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        label: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        performance_hint: str = "LATENCY",
        device: str = "CPU",
    ) -> None:
        super().__init__(inputs, outputs, label or Path(path).name)
        self.path = Path(path)
        self.precision = precision
        self.threads = threads
        self.performance_hint = performance_hint
        self.device = device
        self.compiled = None

    def compile_config(self) -> dict:
        config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS.get(self.precision, "f32"),
            "PERFORMANCE_HINT": self.performance_hint,
        }
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _load(self) -> None:

        core = openvino_core()
        self.compiled = core.compile_model(core.read_model(str(self.path)), self.device, self.compile_config())
        self.request = self.compiled.create_infer_request()
        # A port can carry several tensor names (decoder_image's layer0_image_queries is also an internal
        # Transpose's output), and get_any_name() may return either: results are reported by the contract name.
        declared = {spec.name for spec in self.outputs}
        self.output_names = {port.get_any_name(): next((n for n in sorted(port.get_names()) if n in declared), port.get_any_name())
                             for port in self.compiled.outputs}

    def actual_precision(self) -> str:
        """What the compiled model really runs (checked by tests: an fp32 artifact must say f32)."""
        value = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return value.to_string() if hasattr(value, "to_string") else str(value)  # ov.Type -> "f32"

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer(feeds)
        return {self.output_names[port.get_any_name()]: np.asarray(value) for port, value in results.items()}

    def _close(self) -> None:
        from evsam_export import signal_stack

        self.request = None
        self.compiled = None
        signal_stack.repair()
