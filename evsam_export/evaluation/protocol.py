"""The zero-shot protocol of the EfficientViT-SAM paper, for PyTorch and for an artifact folder's pipelines.

Per ground-truth instance (evsam_export.data.coco): a box prompt (the GT box, `multimask_output=False`) and
a point prompt (one foreground point farthest from the background, `multimask_output=True`, the mask with
the highest predicted IoU). IoU against the GT mask at the original image size; mIoU is the mean over
instances, also split by COCO object size. Every pipeline is a runtime `Predictor` (the PyTorch reference
one over the PyTorch runners), so all of them share the pre/post-processing, prompt chunking and mask
selection the parity gate validated. Per image: one encoder run per pipeline and all of a prompt kind's
prompt sets in one predict call (the Predictor chunks them by its memory budget).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evsam_export.data.coco import Dataset, box_prompts, iter_images, point_prompts
from evsam_export.errors import ArtifactError, RuntimeUnavailable, UsageError
from evsam_export.manifest import Artifact, Manifest, read_manifest, verify_artifact_file
from evsam_export.progress import Reporter

PROMPT_KINDS = ("box", "point")
PYTORCH = "pytorch"
# Boolean masks one predict call may return ([n, 1, H, W]); more instances than fit run
# in several calls, so an image with a hundred objects (SA-1B) costs this, not a hundred full-size masks.
MASK_BYTES_PER_CALL = 256 * 2**20


@dataclass
class Pipeline:
    """An encoder -> decoder pairing (or the PyTorch reference) and the prompt kinds it can run."""

    name: str
    predictor: object  # evsam_export.runtime.Predictor
    kinds: tuple[str, ...]
    encoder_seconds: float = 0.0  # set_image: preprocessing and the encoder
    prompt_seconds: float = 0.0  # predict calls: decoder and post-processing


@dataclass
class Evaluation:
    """Per-instance IoUs of every pipeline and prompt kind, and where they came from.

    Everything a report needs is derived from the per-instance lists, so shards merge exactly."""

    variant: str
    reference: str
    annotations: dict  # {"file", "sha256", "images_dir"}
    selection: dict  # {"limit", "seed", "shards", "shard_indices", "candidates", "crowd_skipped"}
    prompts: list[str]
    pipelines: list[str]
    image_ids: list[int] = field(default_factory=list)  # per instance
    annotation_ids: list[int] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)
    ious: dict = field(default_factory=dict)  # pipeline -> prompt -> [IoU per instance]
    unavailable: dict = field(default_factory=dict)  # pipeline or artifact -> why it was not evaluated
    images: int = 0
    seconds: float = 0.0  # wall time of the image loop
    pipeline_seconds: dict = field(default_factory=dict)  # pipeline -> {"encoder": s, "prompts": s}
    pictures: list = field(default_factory=list)  # worst instances drawn: {"file", "caption", "pipeline", "prompt", ...}
    picture_data: dict = field(default_factory=dict, repr=False)  # file -> PNG bytes, not yet written


def parse_prompt_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [kind for kind in kinds if kind not in PROMPT_KINDS]
    if unknown or not kinds:
        raise UsageError(f"bad --prompts {text!r}", hint=f"a comma-separated subset of {','.join(PROMPT_KINDS)}")
    return kinds


def predict_masks(predictor, kind: str, boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The protocol's mask of each instance for one prompt kind, [n, H, W] bool, on the predictor's current image."""
    if kind == "box":
        prediction = predictor.predict(boxes=boxes, multimask_output=False)
    else:
        prediction = predictor.predict(
            point_coords=points[:, None, :],
            point_labels=np.ones((len(points), 1)),
            multimask_output=True,
            best_only=True,  # only the best of the three candidates is upscaled to the original size
        )
    return prediction.best_masks()


