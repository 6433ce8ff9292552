"""What every build step (precision and target modules) receives and returns.

A step is a function `build(ctx: StepContext, parent: Artifact, settings) -> list[Artifact]`:
it reads `parent`'s file from `ctx.folder`, writes its own files into `ctx.folder` (named
`<component>.<target>.<precision>.<ext>`), and returns manifest entries whose `parent` is `parent.id`.
`ctx.gate(artifacts)` runs the parity comparison on candidate artifacts in memory (used by automatic
fallback); `ctx.calibration` yields deterministic feeds for quantization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from evsam_export import contract
from evsam_export.manifest import Artifact, Manifest, sha256_file, verify_artifact_file
from evsam_export.model.variants import Variant
from evsam_export.progress import Reporter

if TYPE_CHECKING:  # the parity modules load numpy and images; a step that never gates needs neither
    from evsam_export.parity.compare import ParityReport
    from evsam_export.parity.reference import SuiteReference

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

    def gate(self, candidates: list[Artifact], only_candidates: bool = False) -> ParityReport:
        """Parity report of `candidates` (plus the fp32 ONNX artifacts they pair with) on the suite.

        In memory: runners on the files in `folder`, compared with the suite's reference held in
        `references`; nothing is written, and the folder's manifest.json is left as it was.
        `only_candidates` (a build gate): the fp32 artifacts only feed the candidates' end-to-end stages, and a
        candidate that already failed a stage stops there (parity.compare's `subjects`)."""
        from evsam_export.parity.compare import compare, open_runners
        from evsam_export.parity.task import measure_task

        # The split decoder's halves compute the fp32 decoder's values (checked at export): gating a candidate
        # with them too would repeat the decoder and end-to-end stages of every fallback round.
        chosen = [a for a in self.manifest.artifacts
                  if a.target == "onnx" and a.precision == "fp32" and a.component not in contract.SPLIT_DECODER]
        for candidate in candidates:  # a candidate replaces an artifact of its id, as Manifest.add does
            chosen = [a for a in chosen if a.id != candidate.id] + [candidate]
        for artifact in chosen:
            verify_artifact_file(self.folder, artifact)
        quiet = Reporter(quiet=True)
        held = self.suite_reference(quiet)
        with open_runners(self.folder, chosen, self.threads) as (runners, unavailable):
            report = compare(runners, held.cases, held.reference, held.suite, self.manifest.variant, unavailable, quiet,
                             subjects={c.id for c in candidates} if only_candidates else None)
            measure_task(report, runners, self.manifest, held.suite, held.reference.task, quiet)
        report.folder = self.folder
        return report

    def suite_reference(self, reporter: Reporter) -> SuiteReference:
        """The suite's cases and PyTorch reference, computed on first use and kept in `references`."""
        from evsam_export.parity.reference import SuiteReference, build_cases, pytorch_reference
        from evsam_export.parity.suites import load_suite
        from evsam_export.parity.task import task_reference

        key = (self.suite, self.manifest.weights.get("sha256"))
        if key not in self.references:
            suite = load_suite(self.suite, self.ground_truth)
            cases = build_cases(suite, self.manifest.encoder_size, reporter)
            reference = pytorch_reference(self.manifest, self.folder, cases, reporter,
                                          with_model=task_reference(self.manifest, suite, reporter))
            self.references[key] = SuiteReference(suite, cases, reference)
        return self.references[key]
