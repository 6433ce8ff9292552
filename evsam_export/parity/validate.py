"""The parity gate: run every artifact of a folder through its runner and compare it with PyTorch.

Three stages, so a failure says where it comes from:
  1. encoder  - each encoder artifact's embeddings vs the PyTorch encoder (SNR, cosine, max abs);
  2. decoder  - each decoder artifact fed the *reference* embeddings (isolates decoder error from encoder
                drift, as optimum-intel's SAM test does): mask IoU per token, logit and IoU-score diffs;
  3. end_to_end - encoder artifact -> decoder artifact: mask IoU and stable-mask IoU.
Plus a NaN/Inf gate on every output. Reference outputs can be saved to / loaded from an .npz file, so a
machine without torch can validate against references computed elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evsam_export.calibration.images import PromptSet, ValidationImage, load_image_spec, prompts_for
from evsam_export.errors import ArtifactError, CheckpointError, RuntimeUnavailable
from evsam_export.manifest import Artifact, Manifest, read_manifest, verify_artifact_file
from evsam_export.model import processing
from evsam_export.model.variants import LOW_RES_MASK_SIZE, NUM_MASK_TOKENS, get_variant
from evsam_export.parity import metrics
from evsam_export.parity.suites import Suite, Tolerance
from evsam_export.progress import Reporter

REFERENCE_FORMAT = "evsam-export/parity-reference-v1"


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One image x prompt kind, with everything both sides are fed."""

    image: ValidationImage
    kind: str
    prompts: PromptSet
    geometry: processing.ImageGeometry
    point_coords: np.ndarray
    point_labels: np.ndarray
    mask_input: np.ndarray  # [1,1,256,256] (zeros when unused)
    has_mask_input: np.ndarray  # [1]

    @property
    def key(self) -> str:
        return f"{self.image.name}/{self.kind}"


@dataclass
class Reference:
    """PyTorch outputs: input images and embeddings per image; all-token decoder outputs per case."""

    input_images: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    low_res: dict[str, np.ndarray] = field(default_factory=dict)  # case key -> [B,4,256,256]
    iou: dict[str, np.ndarray] = field(default_factory=dict)  # case key -> [B,4]
    mask_inputs: dict[str, np.ndarray] = field(default_factory=dict)  # refine cases: the fed-back mask
    weights_sha256: str = ""
    full_masks: dict = field(default_factory=dict)  # (case key, tokens) -> logits at original size (cache)

    def full_size(self, case: "Case", tokens: list[int]) -> np.ndarray:
        """Reference logits at the original image size, post-processed once and shared by every stage."""
        key = (case.key, tuple(tokens))
        if key not in self.full_masks:
            self.full_masks[key] = processing.postprocess_masks(self.low_res[case.key][:, tokens], case.geometry)
        return self.full_masks[key]

    def save(self, path: Path, suite: Suite) -> None:
        arrays = {"__format__": np.array(REFERENCE_FORMAT), "__weights__": np.array(self.weights_sha256),
                  "__suite__": np.array(suite.name)}
        for prefix, table in (("image", self.input_images), ("emb", self.embeddings), ("low", self.low_res),
                              ("iou", self.iou), ("maskin", self.mask_inputs)):
            for key, value in table.items():
                arrays[f"{prefix}|{key}"] = value
        tmp = Path(path).with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read reference file {path} ({type(exc).__name__})", hint="re-create it with --save-reference") from exc
        if "__format__" not in data or str(data["__format__"]) != REFERENCE_FORMAT:
            raise ArtifactError(f"{path} is not an evsam-export parity reference", hint="create it with --save-reference")
        ref = cls(weights_sha256=str(data["__weights__"]))
        tables = {"image": ref.input_images, "emb": ref.embeddings, "low": ref.low_res, "iou": ref.iou, "maskin": ref.mask_inputs}
        for name in data.files:
            if "|" in name:
                prefix, key = name.split("|", 1)
                tables[prefix][key] = data[name]
        return ref


def build_cases(suite: Suite, encoder_size: int) -> tuple[list[ValidationImage], dict[str, np.ndarray], list[Case]]:
    images, inputs, cases = [], {}, []
    for spec in suite.images:
        image = load_image_spec(spec)
        images.append(image)
        input_image, geometry = processing.preprocess_image(image.rgb, encoder_size)
        inputs[image.name] = input_image
        for index, kind in enumerate(suite.prompt_kinds):
            prompts = prompts_for(kind, image.rgb, image.masks, seed=suite.prompt_seed + index)
            tokens = processing.build_prompt_tokens(geometry, prompts.points, prompts.labels, prompts.boxes)
            cases.append(
                Case(
                    image=image,
                    kind=kind,
                    prompts=prompts,
                    geometry=geometry,
                    point_coords=tokens.point_coords,
                    point_labels=tokens.point_labels,
                    mask_input=np.zeros((1, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE), np.float32),
                    has_mask_input=np.zeros((1,), np.float32),
                )
            )
    return images, inputs, cases