def prompt_ious(predictor, boxes: np.ndarray, points: np.ndarray, gt_masks: np.ndarray, kinds: Sequence[str]) -> dict[str, np.ndarray]:
    """IoU of each instance's predicted mask with its GT mask, per prompt kind, on the predictor's current image."""
    from evsam_export.metrics import mask_iou

    height, width = gt_masks.shape[1:]
    per_call = max(1, MASK_BYTES_PER_CALL // (height * width))
    ious = {}
    for kind in kinds:
        parts = []
        for start in range(0, len(gt_masks), per_call):
            group = slice(start, start + per_call)
            parts.append(mask_iou(predict_masks(predictor, kind, boxes[group], points[group]), gt_masks[group]))
        ious[kind] = np.concatenate(parts)
    return ious


# ------------------------------------------------------------------------------------------------ pipelines


def torch_artifact(runner, component: str) -> Artifact:
    """A manifest-style entry for a PyTorch runner, so a Predictor checks and feeds it like an artifact."""
    return Artifact(
        id=f"{PYTORCH}.{component}",
        component=component,
        target="torch",
        precision="fp32",
        path="",
        sha256="",
        size_bytes=0,
        inputs=list(runner.inputs),
        outputs=list(runner.outputs),
    )


def chosen_artifacts(folder: Path, manifest: Manifest, artifact_ids: Sequence[str] | None) -> list[Artifact]:
    """The folder's runnable encoder/decoder artifacts (only `artifact_ids` when given), their files checked."""
    if artifact_ids:
        unknown = sorted(set(artifact_ids) - {a.id for a in manifest.artifacts})
        if unknown:
            raise ArtifactError(f"no artifact {unknown[0]!r} in {folder}", hint="known: " + ", ".join(a.id for a in manifest.artifacts))
    chosen = [
        a
        for a in manifest.artifacts
        if (not artifact_ids or a.id in artifact_ids) and a.component in ("encoder", "decoder") and not a.facts.get("kit_only")
    ]
    for artifact in chosen:
        verify_artifact_file(folder, artifact)
    return chosen


def pairings(manifest: Manifest, chosen: list[Artifact]) -> list[tuple[Artifact, Artifact]]:
    """Each chosen encoder with the decoder a deployment would use (parity's end-to-end pairing rule); when
    only encoders or only decoders are chosen, the other side comes from the whole folder."""
    from evsam_export.runtime.pairing import pair_decoder

    encoders = [a for a in chosen if a.component == "encoder"] or [a for a in manifest.artifacts if a.component == "encoder"]
    decoders = [a for a in chosen if a.component == "decoder"] or [a for a in manifest.artifacts if a.component == "decoder"]
    pairs = []
    for encoder in encoders:
        decoder = pair_decoder(encoder, [d for d in decoders if not d.facts.get("kit_only")])
        if decoder is not None:
            pairs.append((encoder, decoder))
    return pairs


def protocol_kinds(predictor, name: str, kinds: Sequence[str], unavailable: dict) -> tuple[str, ...]:
    """The kinds of `kinds` the predictor can run by the protocol; why not the others goes into `unavailable`."""
    if "point" in kinds and predictor.num_tokens == 1:
        unavailable[f"{name} (point)"] = "single-mask decoder: no multimask output for the point protocol"
        return tuple(kind for kind in kinds if kind != "point")
    return tuple(kinds)


def reference_predictor(manifest: Manifest, model, variant, threads: int | None = None):
    """A Predictor over the PyTorch model's runners (the protocol's reference pipeline); the caller closes it."""
    from evsam_export.runners.torch_runner import torch_reference_runners
    from evsam_export.runtime.predictor import Predictor

    encoder, decoder = torch_reference_runners(model, variant, decoder_profile="tensorrt")
    encoder.threads = decoder.threads = threads
    return Predictor.from_runners(manifest, torch_artifact(encoder, "encoder"), torch_artifact(decoder, "decoder"), encoder, decoder)


@contextmanager
def open_pipelines(
    folder: Path, artifact_ids: Sequence[str] | None, kinds: Sequence[str], checkpoint: str | None, threads: int | None, reporter: Reporter
) -> Iterator[tuple[Manifest, str, list[Pipeline], dict]]:
    """(manifest, reference source, [PyTorch pipeline, artifact pipelines...], {name: why not run}); all closed on exit."""
    from evsam_export.model.checkpoint import exported_model
    from evsam_export.runtime.predictor import Predictor

    manifest = read_manifest(folder)
    chosen = chosen_artifacts(folder, manifest, artifact_ids)
    unavailable: dict[str, str] = {}
    with ExitStack() as stack:
        model, variant, _weights, source = exported_model(manifest, folder, reporter, checkpoint)
        reference = reference_predictor(manifest, model, variant, threads)
        stack.callback(reference.close)
        pipelines = [Pipeline(PYTORCH, reference, tuple(kinds))]
        for enc, dec in pairings(manifest, chosen):
            name = f"{enc.id} -> {dec.id}"
            try:
                with reporter.step(f"load {name}"):
                    predictor = Predictor(folder, encoder=enc.id, decoder=dec.id, threads=threads)
            except RuntimeUnavailable as exc:
                unavailable[name] = exc.message
                continue
            stack.callback(predictor.close)
            pipelines.append(Pipeline(name, predictor, protocol_kinds(predictor, name, kinds, unavailable)))
        yield manifest, source, pipelines, unavailable


# ------------------------------------------------------------------------------------------------ the run


def evaluate_dataset(pipelines: Sequence[Pipeline], dataset: Dataset, reporter: Reporter) -> tuple[dict, list, float]:
    """Stream the dataset through every pipeline: ({pipeline: {kind: [IoU per instance]}}, instance rows
    [(image id, annotation id, area)], seconds)."""
    ious = {p.name: {kind: [] for kind in p.kinds} for p in pipelines}
    rows = []
    started = time.perf_counter()
    total = len(dataset.images)
    for image, rgb, masks in reporter.track(iter_images(dataset), f"evaluate {total} images", total=total):
        boxes, points = box_prompts(image), point_prompts(masks)
        rows.extend((image.image_id, instance.annotation_id, instance.area) for instance in image.instances)
        for pipeline in pipelines:
            encoder_started = time.perf_counter()
            pipeline.predictor.set_image(rgb)  # the one encoder run of this image for this pipeline
            prompts_started = time.perf_counter()
            for kind, values in prompt_ious(pipeline.predictor, boxes, points, masks, pipeline.kinds).items():
                ious[pipeline.name][kind].extend(float(v) for v in values)
            pipeline.encoder_seconds += prompts_started - encoder_started
            pipeline.prompt_seconds += time.perf_counter() - prompts_started
        del rgb, masks
    return ious, rows, time.perf_counter() - started


def evaluate_folder(
    folder: str | Path,
    dataset: Dataset,
    kinds: Sequence[str] = PROMPT_KINDS,
    artifact_ids: Sequence[str] | None = None,
    checkpoint: str | None = None,
    threads: int | None = None,
    reporter: Reporter | None = None,
    on_evaluated: Callable[[list[Pipeline], Evaluation], None] | None = None,
) -> Evaluation:
    """The protocol on `dataset` for the PyTorch reference of `folder` and every encoder -> decoder pairing;
    `on_evaluated(pipelines, evaluation)` runs before the pipelines close (evaluation.pictures.draw_worst)."""
    reporter = reporter or Reporter()
    folder = Path(folder)
    with open_pipelines(folder, artifact_ids, kinds, checkpoint, threads, reporter) as (manifest, source, pipelines, unavailable):
        ious, rows, seconds = evaluate_dataset(pipelines, dataset, reporter)
        pipeline_seconds = {p.name: {"encoder": p.encoder_seconds, "prompts": p.prompt_seconds} for p in pipelines}
        evaluation = Evaluation(
            variant=manifest.variant,
            reference=source,
            annotations={"file": str(dataset.annotations), "sha256": dataset.annotations_sha256, "images_dir": str(dataset.images_dir)},
            selection={
                "limit": dataset.limit,
                "seed": dataset.seed,
                "shards": dataset.shard[1] if dataset.shard else None,
                "shard_indices": [dataset.shard[0]] if dataset.shard else None,
                "candidates": dataset.candidates,
                "crowd_skipped": dataset.crowd_skipped,
            },
            prompts=list(kinds),
            pipelines=list(ious),
            image_ids=[row[0] for row in rows],
            annotation_ids=[row[1] for row in rows],
            areas=[row[2] for row in rows],
            ious=ious,
            unavailable=unavailable,
            images=len(dataset.images),
            seconds=seconds,
            pipeline_seconds=pipeline_seconds,
        )
        if on_evaluated is not None:
            on_evaluated(pipelines, evaluation)  # while the pipelines are still open
    return evaluation
