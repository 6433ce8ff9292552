"""ONNX Runtime target: the graph ORT would build at session start, optimized once and saved ("offline
mode"), so an app's session starts faster and runs exactly the graph we validated.

Saved at EXTENDED level, not ALL: ALL adds layout transformations specific to the CPU that ran the
optimization (NCHWc blocking), and ORT documents such files as valid only on the same hardware/EP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from evsam_export.manifest import Artifact
from evsam_export.targets.base import StepContext, artifact_filename


@dataclass(frozen=True)
class Settings:
    # ORT graph optimization level baked into the saved model: basic | extended (see module docstring)
    optimization: str = "extended"
    # execution providers an app should use with this artifact, in order (recorded in the manifest)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    import onnxruntime as ort

    from evsam_export.errors import RecipeError

    if settings.optimization not in ("basic", "extended"):
        raise RecipeError(f"[target] optimization: {settings.optimization!r} is not basic or extended")
    started = time.perf_counter()
    if parent.target == "ort":  # already an ORT artifact (QDQ INT8): ORT fuses QDQ at load, keep it as is
        return []
    path = ctx.folder / artifact_filename(parent.component, "ort", parent.precision, "onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[settings.optimization]
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(str(ctx.path_of(parent)), options, providers=["CPUExecutionProvider"])
    return [ctx.new_artifact(
        parent,
        path,
        target="ort",
        precision=parent.precision,
        step="ort-optimize",
        settings={"optimization": settings.optimization, "providers": list(settings.providers)},
        facts={"ort_version": ort.__version__},
        started=started,
    )]
