"""Task-level gating when ground truth exists: the mIoU drop against PyTorch per prompt kind,
measured with the zero-shot protocol of `evsam-export evaluate` (evaluation.protocol), decides for
lower-precision artifacts; agreement with fp32 is still measured and reported.

A suite with `[[suite.annotations]]` and a `[task]` table (or `validate --annotations FILE --max-drop PTS`)
measures, for every lower-precision artifact, the pipeline it is used in (an encoder with the decoder a
deployment pairs it with; a decoder after an fp32 encoder) and the PyTorch reference on the same ground
truth. How the two criteria combine, for a stage of a precision other than fp32 whose artifact's task
pipeline was measured for every kind of `max_drop` ("covered"):

  - decides: the mIoU drop per prompt kind (`max_drop` points), NaN/Inf (zero, as always), and two floors
    against gross failure: embedding SNR >= `embedding_snr_db_floor` and mask IoU mean vs fp32 >=
    `mask_iou_floor` for every prompt kind of the suite;
  - reported, not deciding: the suite's agreement tolerances for the precision (`Gate.decides = False`).

fp32 artifacts, stages no task pipeline covers, and suites without `max_drop` keep the agreement gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from evsam_export.parity.task_settings import DROP_METRIC, TASK_STAGE, TaskCriterion
from evsam_export.runners.split_decoder import is_split_decoder


def task_datasets(suite) -> list:
    """The suite's annotation sources, loaded (data.coco.Dataset; images are streamed when measured)."""
    from evsam_export.data.coco import AnnotationSet

    return [spec.load() for spec in suite.images if isinstance(spec, AnnotationSet)]


def pipeline_ious(predictor, name: str, kinds: Sequence[str], datasets: Sequence, reporter) -> tuple[dict[str, np.ndarray], dict]:
    """({kind: IoU per instance over all datasets}, {what: why not measured}) of one predictor, by the
    evaluate protocol (one encoder run per image, all of an image's prompts in one call)."""
    from evsam_export.evaluation.protocol import Pipeline, evaluate_dataset, protocol_kinds

    unavailable: dict[str, str] = {}
    pipeline = Pipeline(name, predictor, protocol_kinds(predictor, name, kinds, unavailable))
    collected: dict[str, list] = {kind: [] for kind in pipeline.kinds}
    for dataset in datasets:
        ious, _rows, _seconds = evaluate_dataset([pipeline], dataset, reporter)
        for kind, values in ious[name].items():
            collected[kind].extend(values)
    return {kind: np.asarray(values, dtype=np.float64) for kind, values in collected.items()}, unavailable


def task_reference(manifest, suite, reporter):
    """The `with_model` callback of parity.reference.pytorch_reference that adds the reference's ground-truth
    IoUs for a suite with a [task]; None for a suite without one."""
    if suite is None or suite.task is None:
        return None

    def add(model, variant, reference) -> None:
        reference.task = reference_task_ious(model, variant, manifest, suite, reporter)

    return add


def reference_task_ious(model, variant, manifest, suite, reporter) -> dict[str, np.ndarray]:
    """The PyTorch reference's IoU per instance and prompt kind on the suite's ground truth."""
    from evsam_export.evaluation.protocol import PYTORCH, reference_predictor

    with reference_predictor(manifest, model, variant) as predictor:
        ious, _unavailable = pipeline_ious(predictor, PYTORCH, suite.task.kinds, task_datasets(suite), reporter)
    return ious


@dataclass
class TaskPipeline:
    """An encoder -> decoder pairing measured for the task; `subject` is the lower-precision artifact it
    judges (encoder and decoder stages of that id, or the end-to-end stage of the same pairing)."""

    encoder: object  # manifest Artifact
    decoder: object
    subject: object
    same_as: list = field(default_factory=list)  # pairings this measurement stands for (a split decoder's, with its parent)

    @property
    def name(self) -> str:
        return f"{self.encoder.id} -> {self.decoder.id}"

    @property
    def precision(self) -> str:
        return self.subject.precision


