"""ONNX Runtime target: the graph ORT would build at session start, optimized once and saved ("offline
mode"), so an app's session starts faster and runs exactly the graph we validated.

Saved at EXTENDED level, not ALL: ALL adds layout transformations specific to the CPU that ran the
optimization (NCHWc blocking), and ORT documents such files as valid only on the same hardware/EP.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from evsam_export.manifest import Artifact
from evsam_export.pipeline.step import StepContext, artifact_filename
from evsam_export.export.graph_passes import ORT_PASSES, check_pass_names


@dataclass(frozen=True)
class Settings:
    # ORT graph optimization level baked into the saved model: basic | extended (see module docstring)
    optimization: str = "extended"
    # execution providers an app should use with this artifact, in order (recorded in the manifest)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # graph passes applied before ORT's own optimizer (graph_passes.py; ORT-only ones allowed here)
    graph_passes: tuple[str, ...] = ORT_PASSES

    def __post_init__(self) -> None:  # recipes give lists; keep the frozen object hashable
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "graph_passes", check_pass_names(self.graph_passes, ("portable", "onnxruntime")))


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    import onnxruntime as ort

    from evsam_export.errors import RecipeError

    if settings.optimization not in ("basic", "extended"):
        raise RecipeError(f"[target] optimization: {settings.optimization!r} is not basic or extended")
    started = time.perf_counter()
    if parent.target == "ort":  # already an ORT artifact (QDQ INT8): ORT fuses QDQ at load, keep it as is
        return []
    path = ctx.folder / artifact_filename(parent.component, "ort", parent.precision, "onnx")
    source = ctx.path_of(parent)
    pass_facts = {"passes": {}}
    scratch = None
    if settings.graph_passes:
        import tempfile

        import onnx

        from evsam_export.export.graph_passes import apply_checked
        from evsam_export.export.onnx_export import artifact_spec

        with ctx.reporter.step(f"{parent.component}: graph passes ({', '.join(settings.graph_passes)})"):
            rewritten, pass_facts = apply_checked(onnx.load(str(source)), settings.graph_passes, artifact_spec(parent))
        if any(pass_facts["passes"].values()):
            scratch = Path(tempfile.mkdtemp(prefix=".ort-", dir=ctx.folder))
            source = scratch / "passes.onnx"
            onnx.save(rewritten, str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[settings.optimization]
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return [ctx.new_artifact(
        parent,
        path,
        target="ort",
        precision=parent.precision,
        step="ort-optimize",
        settings={"optimization": settings.optimization, "providers": list(settings.providers),
                  "graph_passes": list(settings.graph_passes)},
        facts={"ort_version": ort.__version__, "graph_passes": pass_facts},
        started=started,
    )]
