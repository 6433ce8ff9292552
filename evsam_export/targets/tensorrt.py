"""TensorRT target: a strongly typed engine from the precision-prepared ONNX, or a trtexec build kit.

Precision lives in the ONNX graph (fp16 casts with fp32 islands, explicit symmetric Q/DQ for INT8), never in
builder flags: TensorRT 11 removed BuilderFlag.FP16/INT8 and trtexec --fp16/--int8/--best.
The network is created strongly typed, so the graph's casts decide every layer's type; on 10.x that takes the
STRONGLY_TYPED creation flag (trtexec --stronglyTyped), on 11.x it is always on.

Engines are tied to the GPU and TensorRT version that built them, and TensorRT cannot be pip-installed on
every machine (its libraries come from NVIDIA's index), so where `tensorrt_availability()` says no, this
step writes a build kit instead:

    OUT/tensorrt-kit/build_engines.sh          driver: checks trtexec, picks the 10.x/11.x flags, builds all
    OUT/tensorrt-kit/<id>.trtexec.sh           one trtexec command per component (sourced by the driver)
    OUT/tensorrt-kit/<component>.<prec>.onnx   hardlinks (or copies) of the prepared ONNX files
    OUT/tensorrt-kit/README.md                 what it is, how to run it, how to validate afterwards

The driver's and the README's text are templates in tensorrt_kit/ (package data), filled by trtexec_kit.py.
This module is the step and the registration of kit-built engines; tensorrt_settings.py holds the settings,
profiles and trtexec command, tensorrt_engine.py the build through TensorRT's Python API.
The kit's manifest entry (facts["kit_only"]) has the driver as its path; the validator skips it until
`evsam-export register-engines OUT` replaces it with the engine built on the GPU.

The driver's text is the same whichever components are in the kit: each component's command lives in its
own file. The recipe runner caches every step's files and restores them on a hit, so a shared script
rewritten by each step would come back from the cache describing another run's components, and the first
entry's recorded sha256 would go stale. A constant driver plus one file per step cannot.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import fields
from pathlib import Path

from evsam_export.errors import ArtifactError, ExportError
from evsam_export.files import sha256_file
from evsam_export.manifest import Artifact, read_manifest
from evsam_export.runners.tensorrt_runner import tensorrt_availability
from evsam_export.steps.step import StepContext, artifact_filename
from evsam_export.targets.tensorrt_engine import build_engine, runs_on
from evsam_export.targets.tensorrt_settings import Settings, profiles_for, profiles_json, trtexec_command
from evsam_export.targets.trtexec_kit import KIT_DIR, KIT_SCRIPT, build_kit, facts_from_trtexec_log


# -- INT8 graphs must carry TensorRT-style Q/DQ ------------------------------------------------------------
def check_trt_qdq(onnx_path: Path) -> int:
    """Number of Q/DQ nodes; raise when a zero point is not int8 zero (TensorRT's Q/DQ are symmetric int8:
    "x_zero_point must be zero", onnx-tensorrt; ORT's default uint8 asymmetric QDQ fails there)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    count, bad = 0, []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        if len(node.input) < 3 or not node.input[2]:
            continue
        tensor = constants.get(node.input[2])
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.uint8 or np.any(values != 0):
            bad.append(f"{node.name or node.output[0]} (zero point {values.dtype} {values.ravel()[:3].tolist()})")
    if bad:
        raise ExportError(
            f"{onnx_path.name}: {len(bad)} Q/DQ nodes are not symmetric int8, which TensorRT requires: {', '.join(bad[:3])}",
            hint="quantize with int8 activations and weights, symmetric (zero point 0), e.g. ModelOpt ONNX PTQ",
        )
    return count


# -- the step ---------------------------------------------------------------------------------------------------
def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    """Engine `<component>.tensorrt.<precision>.engine` where TensorRT and a GPU are here, else a build kit."""
    started = time.perf_counter()
    if not parent.path.endswith(".onnx"):
        raise ExportError(f"{parent.id}: the TensorRT target builds from an ONNX graph, not {parent.path}")
    profiles = profiles_for(parent, settings)
    precision = parent.precision  # fp32 ONNX -> fp32 engine, fp16 islands -> fp16, Q/DQ -> int8
    qdq_nodes = check_trt_qdq(ctx.path_of(parent)) if precision == "int8" else None
    common = {"profiles": profiles_json(profiles), "precision_source": "the ONNX graph (strongly typed build)"}
    if qdq_nodes is not None:
        common["qdq_nodes"] = qdq_nodes
    availability = tensorrt_availability()
    if availability.available:
        engine = ctx.folder / artifact_filename(parent.component, "tensorrt", precision, "engine")
        cache = ctx.folder / settings.timing_cache if settings.timing_cache else None
        facts = build_engine(ctx.path_of(parent), engine, profiles, settings, timing_cache=cache)
        command = trtexec_command(parent.path, engine.name, profiles, settings)
        facts.update(common, trtexec_equivalent=shlex.join(command), run_in=".")
        return [ctx.new_artifact(parent, engine, "tensorrt", precision, "tensorrt", settings.to_json(), facts, started)]
    return [build_kit(ctx, parent, settings, profiles, availability.reason, common, started)]


def register_engines(folder) -> list[Artifact]:
    """Replace each kit entry of `folder`'s manifest whose engine now exists with the engine's entry."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kits = [a for a in manifest.artifacts if a.target == "tensorrt" and a.facts.get("kit_only")]
    if not kits:
        raise ArtifactError(f"{folder} has no TensorRT build-kit entries", hint="export with the tensorrt target first")
    registered = []
    for kit in kits:
        engine = folder / kit.facts["engine"]
        if not engine.is_file():
            continue
        log = folder / kit.facts.get("log", "")
        facts = {k: v for k, v in kit.facts.items() if k not in ("kit_only", "reason", "script", "engine")}
        facts.update({"tensorrt_version": None, "gpu": None, "compute_capability": None})
        facts.update(facts_from_trtexec_log(log.read_text(errors="replace")) if log.is_file() else {})
        facts["built_by"] = "trtexec from the build kit"
        settings = Settings(**{k: v for k, v in kit.settings.items() if k in {f.name for f in fields(Settings)}})
        facts["runs_on"] = runs_on(facts, settings)
        artifact = Artifact(
            id=kit.id, component=kit.component, target="tensorrt", precision=kit.precision,
            path=engine.relative_to(folder).as_posix(), sha256=sha256_file(engine), size_bytes=engine.stat().st_size,
            inputs=list(kit.inputs), outputs=list(kit.outputs), parent=kit.parent, step="tensorrt-kit",
            settings=dict(kit.settings), facts=facts,
        )
        manifest.artifacts = [artifact if a.id == kit.id else a for a in manifest.artifacts]
        registered.append(artifact)
    if not registered:
        raise ArtifactError(f"no engines in {folder / KIT_DIR} yet",
                            hint=f"run `bash {KIT_DIR}/{KIT_SCRIPT}` on the GPU machine first")
    manifest.history.append({"command": f"evsam-export register-engines {folder}", "step": "tensorrt-register",
                             "artifacts": [a.id for a in registered]})
    manifest.write(folder)
    return registered


