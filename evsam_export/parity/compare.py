"""The parity comparison, in memory: runners + cases + reference + tolerances in, stage reports out.

Like Polygraphy's comparator, it knows nothing about folders or manifests: `compare` takes the runners
(each with the manifest entry of what it runs), the suite's cases, the PyTorch `Reference` and the suite's
tolerances, and gates three stages, so a failure says where it comes from:
  1. encoder  - each encoder artifact's embeddings vs the PyTorch encoder (SNR, cosine, max abs);
  2. decoder  - each decoder artifact fed the *reference* embeddings (isolates decoder error from encoder
                drift, as optimum-intel's SAM test does): mask IoU per token, logit and IoU-score diffs;
  3. end_to_end - encoder artifact -> decoder artifact: mask IoU and stable-mask IoU.
Plus a NaN/Inf gate on every output. `open_runners` makes and loads the runners of artifacts in a folder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evsam_export import contract, metrics
from evsam_export.cache import RecentlyUsed, cache_key
from evsam_export.errors import RuntimeUnavailable
from evsam_export.files import sha256_file
from evsam_export.manifest import Artifact
from evsam_export.model import processing
from evsam_export.model.variants import NUM_MASK_TOKENS
from evsam_export.parity.reference import Case, CaseSet, Reference, cases_key, decoder_feeds
from evsam_export.parity.suites import Suite, Tolerance
from evsam_export.progress import Reporter
from evsam_export.runners import runner_for_artifact
from evsam_export.runners.base import Runner
from evsam_export.runners.split_decoder import is_split_decoder, split_artifact, split_runner
from evsam_export.runtime.pairing import end_to_end_pairings, looser_precision

# ------------------------------------------------------------------------------------------ results


@dataclass
class Gate:
    artifact: str
    stage: str
    kind: str  # prompt kind, or "all"
    metric: str
    value: float
    threshold: float
    op: str  # ">=" or "<=" or "=="
    # False: measured and reported, but not deciding (agreement gates under task gating, parity.task).
    decides: bool = True
    # End to end: "encoder-id -> decoder-id", so two pairings of one encoder read as two lines, not one twice.
    pairing: str = ""

    @property
    def failed(self) -> bool:
        """A deciding gate whose value misses its threshold."""
        return self.decides and not self.passed

    @property
    def passed(self) -> bool:
        if isinstance(self.value, float) and math.isnan(self.value):
            return False
        if self.op == ">=":
            return self.value >= self.threshold
        if self.op == "<=":
            return self.value <= self.threshold
        return self.value == self.threshold

    def line(self) -> str:
        advisory = "" if self.decides else ", advisory: task gating decides"
        subject = self.pairing or self.artifact
        return f"{subject} [{self.stage}/{self.kind}] {self.metric} = {self.value:.6g} (needs {self.op} {self.threshold:g}{advisory})"

    def to_json(self) -> dict:
        value = None if isinstance(self.value, float) and not math.isfinite(self.value) and math.isnan(self.value) else self.value
        if isinstance(value, float) and math.isinf(value):
            value = "inf" if value > 0 else "-inf"
        return {"artifact": self.artifact, "stage": self.stage, "kind": self.kind, "metric": self.metric,
                "value": value, "threshold": self.threshold, "op": self.op, "passed": self.passed, "decides": self.decides,
                **({"pairing": self.pairing} if self.pairing else {})}


@dataclass
class StageReport:
    artifact: str
    stage: str  # encoder | decoder | end_to_end
    precision: str
    pairing: str = ""  # end_to_end: "encoder-id -> decoder-id"
    per_kind: dict = field(default_factory=dict)  # kind -> metrics dict
    gates: list[Gate] = field(default_factory=list)
    worst: list[dict] = field(default_factory=list)  # worst cases (for overlays)

    @property
    def passed(self) -> bool:
        return not any(g.failed for g in self.gates)


@dataclass
class ParityReport:
    variant: str
    suite: str
    stages: list[StageReport] = field(default_factory=list)
    unavailable: dict = field(default_factory=dict)  # artifact id -> reason
    reference_source: str = ""
    folder: Path | None = None  # the artifact folder, when the runners were made from one
    images: int = 0  # images the cases were made from
    skipped_images: list = field(default_factory=list)  # data.images.SkippedImage: unreadable files of a folder
    task: dict | None = None  # ground-truth measurement summary (parity.task), None without a [task] suite

    @property
    def gates(self) -> list[Gate]:
        return [g for s in self.stages for g in s.gates]

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if g.failed]

    @property
    def advisory_misses(self) -> list[Gate]:
        """Agreement gates that miss their threshold but do not decide (task gating)."""
        return [g for g in self.gates if not g.decides and not g.passed]

    @property
    def passed(self) -> bool:
        return bool(self.stages) and not self.failed_gates


# ------------------------------------------------------------------------------------------ comparisons


def _gate_min(stage: StageReport, kind: str, metric: str, value: float, threshold: float | None) -> None:
    if threshold is not None:
        stage.gates.append(Gate(stage.artifact, stage.stage, kind, metric, float(value), float(threshold), ">=",
                                pairing=stage.pairing))


def _gate_max(stage: StageReport, kind: str, metric: str, value: float, threshold: float | None) -> None:
    if threshold is not None:
        stage.gates.append(Gate(stage.artifact, stage.stage, kind, metric, float(value), float(threshold), "<=",
                                pairing=stage.pairing))


def reference_tokens(artifact: Artifact, case: Case, reference: Reference, tokens: list[int]):
    """(low-res logits, IoU, full-size logits) of the reference tokens `artifact` returns for `case`: a sam-onnx
    single-mask decoder picks its token per prompt set (contract.single_mask_tokens)."""
    rule = artifact.settings.get("single_mask_rule", "token0")
    if tokens != [0] or rule == "token0":
        return reference.low_res[case.key][:, tokens], reference.iou[case.key][:, tokens], reference.full_size(case, tokens)
    all_tokens = list(range(NUM_MASK_TOKENS))
    chosen = contract.single_mask_tokens(reference.iou[case.key], case.point_coords.shape[1], rule)[:, None]
    full = reference.full_size(case, all_tokens)
    return (np.take_along_axis(reference.low_res[case.key], chosen[:, :, None, None], axis=1),
            np.take_along_axis(reference.iou[case.key], chosen, axis=1),
            np.take_along_axis(full, chosen[:, :, None, None], axis=1))


def token_indices(artifact: Artifact) -> list[int]:
    single = bool(artifact.settings.get("single_mask"))
    return [0] if single else list(range(NUM_MASK_TOKENS))


def compare_masks(case: Case, ref_full: np.ndarray, test_low: np.ndarray, margin: float | None):
    """Per-mask IoU (and stable IoU) of binarised masks at the original image size, shared post-processing."""
    test_full = processing.postprocess_masks(test_low, case.geometry)
    iou = metrics.mask_iou(processing.binarize(ref_full), processing.binarize(test_full))
    stable = metrics.stable_mask_iou(ref_full, test_full, margin) if margin is not None else None
    return iou, stable, ref_full, test_full


# Pixels whose host-upscaled logit is this close to the threshold may flip sign between two correct bilinear
# implementations (ORT's Resize and numpy round differently, ~1e-6 at |logit| ~10): with trained-size logits
# a single flipped boundary pixel of a small mask cost 0.008 IoU (realistic l0, boxes16), so they are not
# counted. 1e-3 is the fp32 gates' logit tolerance.
IN_GRAPH_UPSCALE_MARGIN = 1e-3


def in_graph_upscale_agreement(host_logits: np.ndarray, graph_logits: np.ndarray) -> float:
    """Worst mask IoU of the graph's own upscaled `masks` against the shared host post-processing, over the
    pixels the host is sure about (|logit| > IN_GRAPH_UPSCALE_MARGIN)."""
    return float(metrics.stable_mask_iou(host_logits, graph_logits, IN_GRAPH_UPSCALE_MARGIN).min())


def evaluate_decoder_outputs(stage: StageReport, tol: Tolerance, cases, outputs_by_case, reference: Reference, artifact: Artifact) -> None:
    tokens = token_indices(artifact)
    by_kind: dict[str, dict[str, list]] = {}
    worst = []
    for case in cases:
        out = outputs_by_case[case.key]
        ref_low, ref_iou, ref_full = reference_tokens(artifact, case, reference, tokens)
        test_low, test_iou = out["low_res_masks"], out["iou_predictions"]
        bucket = by_kind.setdefault(case.kind, {"iou": [], "stable": [], "logit": [], "score": [], "nonfinite": 0, "inmask": []})
        bucket["nonfinite"] += sum(metrics.nonfinite_count(v) for v in out.values())
        if test_low.shape != ref_low.shape:
            bucket["iou"].append(np.zeros(1))
            continue
        iou, stable, _ref_full, test_full = compare_masks(case, ref_full, test_low, tol.stable_margin)
        bucket["iou"].append(iou.ravel())
        if stable is not None:
            bucket["stable"].append(stable.ravel())
        bucket["logit"].append(metrics.max_abs_diff(ref_low, test_low))
        bucket["score"].append(metrics.max_abs_diff(ref_iou, test_iou))
        if "masks" in out:  # sam profile: the in-graph upscaling must equal the shared host post-processing
            bucket["inmask"].append(in_graph_upscale_agreement(test_full, out["masks"]))
        worst.append(
            {
                "case": case,
                "iou": float(iou.min()),
                "token": tokens[int(np.argmin(iou.min(axis=0)))] if iou.ndim > 1 else tokens[0],
                "prompt_set": int(np.argmin(iou.min(axis=1))) if iou.ndim > 1 else 0,
                "test_low": test_low,
                "ref_low": ref_low,
            }
        )
    for kind, bucket in by_kind.items():
        summary = metrics.summarize(np.concatenate(bucket["iou"]) if bucket["iou"] else [])
        entry = {"mask_iou": summary.as_dict(), "nonfinite": bucket["nonfinite"]}
        _gate_min(stage, kind, "mask_iou.mean", summary.mean, tol.mask_iou_mean_min)
        _gate_min(stage, kind, "mask_iou.p5", summary.p5, tol.mask_iou_p5_min)
        if bucket["stable"]:
            stable = metrics.summarize(np.concatenate(bucket["stable"]))
            entry["stable_mask_iou"] = stable.as_dict()
            _gate_min(stage, kind, "stable_mask_iou.mean", stable.mean, tol.stable_mask_iou_mean_min)
        if bucket["logit"]:
            entry["logit_max_abs"] = max(bucket["logit"])
            entry["iou_pred_max_abs"] = max(bucket["score"])
            if stage.stage == "decoder":
                _gate_max(stage, kind, "logit_max_abs", entry["logit_max_abs"], tol.decoder_logit_max_abs)
                _gate_max(stage, kind, "iou_pred_max_abs", entry["iou_pred_max_abs"], tol.iou_pred_max_abs)
        if bucket["inmask"]:
            entry["in_graph_upscale_iou_min"] = min(bucket["inmask"])
            _gate_min(stage, kind, "in_graph_upscale_iou.min", entry["in_graph_upscale_iou_min"], 0.999)
        if not tol.allow_nonfinite:
            stage.gates.append(Gate(stage.artifact, stage.stage, kind, "nonfinite", float(bucket["nonfinite"]), 0.0, "==",
                                   pairing=stage.pairing))
        stage.per_kind[kind] = entry
    stage.worst = sorted(worst, key=lambda w: w["iou"])[:2]


# ------------------------------------------------------------------------------------------ measured stages

# Stages this process has measured, by what decides their result: the runtime files' bytes, the runner's
# threads, the cases and PyTorch reference, and the tolerances. cpu-auto's candidates share the fp32 export,
# and the gate of the pair it recommends repeats their stages: each is measured once. An entry holds its two
# worst cases' logits (report overlays, up to 2 x 16 MB for 16 boxes), so only the most recently used are kept.
MEASURED_STAGES_KEPT = 16
_MEASURED = RecentlyUsed(MEASURED_STAGES_KEPT)


def artifact_content_key(folder: Path, artifacts: Sequence[Artifact], threads: int | None) -> str:
    """What a runner made from `artifacts` (one, or a split decoder's two halves) computes from: every file's
    sha256 (the manifest's for the main file, which callers verify; extra files such as OpenVINO's .bin
    hashed here), the targets and the thread count."""
    files = []
    for artifact in artifacts:
        extras = [sha256_file(Path(folder) / name) for name in artifact.extra_files if (Path(folder) / name).is_file()]
        files.append([artifact.target, artifact.precision, artifact.sha256, extras])
    return cache_key({"threads": threads, "files": files})


def comparison_key(cases: CaseSet, reference: Reference, suite: Suite, variant: str) -> str:
    """The cases (encoder inputs, prompts, fed-back masks) and the reference they are judged against."""
    return cache_key({"variant": variant, "suite": suite.name, "weights": reference.weights_sha256,
                      "source": reference.source, "cases": cases_key(cases)})


def _stage_key(context: str, stage: str, subjects: list[tuple[str, str]], tol: Tolerance) -> str | None:
    """`subjects`: (artifact id, content key) of the stage's runners; None (not kept) when one has no content key."""
    if not all(content for _, content in subjects):
        return None
    return cache_key({"context": context, "stage": stage, "subjects": subjects, "tolerance": repr(tol)})


def _measured(key: str | None) -> StageReport | None:
    stage = _MEASURED.get(key)
    return None if stage is None else copy.deepcopy(stage)


def _remember(key: str | None, stage: StageReport) -> None:
    _MEASURED.put(key, copy.deepcopy(stage))


# ------------------------------------------------------------------------------------------ runners


@contextmanager
def open_runners(folder: Path, artifacts: Sequence[Artifact], threads: int | None = None
                 ) -> Iterator[tuple[list[tuple[Artifact, Runner]], dict[str, str]]]:
    """([(artifact, loaded runner)], {artifact id: why no runner}) for the encoder and decoder artifacts
    among `artifacts` (files under `folder`), in their order; every runner is closed on exit."""
    runners, unavailable = [], {}
    try:
        for artifact in artifacts:
            entry, make = artifact, lambda artifact=artifact: runner_for_artifact(folder, artifact, threads=threads)  # noqa: E731
            image = None
            if artifact.component == contract.DECODER_PROMPT:
                # The split decoder is gated as one decoder: its halves chained behind the single graph's contract.
                image = next((a for a in artifacts if a.component == contract.DECODER_IMAGE and a.parent == artifact.parent), None)
                if image is None:
                    unavailable[artifact.id] = f"{artifact.id} runs only with its image half (decoder_image, parent {artifact.parent})"
                    continue
                entry = split_artifact(image, artifact)
                make = lambda image=image, prompt=artifact: split_runner(folder, image, prompt, threads)  # noqa: E731
            elif artifact.component not in ("encoder", "decoder") or artifact.facts.get("kit_only"):
                continue
            try:
                runner = make().load()
                halves = [image, artifact] if entry is not artifact else [artifact]
                runner.content_key = artifact_content_key(folder, halves, threads)
                runners.append((entry, runner))
            except RuntimeUnavailable as exc:
                unavailable[entry.id] = exc.message
        yield runners, unavailable
    finally:
        for _artifact, runner in runners:
            runner.close()


# ------------------------------------------------------------------------------------------ the comparison


def compare(
    runners: Sequence[tuple[Artifact, Runner]],
    cases: CaseSet,
    reference: Reference,
    suite: Suite,
    variant: str,
    unavailable: Mapping[str, str] | None = None,
    reporter: Reporter | None = None,
    subjects: Collection[str] | None = None,
) -> ParityReport:
    """Gate every runner against `reference` on `cases` with `suite`'s tolerances for its precision.

    `runners` pairs each loaded runner with the manifest entry of what it runs (id, component, precision,
    IO contract); `unavailable` (artifact id -> reason) is carried into the report as is. `subjects` (a build
    gate's candidates): only their stages are measured (the other runners only feed their end-to-end pairings),
    cheap stages first, and when the suite's agreement gates decide (no [task]) a subject whose encoder or
    decoder stage failed gets no end-to-end stage: its verdict is already known."""
    reporter = reporter or Reporter()
    report = ParityReport(variant=variant, suite=suite.name, reference_source=reference.source,
                          unavailable=dict(unavailable or {}), images=len(cases.images), skipped_images=list(cases.skipped))
    runner_of = {artifact.id: runner for artifact, runner in runners}
    encoders = [a for a, _ in runners if a.component == "encoder"]
    decoders = [a for a, _ in runners if a.component == "decoder"]
    split = [d for d in decoders if is_split_decoder(d)]
    single = [d for d in decoders if not is_split_decoder(d)]
    pairings = end_to_end_pairings(encoders, single, split)
    if subjects is not None:
        pairings = [(e, d) for e, d in pairings if e.id in subjects or d.id in subjects]
        needed = {e.id for e, _ in pairings} | set(subjects)
        encoders = [a for a in encoders if a.id in needed]
        decoders = [a for a in decoders if a.id in subjects]
    stop_early = subjects is not None and suite.task is None
    failed: set[str] = set()

    # Stages measured before in this process on the same bytes, cases and tolerances are taken as they were.
    context = comparison_key(cases, reference, suite, variant)
    content_of = {artifact.id: getattr(runner, "content_key", "") for artifact, runner in runners}
    embeddings_of: dict[str, dict[str, np.ndarray]] = {}

    def embeddings(artifact: Artifact) -> dict[str, np.ndarray]:
        # An app-profile encoder gets the raw image, so its stage also measures its in-graph preprocessing.
        if artifact.id not in embeddings_of:
            raw_pixels = contract.artifact_spec(artifact).profile == "app"
            feeds = {image.name: contract.encoder_feeds(artifact, image.rgb if raw_pixels else cases.inputs[image.name])
                     for image in cases.images}
            embeddings_of[artifact.id] = {name: runner_of[artifact.id].infer(feed)[contract.IMAGE_EMBEDDINGS]
                                          for name, feed in reporter.track(list(feeds.items()), f"{artifact.id}: encoder stage")}
        return embeddings_of[artifact.id]

    for artifact in encoders:
        if subjects is not None and artifact.id not in subjects:
            continue  # only feeds end-to-end pairings, which run it when they need it
        tol = suite.tolerance(artifact.precision, contract.artifact_spec(artifact).profile)
        key = _stage_key(context, "encoder", [(artifact.id, content_of[artifact.id])], tol)
        stage = _measured(key)
        if stage is None:
            stage = StageReport(artifact.id, "encoder", artifact.precision)
            outputs = embeddings(artifact)
            comparisons = [metrics.compare_tensors(reference.embeddings[image.name], outputs[image.name]) for image in cases.images]
            snr = min(c.snr_db for c in comparisons)
            cos = min(c.cosine for c in comparisons)
            nonfinite = sum(c.nonfinite for c in comparisons)
            stage.per_kind["all"] = {"snr_db_min": snr, "cosine_min": cos, "max_abs": max(c.max_abs for c in comparisons),
                                     "per_image": {img.name: c.as_dict() for img, c in zip(cases.images, comparisons)},
                                     "nonfinite": nonfinite}
            _gate_min(stage, "all", "embedding_snr_db.min", snr, tol.embedding_snr_db_min)
            _gate_min(stage, "all", "embedding_cosine.min", cos, tol.embedding_cosine_min)
            if not tol.allow_nonfinite:
                stage.gates.append(Gate(artifact.id, "encoder", "all", "nonfinite", float(nonfinite), 0.0, "=="))
            _remember(key, stage)
        report.stages.append(stage)
        failed |= set() if stage.passed else {artifact.id}

    for artifact in decoders:
        tol = suite.tolerance(artifact.precision)
        key = _stage_key(context, "decoder", [(artifact.id, content_of[artifact.id])], tol)
        stage = _measured(key)
        if stage is None:
            stage = StageReport(artifact.id, "decoder", artifact.precision)
            outputs = {}
            for case in reporter.track(cases.cases, f"{artifact.id}: decoder stage"):
                feeds = decoder_feeds(case, reference.embeddings[case.image.name], artifact.inputs)
                outputs[case.key] = runner_of[artifact.id].infer(feeds)
            evaluate_decoder_outputs(stage, tol, cases.cases, outputs, reference, artifact)
            _remember(key, stage)
        report.stages.append(stage)
        failed |= set() if stage.passed else {artifact.id}

    for encoder, decoder in pairings:
        if stop_early and (encoder.id in failed or decoder.id in failed):
            continue
        precision = looser_precision(encoder.precision, decoder.precision)
        tol = suite.tolerance(precision, contract.artifact_spec(encoder).profile)
        key = _stage_key(context, "end_to_end", [(a.id, content_of[a.id]) for a in (encoder, decoder)], tol)
        stage = _measured(key)
        if stage is None:
            stage = StageReport(encoder.id, "end_to_end", precision, pairing=f"{encoder.id} -> {decoder.id}")
            outputs = {}
            encoded = embeddings(encoder)
            for case in reporter.track(cases.cases, f"{encoder.id} -> {decoder.id}: end to end"):
                outputs[case.key] = runner_of[decoder.id].infer(decoder_feeds(case, encoded[case.image.name], decoder.inputs))
            evaluate_decoder_outputs(stage, tol, cases.cases, outputs, reference, decoder)
            _remember(key, stage)
        report.stages.append(stage)
    return report
