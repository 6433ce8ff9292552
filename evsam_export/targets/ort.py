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

from evsam_export.errors import RecipeError
from evsam_export.export.graph_passes import ORT_PASSES, check_pass_names
from evsam_export.manifest import Artifact
from evsam_export.steps.settings import SettingValueError, StepSettings
from evsam_export.steps.step import StepContext, artifact_filename

OPTIMIZATION_LEVELS = ("basic", "extended")
# The decoder precisions at which this step also builds the split decoder's halves (pipeline/split_lowering.py):
# the export writes them at fp32 only, and no precision step lowers them.
SPLIT_DECODER_PRECISIONS = ("fp32",)


@dataclass(frozen=True)
class Settings(StepSettings):
    # ORT graph optimization level baked into the saved model: basic | extended (see module docstring)
    optimization: str = "extended"
    # execution providers an app should use with this artifact, in order (recorded in the manifest)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # graph passes applied before ORT's own optimizer (graph_passes.py; ORT-only ones allowed here)
    graph_passes: tuple[str, ...] = ORT_PASSES

    def check(self) -> None:
        import onnxruntime as ort

        self.require_one_of("optimization", OPTIMIZATION_LEVELS)
        if not self.providers:
            raise SettingValueError("providers", "name at least one execution provider", hint="e.g. [\"CPUExecutionProvider\"]")
        known = ort.get_all_providers()  # every provider name this onnxruntime knows, installed or not
        for provider in self.providers:
            if provider not in known:
                raise SettingValueError("providers", f"{provider!r} is not an ONNX Runtime execution provider",
                                        hint=f"known: {', '.join(known)}")
        if len(set(self.providers)) != len(self.providers):
            raise SettingValueError("providers", f"{list(self.providers)} names a provider twice")
        try:
            check_pass_names(self.graph_passes, ("portable", "onnxruntime"))
        except RecipeError as error:
            raise SettingValueError("graph_passes", error.message, hint=error.hint) from error


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    import onnxruntime as ort

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
