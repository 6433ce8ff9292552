"""Pictures of an evaluation's worst instances: for every result's `worst` list, the image with the GT mask,
PyTorch's mask and (for an artifact result) the artifact's mask, the prompt drawn and the IoUs in the caption.

The worst instances are known only once every image has run, so their images are read again and run again
through the pipelines still open (a few encoder runs per result, never a mask kept from the streamed pass).
A merged run takes its pictures from the shards' folders: every globally worst instance is among the worst
of its own shard, so the shard drew it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evsam_export.data.coco import Dataset, box_prompts, decode_masks, point_prompts, read_annotated_image
from evsam_export.evaluation.protocol import PYTORCH, Evaluation, Pipeline, predict_masks

PICTURE_FOLDER = "eval"


def picture_name(pipeline: str, prompt: str, rank: int) -> str:
    """eval/worst-<pipeline>-<prompt>-<rank>.png, rank counted from 1 (the worst)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", pipeline).strip("_")
    return f"{PICTURE_FOLDER}/worst-{slug}-{prompt}-{rank}.png"


def picture_key(picture: dict) -> tuple:
    return picture["pipeline"], picture["prompt"], picture["image_id"], picture["annotation_id"]


def wanted_pictures(entries: Sequence[dict]) -> list[dict]:
    """One picture record per worst instance of every result: file, pipeline, prompt, image and annotation ids, IoU."""
    return [
        {"file": picture_name(e["pipeline"], e["prompt"], rank), "pipeline": e["pipeline"], "prompt": e["prompt"],
         "image_id": w["image_id"], "annotation_id": w["annotation_id"], "iou": w["iou"]}
        for e in entries
        for rank, w in enumerate(e.get("worst", []), start=1)
    ]


def _caption(picture: dict, iou: float, reference_iou: float) -> str:
    where = f"image {picture['image_id']}, annotation {picture['annotation_id']}"
    if picture["pipeline"] == PYTORCH:
        return f"PyTorch, {picture['prompt']} prompt, {where}: IoU with ground truth {iou:.4f}"
    return f"{picture['pipeline']}, {picture['prompt']} prompt, {where}: IoU with ground truth {iou:.4f} (PyTorch {reference_iou:.4f})"


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def draw_worst(pipelines: Sequence[Pipeline], dataset: Dataset, evaluation: Evaluation, entries: Sequence[dict]) -> None:
    """Fill evaluation.pictures (records with a caption) and evaluation.picture_data (file -> PNG bytes) for the
    worst instances of `entries` (evaluation.report.results of `evaluation`)."""
    from evsam_export.metrics import mask_iou
    from evsam_export.overlay import ARTIFACT, GROUND_TRUTH, REFERENCE, LabelledMask, comparison_picture

    pictures = wanted_pictures(entries)
    by_name = {p.name: p for p in pipelines}
    for image in dataset.images:
        mine = [p for p in pictures if p["image_id"] == image.image_id]
        if not mine:
            continue
        rgb, gt_masks = read_annotated_image(image), decode_masks(image)
        boxes, points = box_prompts(image), point_prompts(gt_masks)
        index = {instance.annotation_id: i for i, instance in enumerate(image.instances)}
        masks: dict[tuple[str, str, int], np.ndarray] = {}  # (pipeline, prompt, annotation id) -> mask
        for name in dict.fromkeys([PYTORCH] + [p["pipeline"] for p in mine]):
            wanted = [p for p in mine if name in (p["pipeline"], PYTORCH)]
            by_name[name].predictor.set_image(rgb)
            for kind in dict.fromkeys(p["prompt"] for p in wanted):
                rows = sorted({index[p["annotation_id"]] for p in wanted if p["prompt"] == kind})
                for row, mask in zip(rows, predict_masks(by_name[name].predictor, kind, boxes[rows], points[rows])):
                    masks[name, kind, image.instances[row].annotation_id] = mask
        for picture in mine:
            kind, ann, row = picture["prompt"], picture["annotation_id"], index[picture["annotation_id"]]
            reference = masks[PYTORCH, kind, ann]
            shown = [LabelledMask("ground truth", gt_masks[row], GROUND_TRUTH), LabelledMask("PyTorch", reference, REFERENCE)]
            if picture["pipeline"] != PYTORCH:
                shown.append(LabelledMask("artifact", masks[picture["pipeline"], kind, ann], ARTIFACT))
            # The IoUs of the masks drawn (run again here), so the caption states what the picture shows.
            reference_iou, shown_iou = (float(mask_iou(m.mask[None], gt_masks[row][None])[0]) for m in (shown[1], shown[-1]))
            picture["caption"] = _caption(picture, shown_iou, reference_iou)
            prompt = {"boxes": boxes[row][None]} if kind == "box" else {"points": points[row][None], "labels": np.ones(1)}
            evaluation.picture_data[picture["file"]] = _png(comparison_picture(rgb, shown, picture["caption"], **prompt))
        del rgb, gt_masks
    evaluation.pictures = [p for p in pictures if p["file"] in evaluation.picture_data]


def merged_pictures(evaluation: Evaluation, entries: Sequence[dict], shards: Sequence[tuple[Path, Evaluation]]) -> None:
    """The merged run's pictures (the worst of its `entries`), copied from the shard folders that drew them,
    renamed to the merged rank."""
    drawn = {picture_key(p): (folder, p) for folder, shard in shards for p in shard.pictures}
    pictures = []
    for picture in wanted_pictures(entries):
        found = drawn.get(picture_key(picture))
        if found is None or not (found[0] / found[1]["file"]).is_file():
            continue  # a shard written before pictures existed, or its picture removed: the report shows the rest
        folder, shard_picture = found
        picture["caption"] = shard_picture.get("caption", "")
        evaluation.picture_data[picture["file"]] = (folder / shard_picture["file"]).read_bytes()
        pictures.append(picture)
    evaluation.pictures = pictures