def decoder_feeds(case: Case, embeddings: np.ndarray, artifact_inputs) -> dict[str, np.ndarray]:
    feeds = {
        "image_embeddings": embeddings,
        "point_coords": case.point_coords,
        "point_labels": case.point_labels,
        "mask_input": case.mask_input,
        "has_mask_input": case.has_mask_input,
        "orig_im_size": np.array(case.geometry.original_size, dtype=np.float32),
    }
    names = {spec.name for spec in artifact_inputs}
    return {name: value for name, value in feeds.items() if name in names}


def selected_token(iou: np.ndarray, multimask: bool) -> np.ndarray:
    """PyTorch SAM usage: multimask -> best of tokens 1..3 by predicted IoU; else token 0. Per prompt set."""
    if not multimask:
        return np.zeros(iou.shape[0], dtype=np.int64)
    return 1 + np.argmax(iou[:, 1:], axis=1)


def compute_reference(model, variant, images, inputs, cases, reporter: Reporter, weights_sha256: str) -> Reference:
    from evsam_export.runners.torch_runner import torch_reference_runners

    encoder, decoder = torch_reference_runners(model, variant, decoder_profile="tensorrt")
    ref = Reference(weights_sha256=weights_sha256)
    with encoder, decoder:
        for image in reporter.track(images, "PyTorch reference: encoder"):
            ref.input_images[image.name] = inputs[image.name]
            ref.embeddings[image.name] = encoder.infer({"input_image": inputs[image.name]})["image_embeddings"]
        for case in reporter.track(cases, "PyTorch reference: decoder"):
            out = decoder.infer(decoder_feeds(case, ref.embeddings[case.image.name], decoder.inputs))
            if case.prompts.refine:
                # Second pass fed with the first pass's selected low-res mask, as an interactive app does.
                token = selected_token(out["iou_predictions"], case.prompts.multimask)[0]
                ref.mask_inputs[case.key] = out["low_res_masks"][:1, token : token + 1]
                apply_refine(case, ref.mask_inputs[case.key])
                out = decoder.infer(decoder_feeds(case, ref.embeddings[case.image.name], decoder.inputs))
            ref.low_res[case.key] = out["low_res_masks"]
            ref.iou[case.key] = out["iou_predictions"]
    return ref


def apply_refine(case: Case, mask_input: np.ndarray) -> None:
    case.mask_input = mask_input.astype(np.float32)
    case.has_mask_input = np.ones((1,), np.float32)


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
        return f"{self.artifact} [{self.stage}/{self.kind}] {self.metric} = {self.value:.6g} (needs {self.op} {self.threshold:g})"

    def to_json(self) -> dict:
        value = None if isinstance(self.value, float) and not math.isfinite(self.value) and math.isnan(self.value) else self.value
        if isinstance(value, float) and math.isinf(value):
            value = "inf" if value > 0 else "-inf"
        return {"artifact": self.artifact, "stage": self.stage, "kind": self.kind, "metric": self.metric,
                "value": value, "threshold": self.threshold, "op": self.op, "passed": self.passed}


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
        return all(g.passed for g in self.gates)


