"""What every build step (precision and target modules) receives and returns.

A step is a function `build(ctx: StepContext, parent: Artifact, settings) -> list[Artifact]`:
it reads `parent`'s file from `ctx.folder`, writes its own files into `ctx.folder` (named
`<component>.<target>.<precision>.<ext>`), and returns manifest entries whose `parent` is `parent.id`.
`ctx.gate(artifacts)` runs the parity comparison on candidate artifacts in memory (used by automatic
fallback) through the gate the context was given (`gating`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export.files import sha256_file
from evsam_export.manifest import Artifact, Manifest
from evsam_export.model.variants import Variant
from evsam_export.progress import Reporter

# What a derived decoder (optimised, fp16, INT8...) computes the same way as its parent graph.
INHERITED_DECODER_SETTINGS = ("single_mask", "single_mask_rule", "pad_points_in_graph")


def artifact_id(component: str, target: str, precision: str) -> str:
    return f"{component}.{target}.{precision}"


def artifact_filename(component: str, target: str, precision: str, ext: str) -> str:
    """encoder.fp16.onnx (plain ONNX), encoder.ort.int8.onnx, encoder.openvino.fp16.xml, decoder.tensorrt.fp16.engine"""
    if target == "onnx":
        return f"{component}.{precision}.{ext}"
    return f"{component}.{target}.{precision}.{ext}"


@dataclass
class StepContext:
    folder: Path  # where artifacts are written (a staging folder during a run)
    manifest: Manifest  # artifacts built so far (parents are looked up here)
    variant: Variant
    reporter: Reporter = field(default_factory=Reporter)
    suite: str = "default"  # parity suite used by gate()
    threads: int | None = None
    # (suite, weights sha256) -> parity.reference.SuiteReference, filled by suite_reference(). replace()
    # shares this dict, so a copy that gates on another suite (fallback.gate_context) adds to the same one.
    references: dict = field(default_factory=dict)
    # parity.task.GroundTruth of the recipe's [validate]: every gate suite runs on it (task gating).
    ground_truth: object = None
    # The parity gate (parity.gate.ParityGate), passed in by whoever builds the context: the step contract sits
    # below the parity package, so gating is a function it is given, not one it imports. None: no gating.
    gating: object = None

    def path_of(self, artifact: Artifact) -> Path:
        return self.folder / artifact.path

    def new_artifact(
        self,
        parent: Artifact,
        path: Path,
        target: str,
        precision: str,
        step: str,
        settings: dict,
        facts: dict | None = None,
        started: float | None = None,
        inputs=None,
        outputs=None,
        extra_files: list[str] | None = None,
    ) -> Artifact:
        """A manifest entry for a file this step wrote, derived from its parent's IO contract."""
        return Artifact(
            id=artifact_id(parent.component, target, precision),
            component=parent.component,
            target=target,
            precision=precision,
            path=Path(path).relative_to(self.folder).as_posix(),
            sha256=sha256_file(path),
            size_bytes=Path(path).stat().st_size + sum((self.folder / f).stat().st_size for f in extra_files or []),
            inputs=list(inputs if inputs is not None else parent.inputs),
            outputs=list(outputs if outputs is not None else parent.outputs),
            parent=parent.id,
            step=step,
            settings=dict(settings, **{key: parent.settings[key] for key in INHERITED_DECODER_SETTINGS if key in parent.settings}),
            facts=facts or {},
            wall_time_s=round(time.perf_counter() - started, 2) if started is not None else 0.0,
            extra_files=list(extra_files or []),
        )

    def gate(self, candidates: list[Artifact], only_candidates: bool = False):
        """parity.compare.ParityReport of `candidates` (plus the fp32 ONNX artifacts they pair with) on the suite,
        from the gate this context was given (parity.gate.ParityGate): in memory, nothing written.
        `only_candidates` (a build gate): the fp32 artifacts only feed the candidates' end-to-end stages, and a
        candidate that already failed a stage stops there (parity.compare's `subjects`)."""
        return self._gating().report(self, candidates, only_candidates=only_candidates)

    def suite_reference(self, reporter: Reporter):
        """The suite's cases and PyTorch reference (parity.reference.SuiteReference), computed on first use and
        kept in `references`."""
        return self._gating().suite_reference(self, reporter)

    def load_suite(self, name: str):
        """The parity suite `name` (its prompts and tolerances), read by the gate this context was given."""
        return self._gating().load_suite(name)

    def _gating(self):
        if self.gating is None:
            raise RuntimeError("this step context was built without a parity gate: pass gating=ParityGate() "
                               "(evsam_export.parity.gate) to StepContext")
        return self.gating
