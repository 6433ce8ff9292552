"""OpenVINO runner (CPU). The inference precision is always set explicitly: OpenVINO silently runs bf16
on CPUs with AVX512_BF16/AMX when no hint is given (docs/runtimes.md "OpenVINO: inference precision hint"), which would make an "fp32"
artifact something else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from evsam_export import contract
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
        model = core.read_model(str(self.path))
        config = self.compile_config()
        self.upscale_request = None
        split = mask_upscale_split(model) if config["INFERENCE_PRECISION_HINT"] != "f32" else None
        if split is not None:
            # Under a bf16 hint the CPU plugin computes the `sam` profile's in-graph mask upscale in bf16 too, and
            # those masks disagree with the fp32 host post-processing of the same logits (docs/precision.md
            # "bf16"); no per-node attribute keeps it in f32, so it is compiled on its own in f32.
            model, upscale = split
            f32 = {**config, "INFERENCE_PRECISION_HINT": "f32"}
            self.upscale_request = core.compile_model(upscale, self.device, f32).create_infer_request()
        self.compiled = core.compile_model(model, self.device, config)
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
        out = {self.output_names[port.get_any_name()]: np.asarray(value) for port, value in results.items()}
        if self.upscale_request is not None:
            upscale_feeds = {UPSCALE_INPUT: out[contract.LOW_RES_MASKS], contract.ORIG_IM_SIZE: feeds[contract.ORIG_IM_SIZE]}
            out[contract.MASKS] = np.asarray(next(iter(self.upscale_request.infer(upscale_feeds).values())))
        return out

    def _close(self) -> None:
        from evsam_export import signal_stack

        self.request = None
        self.upscale_request = None
        self.compiled = None
        signal_stack.repair()


# The input of the f32 mask-upscale model split off a decoder (mask_upscale_split).
UPSCALE_INPUT = "evsam_low_res_masks"


def mask_upscale_split(model):
    """(the model without its `masks` output, the in-graph mask upscale alone: low_res_masks + orig_im_size ->
    masks) for a `sam`-profile decoder, or None for a model without that output or whose upscale reads more
    than those two tensors."""
    import openvino as ov

    def result_of(target, name):
        return next((r for r in target.get_results() if name in r.input(0).get_source_output().get_names()), None)

    if result_of(model, contract.MASKS) is None or result_of(model, contract.LOW_RES_MASKS) is None:
        return None
    tail = model.clone()
    low_res = result_of(tail, contract.LOW_RES_MASKS).input(0).get_source_output()
    parameter = ov.opset13.parameter(low_res.get_partial_shape(), low_res.get_element_type(), name=UPSCALE_INPUT)
    parameter.output(0).set_names({UPSCALE_INPUT})
    for target in list(low_res.get_target_inputs()):
        if target.get_node().get_type_name() != "Result":
            target.replace_source_output(parameter.output(0))
    sizes = [p for p in tail.get_parameters() if contract.ORIG_IM_SIZE in p.output(0).get_names()]
    try:
        upscale = ov.Model([result_of(tail, contract.MASKS)], [parameter, *sizes], "mask_upscale")
    except Exception:  # noqa: BLE001 - OpenVINO refuses a model that reads an undeclared Parameter: the upscale
        return None  # reads another tensor of the graph, so it stays in the hinted model
    kept = [r for r in model.get_results() if r is not result_of(model, contract.MASKS)]
    return ov.Model(kept, model.get_parameters(), model.get_friendly_name()), upscale