@dataclass
class ParityReport:
    folder: Path
    variant: str
    suite: str
    stages: list[StageReport] = field(default_factory=list)
    unavailable: dict = field(default_factory=dict)  # artifact id -> reason
    reference_source: str = ""

    @property
    def gates(self) -> list[Gate]:
        return [g for s in self.stages for g in s.gates]

    @property
    def failed_gates(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    @property
    def passed(self) -> bool:
        return bool(self.stages) and not self.failed_gates


# ------------------------------------------------------------------------------------------ comparisons


def _gate_min(stage: StageReport, kind: str, metric: str, value: float, threshold: float | None) -> None:
    if threshold is not None:
        stage.gates.append(Gate(stage.artifact, stage.stage, kind, metric, float(value), float(threshold), ">="))


def _gate_max(stage: StageReport, kind: str, metric: str, value: float, threshold: float | None) -> None:
    if threshold is not None:
        stage.gates.append(Gate(stage.artifact, stage.stage, kind, metric, float(value), float(threshold), "<="))


def token_indices(artifact: Artifact) -> list[int]:
    single = bool(artifact.settings.get("single_mask"))
    return [0] if single else list(range(NUM_MASK_TOKENS))


def compare_masks(case: Case, ref_full: np.ndarray, test_low: np.ndarray, margin: float | None):
    """Per-mask IoU (and stable IoU) of binarised masks at the original image size, shared post-processing."""
    test_full = processing.postprocess_masks(test_low, case.geometry)
    iou = metrics.mask_iou(processing.binarize(ref_full), processing.binarize(test_full))
    stable = metrics.stable_mask_iou(ref_full, test_full, margin) if margin is not None else None
    return iou, stable, ref_full, test_full


def evaluate_decoder_outputs(stage: StageReport, tol: Tolerance, cases, outputs_by_case, reference: Reference, artifact: Artifact) -> None:
    tokens = token_indices(artifact)
    by_kind: dict[str, dict[str, list]] = {}
    worst = []
    for case in cases:
        out = outputs_by_case[case.key]
        ref_low = reference.low_res[case.key][:, tokens]
        ref_iou = reference.iou[case.key][:, tokens]
        test_low, test_iou = out["low_res_masks"], out["iou_predictions"]
        bucket = by_kind.setdefault(case.kind, {"iou": [], "stable": [], "logit": [], "score": [], "nonfinite": 0, "inmask": []})
        bucket["nonfinite"] += sum(metrics.nonfinite_count(v) for v in out.values())
        if test_low.shape != ref_low.shape:
            bucket["iou"].append(np.zeros(1))
            continue
        iou, stable, _ref_full, test_full = compare_masks(case, reference.full_size(case, tokens), test_low, tol.stable_margin)
        bucket["iou"].append(iou.ravel())
        if stable is not None:
            bucket["stable"].append(stable.ravel())
        bucket["logit"].append(metrics.max_abs_diff(ref_low, test_low))
        bucket["score"].append(metrics.max_abs_diff(ref_iou, test_iou))
        if "masks" in out:  # sam profile: the in-graph upscaling must equal the shared host post-processing
            host = test_full
            bucket["inmask"].append(float(metrics.mask_iou(processing.binarize(host), processing.binarize(out["masks"])).min()))
        worst.append({"case": case, "iou": float(iou.min()), "token": tokens[int(np.argmin(iou.min(axis=0)))] if iou.ndim > 1 else tokens[0],
                      "prompt_set": int(np.argmin(iou.min(axis=1))) if iou.ndim > 1 else 0, "test_low": test_low, "ref_low": ref_low})
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
            stage.gates.append(Gate(stage.artifact, stage.stage, kind, "nonfinite", float(bucket["nonfinite"]), 0.0, "=="))
        stage.per_kind[kind] = entry
    stage.worst = sorted(worst, key=lambda w: w["iou"])[:2]


# ------------------------------------------------------------------------------------------ main


def resolve_reference(manifest: Manifest, folder: Path, checkpoint: str | None, reference_path: Path | None,
                      suite: Suite, images, inputs, cases, reporter: Reporter) -> tuple[Reference, str]:
    if reference_path is not None:
        ref = Reference.load(reference_path)
        if ref.weights_sha256 != manifest.weights["sha256"]:
            raise ArtifactError(
                f"reference {reference_path} was computed from other weights than {folder}",
                hint="save the reference from the same checkpoint as the export",
            )
        missing = [c.key for c in cases if c.key not in ref.low_res]
        if missing:
            raise ArtifactError(f"reference {reference_path} lacks case {missing[0]}", hint=f"save it with --suite {suite.name}")
        for case in cases:
            if case.key in ref.mask_inputs:
                apply_refine(case, ref.mask_inputs[case.key])
        return ref, f"file {reference_path}"
    from evsam_export.model.checkpoint import load_model

    spec = checkpoint or manifest.weights["spec"]
    variant = get_variant(manifest.variant)
    with reporter.step(f"rebuild the PyTorch reference ({spec})"):
        model, weights = load_model(variant, spec)
    if weights.sha256 != manifest.weights["sha256"]:
        raise CheckpointError(
            f"weights {spec} differ from the ones {folder} was exported from (sha256 mismatch)",
            hint="pass --checkpoint with the exported checkpoint",
        )
    return compute_reference(model, variant, images, inputs, cases, reporter, weights.sha256), f"PyTorch ({spec})"


def pair_decoder(encoder: Artifact, decoders: list[Artifact]) -> Artifact | None:
    """The decoder an end-to-end deployment would use with this encoder: same target and precision, else
    same target, else the fp32 ONNX decoder."""
    for match in (
        lambda d: d.target == encoder.target and d.precision == encoder.precision,
        lambda d: d.target == encoder.target,
        lambda d: d.target == "onnx" and d.precision == "fp32",
    ):
        found = [d for d in decoders if match(d)]
        if found:
            return found[0]
    return decoders[0] if decoders else None


def validate_folder(
    folder: Path,
    suite: Suite,
    checkpoint: str | None = None,
    reference_path: Path | None = None,
    save_reference: Path | None = None,
    artifacts: list[str] | None = None,
    reporter: Reporter | None = None,
    threads: int | None = None,
) -> ParityReport:
    from evsam_export.runners import runner_for_artifact

    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    chosen = [a for a in manifest.artifacts if artifacts is None or a.id in artifacts]
    if artifacts:
        unknown = sorted(set(artifacts) - {a.id for a in manifest.artifacts})
        if unknown:
            raise ArtifactError(f"no artifact {unknown[0]!r} in {folder}", hint="known: " + ", ".join(a.id for a in manifest.artifacts))
    for artifact in chosen:
        verify_artifact_file(folder, artifact)
    images, inputs, cases = build_cases(suite, manifest.encoder_size)
    reference, source = resolve_reference(manifest, folder, checkpoint, reference_path, suite, images, inputs, cases, reporter)
    if save_reference is not None:
        reference.save(save_reference, suite)
    report = ParityReport(folder=folder, variant=manifest.variant, suite=suite.name, reference_source=source)

    runners = {}
    for artifact in chosen:
        if artifact.component not in ("encoder", "decoder") or artifact.facts.get("kit_only"):
            continue
        try:
            runners[artifact.id] = runner_for_artifact(folder, artifact, threads=threads).load()
        except RuntimeUnavailable as exc:
            report.unavailable[artifact.id] = exc.message
    encoders = [a for a in chosen if a.component == "encoder" and a.id in runners]
    decoders = [a for a in chosen if a.component == "decoder" and a.id in runners]

    embeddings_of: dict[str, dict[str, np.ndarray]] = {}
    for artifact in encoders:
        tol = suite.tolerance(artifact.precision)
        stage = StageReport(artifact.id, "encoder", artifact.precision)
        embeddings_of[artifact.id] = {}
        comparisons = []
        for image in reporter.track(images, f"{artifact.id}: encoder stage"):
            out = runners[artifact.id].infer({"input_image": inputs[image.name]})["image_embeddings"]
            embeddings_of[artifact.id][image.name] = out
            comparisons.append(metrics.compare_tensors(reference.embeddings[image.name], out))
        snr = min(c.snr_db for c in comparisons)
        cos = min(c.cosine for c in comparisons)
        nonfinite = sum(c.nonfinite for c in comparisons)
        stage.per_kind["all"] = {"snr_db_min": snr, "cosine_min": cos, "max_abs": max(c.max_abs for c in comparisons),
                                 "per_image": {img.name: c.as_dict() for img, c in zip(images, comparisons)}, "nonfinite": nonfinite}
        _gate_min(stage, "all", "embedding_snr_db.min", snr, tol.embedding_snr_db_min)
        _gate_min(stage, "all", "embedding_cosine.min", cos, tol.embedding_cosine_min)
        if not tol.allow_nonfinite:
            stage.gates.append(Gate(artifact.id, "encoder", "all", "nonfinite", float(nonfinite), 0.0, "=="))
        report.stages.append(stage)

    for artifact in decoders:
        stage = StageReport(artifact.id, "decoder", artifact.precision)
        outputs = {}
        for case in reporter.track(cases, f"{artifact.id}: decoder stage"):
            outputs[case.key] = runners[artifact.id].infer(decoder_feeds(case, reference.embeddings[case.image.name], artifact.inputs))
        evaluate_decoder_outputs(stage, suite.tolerance(artifact.precision), cases, outputs, reference, artifact)
        report.stages.append(stage)

    for encoder in encoders:
        decoder = pair_decoder(encoder, decoders)
        if decoder is None:
            continue
        precision = encoder.precision if encoder.precision != "fp32" else decoder.precision
        stage = StageReport(encoder.id, "end_to_end", precision, pairing=f"{encoder.id} -> {decoder.id}")
        outputs = {}
        for case in reporter.track(cases, f"{encoder.id} -> {decoder.id}: end to end"):
            feeds = decoder_feeds(case, embeddings_of[encoder.id][case.image.name], decoder.inputs)
            outputs[case.key] = runners[decoder.id].infer(feeds)
        evaluate_decoder_outputs(stage, suite.tolerance(precision), cases, outputs, reference, decoder)
        report.stages.append(stage)

    for runner in runners.values():
        runner.close()
    return report
