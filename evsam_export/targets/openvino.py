"""OpenVINO target: IR from the fp32 ONNX (fp32 or fp16-compressed weights), and INT8 through NNCF.

    build(ctx, parent, Settings(precision="int8"))  ->  [encoder.openvino.int8.xml (+ .bin)]

Three things decide whether an OpenVINO artifact is what its name says:
  * `ov.save_model` compresses weights to fp16 by default; an fp32 IR is saved with compress_to_fp16=False.
    Storage only: the CPU computes an fp16 IR in f32 ("inference precision no longer depends on the IR").
  * The CPU plugin silently computes in bf16 on AVX512_BF16/AMX CPUs when no INFERENCE_PRECISION_HINT is
    given. The runner always sets it; this step records the exact compile config the runner will use and the
    precision the compiled model reports on the build machine.
  * NNCF INT8 needs an ignored scope and a gated fallback: that precision stage lives in
    evsam_export.precision.nncf_int8, which this step calls with the IR it read and its IR writer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from evsam_export.errors import RecipeError
from evsam_export.manifest import Artifact, TensorSpec
from evsam_export.precision import lowered, nncf_int8
from evsam_export.precision.nncf_int8 import (  # noqa: F401  (the target's INT8 vocabulary, re-exported)
    DECODER_GROUPS,
    ENCODER_GROUPS,
    FALLBACK_GROUPS,
    int8_fed_matmuls,
    model_nodes,
    resolve_overflow_fix,
)
from evsam_export.steps.settings import SettingValueError
from evsam_export.steps.step import StepContext, artifact_filename

PRECISIONS = ("fp32", "fp16", "int8", "bf16")
# The decoder precisions at which this step also converts the split decoder's halves (pipeline/split_lowering.py):
# an IR of the same ONNX at fp32, fp16 storage or the bf16 hint; INT8 goes through NNCF's decoder-specific scopes.
SPLIT_DECODER_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Settings(nncf_int8.Settings):
    """The openvino step's settings: the IR's precision and shape, plus the NNCF fields used when
    precision = "int8" (the recipe merges [precision.int8] into this step)."""

    # Artifact precision: "fp32" (IR weights stored fp32), "fp16" (IR weights stored fp16, computed in f32 on
    # CPU: a storage format), "int8" (NNCF PTQ: FakeQuantize IR) or "bf16" (fp32 IR compiled with the bf16
    # hint: the CPU plugin computes in bf16 where the CPU has AVX512_BF16/AMX, docs/precision.md "bf16").
    precision: str = "fp32"
    # Reshape the encoder to batch 1 before saving (latency builds; the manifest IO then says [1,...]).
    # False keeps the ONNX's dynamic batch. The decoder is never reshaped: its prompt axes are the API.
    static_batch: bool = False
    # INFERENCE_PRECISION_HINT the runner compiles this IR with. Must equal the runner's table
    # (runners/openvino_runner.PRECISION_HINTS: f32 for fp32/fp16/int8, bf16 for bf16): without an explicit
    # f32 the CPU plugin runs bf16 on AVX512_BF16/AMX CPUs and an "fp32" artifact would not be fp32.
    # "" (the default) takes the table's hint for the artifact's precision, so one [target] table serves a
    # recipe whose encoder and decoder differ in precision.
    inference_precision: str = ""

    def check(self) -> None:
        from evsam_export.runners.openvino_runner import PRECISION_HINTS

        self.require_one_of("precision", PRECISIONS)
        super().check()
        expected = PRECISION_HINTS[self.precision]
        if self.inference_precision and self.inference_precision != expected:
            raise SettingValueError(
                "inference_precision",
                f"{self.inference_precision!r} but the OpenVINO runner compiles {self.precision} IRs with "
                f"INFERENCE_PRECISION_HINT={expected!r}",
                hint="a different compute precision is a different artifact precision (e.g. bf16), not a hint",
            )


def check_parent(settings: Settings, parent: Artifact) -> None:
    """The checks that need the parent artifact (the settings' own values are checked when they are built)."""
    if parent.target != "onnx" or parent.precision != "fp32":
        raise RecipeError(
            f"openvino builds from the fp32 ONNX, got {parent.id}",
            hint="precision lives in the OpenVINO step (fp16 IR, NNCF INT8), not in a prepared ONNX",
        )
    if settings.precision == "int8":
        nncf_int8.check_parent(parent)


# ------------------------------------------------------------------------------------------ helpers


def precision_name(value) -> str:
    """"f32" for ov.Type.f32 (whose str() is "<Type: 'float32'>"), strings unchanged."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def op_histogram(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.get_ops():
        counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
    return dict(sorted(counts.items()))


def _io_specs(parent: Artifact, static: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    if not static:
        return list(parent.inputs), list(parent.outputs)
    fix = lambda spec: replace(spec, shape=(1,) + tuple(spec.shape[1:]))  # noqa: E731
    return [fix(s) for s in parent.inputs], [fix(s) for s in parent.outputs]


def read_parent(ctx: StepContext, parent: Artifact, settings: Settings):
    """The fp32 ONNX as an ov.Model (the frontend keeps the dynamic batch)."""
    from evsam_export.runners.openvino_runner import openvino_core

    model = openvino_core().read_model(str(ctx.path_of(parent)))
    if settings.static_batch and parent.component == "encoder":
        model.reshape({spec.name: [1, *spec.shape[1:]] for spec in parent.inputs})
    return model


# ------------------------------------------------------------------------------------------ writing


def write_ir(ctx: StepContext, parent: Artifact, model, settings: Settings, started: float, facts: dict) -> Artifact:
    """Save `model` as <component>.openvino.<precision>.xml/.bin and return its manifest entry."""
    import openvino as ov

    from evsam_export.runners.openvino_runner import OpenVINORunner, openvino_core

    xml = ctx.folder / artifact_filename(parent.component, "openvino", settings.precision, "xml")
    binary = xml.with_suffix(".bin")
    # fp16: weights stored as fp16 (half the file). fp32 and int8: weights stored exactly (the INT8 IR's
    # non-quantized islands are fp32 islands; its quantized weights are folded to int8 by the serializer).
    ov.save_model(model, str(xml), compress_to_fp16=settings.precision == "fp16")
    inputs, outputs = _io_specs(parent, settings.static_batch and parent.component == "encoder")
    runner = OpenVINORunner(xml, inputs, outputs, precision=settings.precision)
    saved = openvino_core().read_model(str(xml))
    with runner:
        actual = precision_name(runner.compiled.get_property("INFERENCE_PRECISION_HINT"))
    histogram = op_histogram(saved)
    facts = {
        "ir_bytes": {"xml": xml.stat().st_size, "bin": binary.stat().st_size},
        "op_types": histogram,
        "fake_quantize": histogram.get("FakeQuantize", 0),
        "compile_config": runner.compile_config(),  # what runners/openvino_runner.py compiles with (no threads)
        "compiled_inference_precision": actual,  # what the build machine's CPU plugin reported for it
        "weights_storage": "fp16"
        if settings.precision == "fp16"
        else "fp32 (int8 where quantized)"
        if settings.precision == "int8"
        else "fp32",
        "static_batch": bool(settings.static_batch and parent.component == "encoder"),
        "openvino_version": ov.get_version(),
        **facts,
    }
    if settings.static_batch and parent.component != "encoder":
        facts["static_batch_note"] = "decoder prompt axes stay dynamic; static_batch applies to the encoder"
    if settings.precision == "int8":
        facts["int8_fed_matmuls"] = int8_fed_matmuls(saved)
        facts["lowered"] = lowered.openvino_census(saved)
    elif settings.precision in ("bf16", "fp16"):
        counted = lowered.whole_graph_census(nncf_int8.model_nodes(saved), settings.precision)
        if actual != {"bf16": "bf16", "fp16": "f16"}[settings.precision]:
            # This CPU's plugin computes the IR in `actual` (fp16 weights are widened on load): none of it runs
            # in the precision of its name here.
            counted = lowered.census({}, {op: v["total"] for op, v in counted["ops"].items()}, settings.precision)
            counted["text"] += f" (computed in {actual} on this CPU)"
        facts["lowered"] = counted
    recorded = asdict(settings)
    recorded["inference_precision"] = runner.compile_config()["INFERENCE_PRECISION_HINT"]
    return ctx.new_artifact(
        parent,
        xml,
        target="openvino",
        precision=settings.precision,
        step="openvino",
        settings=recorded,
        facts=facts,
        started=started,
        inputs=inputs,
        outputs=outputs,
        extra_files=[binary.relative_to(ctx.folder).as_posix()],
    )


# ------------------------------------------------------------------------------------------ build


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    check_parent(settings, parent)
    started = time.perf_counter()
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        from evsam_export.errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"openvino target needs openvino ({exc})", hint="pip install 'evsam-export[openvino]'") from exc
    with ctx.reporter.step(f"{parent.component}: ONNX -> OpenVINO IR"):
        model = read_parent(ctx, parent, settings)
    if settings.precision != "int8":
        return [write_ir(ctx, parent, model, settings, started, {})]
    return [nncf_int8.quantize(ctx, parent, model, settings, started, write_ir)]


__all__ = ["Settings", "build", "ENCODER_GROUPS", "DECODER_GROUPS", "int8_fed_matmuls", "resolve_overflow_fix"]