def task_pipelines(report, runners) -> tuple[list[TaskPipeline], dict[str, str]]:
    """The pairings to measure: every end-to-end pairing of a precision other than fp32, and every decoder of
    a precision other than fp32 after an fp32 encoder (its own pipeline, like its decoder stage)."""
    artifacts = {artifact.id: artifact for artifact, _runner in runners}
    pipelines: list[TaskPipeline] = []
    not_measured: dict[str, str] = {}
    for stage in report.stages:
        if stage.stage == "end_to_end" and stage.precision != "fp32":
            encoder_id, decoder_id = stage.pairing.split(" -> ")
            encoder, decoder = artifacts[encoder_id], artifacts[decoder_id]
            # A split decoder computes its parent's values (checked at export), so with its parent's pairing
            # measured, measuring it again would judge the same artifact twice.
            parent = next((p for p in pipelines if p.encoder.id == encoder_id and p.decoder.id == decoder.parent), None)
            if is_split_decoder(decoder) and parent is not None:
                parent.same_as.append(stage.pairing)
                continue
            pipelines.append(TaskPipeline(encoder, decoder, encoder if encoder.precision != "fp32" else decoder))
    fp32_encoders = [a for a, _ in runners if a.component == "encoder" and a.precision == "fp32"]
    for artifact, _runner in runners:
        if artifact.component != "decoder" or artifact.precision == "fp32":
            continue
        if any(p.decoder.id == artifact.id and p.encoder.precision == "fp32" for p in pipelines):
            continue
        if not fp32_encoders:
            not_measured[artifact.id] = "no fp32 encoder artifact to pair the decoder with"
            continue
        pipelines.append(TaskPipeline(fp32_encoders[0], artifact, artifact))
    return pipelines, not_measured


def measure_task(report, runners, manifest, suite, reference_ious: dict, reporter) -> None:
    """Measure the task pipelines of `report`'s lower-precision artifacts on the suite's ground truth, add a
    `task` stage per pipeline, and combine the criteria (module docstring). No-op for a suite without [task]."""
    from evsam_export.evaluation.report import drop_points
    from evsam_export.parity.compare import Gate, StageReport
    from evsam_export.runtime.predictor import Predictor

    if suite.task is None:
        return
    criterion = suite.task
    runner_of = {artifact.id: runner for artifact, runner in runners}
    datasets = task_datasets(suite)
    pipelines, not_measured = task_pipelines(report, runners)
    report.task = {"max_drop": criterion.max_drop, "embedding_snr_db_floor": criterion.embedding_snr_db_floor,
                   "mask_iou_floor": criterion.mask_iou_floor, "kinds": list(criterion.kinds),
                   "instances": sum(d.instance_count for d in datasets), "images": sum(len(d.images) for d in datasets),
                   "reference_miou": {kind: _mean(values) for kind, values in reference_ious.items()},
                   "not_measured": dict(not_measured)}
    covered_artifacts, covered_pairings = set(), set()
    for pipeline in pipelines:
        # The runners stay owned by the comparison (open_runners closes them); the predictor only borrows them.
        predictor = Predictor.from_runners(manifest, pipeline.encoder, pipeline.decoder,
                                           runner_of[pipeline.encoder.id], runner_of[pipeline.decoder.id])
        ious, unavailable = pipeline_ious(predictor, pipeline.name, criterion.kinds, datasets, reporter)
        report.task["not_measured"].update(unavailable)
        stage = StageReport(pipeline.subject.id, TASK_STAGE, pipeline.precision, pairing=pipeline.name)
        for kind in criterion.kinds:
            if kind not in ious or kind not in reference_ious:
                continue
            miou, reference = _mean(ious[kind]), _mean(reference_ious[kind])
            drop = drop_points(reference, miou)
            stage.per_kind[kind] = {"miou": miou, "reference_miou": reference, "drop_points": drop, "instances": int(ious[kind].size)}
            if criterion.decides and kind in criterion.max_drop:
                stage.gates.append(Gate(stage.artifact, TASK_STAGE, kind, DROP_METRIC, drop, criterion.max_drop[kind], "<=",
                                        pairing=stage.pairing))
        report.stages.append(stage)
        if criterion.decides and all(kind in stage.per_kind for kind in criterion.max_drop):
            covered_artifacts.add(pipeline.subject.id)
            covered_pairings.update([pipeline.name, *pipeline.same_as])
    for stage in report.stages:
        if stage.stage == TASK_STAGE or stage.precision == "fp32":
            continue
        covered = stage.pairing in covered_pairings if stage.stage == "end_to_end" else stage.artifact in covered_artifacts
        if covered:
            _task_decides(stage, criterion, Gate)


def _task_decides(stage, criterion: TaskCriterion, gate_cls) -> None:
    """Agreement gates of a covered stage become advisory; NaN/Inf and the floors decide."""
    for gate in stage.gates:
        gate.decides = gate.metric == "nonfinite"
    if stage.stage == "encoder":
        snr = stage.per_kind.get("all", {}).get("snr_db_min", float("nan"))
        stage.gates.append(gate_cls(stage.artifact, stage.stage, "all", "embedding_snr_db.min.floor", float(snr),
                                    criterion.embedding_snr_db_floor, ">="))
        return
    for kind, entry in stage.per_kind.items():
        mean = entry.get("mask_iou", {}).get("mean")
        stage.gates.append(gate_cls(stage.artifact, stage.stage, kind, "mask_iou.mean.floor",
                                    float("nan") if mean is None else float(mean), criterion.mask_iou_floor, ">="))


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
