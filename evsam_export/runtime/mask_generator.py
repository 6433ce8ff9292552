"""Segment everything: SAM's automatic mask generator on the torch-free runtime (docs/segment.md).

    from evsam_export.runtime import MaskGenerator, Predictor
    generator = MaskGenerator(Predictor("out/l0"), points_per_side=32)
    records = generator.generate(rgb)        # one dict per mask, upstream's fields and order

The algorithm and its settings are upstream's `SamAutomaticMaskGenerator` (segment-anything, which
EfficientViT-SAM ships as `EfficientViTSamAutomaticMaskGenerator`), written again for numpy: a point grid per
crop layer, one encoder run per crop, the grid through the decoder's prompt axis in batches, filtering by
predicted IoU, by stability of the crop-size logits and by crop edges, box NMS within and across crops, then
optional small-region and hole removal (OpenCV). Masks are kept as COCO RLE (pycocotools) so memory grows
with the masks' outlines, not their pixels. Needs numpy, pycocotools, and OpenCV for min_mask_region_area > 0
(`pip install 'evsam-export[data]'`); never imports torch.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from evsam_export.errors import RuntimeUnavailable, UsageError
from evsam_export.model import processing

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Masks whose box lies within this many pixels of a crop edge (but not of the image edge) were cut by the crop.
CROP_EDGE_TOLERANCE_PX = 20.0
# Crop-size float32 logits are upscaled, scored and encoded this many bytes at a time, so a batch of 64
# points x 3 candidates on a large photo never holds all its upscaled logits at once.
UPSCALE_BAND_BYTES = 256 * 2**20
DATA_EXTRA_HINT = "pip install 'evsam-export[data]'"


# ------------------------------------------------------------------------------------------ grids and crops


def point_grid(points_per_side: int) -> np.ndarray:
    """points_per_side**2 points [N,2] (x, y) in 0..1, cell centres of an even grid, rows top to bottom."""
    step = 1.0 / points_per_side
    centres = np.linspace(step / 2, 1.0 - step / 2, points_per_side)
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def layer_point_grids(points_per_side: int, crop_n_layers: int, downscale_factor: int) -> list[np.ndarray]:
    """One grid per crop layer: layer i has int(points_per_side / downscale_factor**i) points per side."""
    return [point_grid(int(points_per_side / downscale_factor**layer)) for layer in range(crop_n_layers + 1)]


def crop_boxes(image_size: tuple[int, int], crop_n_layers: int, overlap_ratio: float) -> list[tuple[tuple[int, int, int, int], int]]:
    """(crop box XYXY, layer) for the whole image (layer 0) and the (2**i)**2 overlapping crops of layer i.

    Crops of layer i overlap by int(overlap_ratio * short side * 2 / 2**i) pixels; each is as long as needed
    for the crops to cover the image with that overlap."""
    height, width = image_size
    boxes = [((0, 0, width, height), 0)]
    for layer in range(1, crop_n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(height, width) * (2 / per_side))
        crop_w = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + height) / per_side)
        lefts = [int((crop_w - overlap) * i) for i in range(per_side)]
        tops = [int((crop_h - overlap) * i) for i in range(per_side)]
        for left, top in product(lefts, tops):
            boxes.append(((left, top, min(left + crop_w, width), min(top + crop_h, height)), layer))
    return boxes


# ------------------------------------------------------------------------------------------ mask geometry


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """XYXY boxes [n,4] int64 of boolean masks [n,H,W]: first and last occupied column and row (inclusive, as
    upstream, so a one-pixel mask has x0 == x1); [0,0,0,0] for an empty mask."""
    masks = np.asarray(masks, dtype=bool)
    boxes = np.zeros((masks.shape[0], 4), np.int64)
    if masks.size == 0:
        return boxes
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    present = rows.any(axis=1)
    height, width = masks.shape[1:]
    boxes[:, 0] = np.argmax(cols, axis=1)
    boxes[:, 1] = np.argmax(rows, axis=1)
    boxes[:, 2] = width - 1 - np.argmax(cols[:, ::-1], axis=1)
    boxes[:, 3] = height - 1 - np.argmax(rows[:, ::-1], axis=1)
    boxes[~present] = 0
    return boxes


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first (ties in input order).

    Box IoU in float32 with areas (x1 - x0) * (y1 - y0), a box suppressed when its IoU with a kept box
    exceeds the threshold: torchvision.ops.nms, which upstream calls."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for index in order:
            if suppressed[index]:
                continue
            keep.append(index)
            width = np.maximum(np.float32(0), np.minimum(x1[index], x1) - np.maximum(x0[index], x0))
            height = np.maximum(np.float32(0), np.minimum(y1[index], y1) - np.maximum(y0[index], y0))
            inter = width * height
            iou = inter / (areas[index] + areas - inter)
            suppressed |= iou.astype(np.float64) > float(iou_threshold)
    return np.asarray(keep, dtype=np.int64)


def near_crop_edge(boxes: np.ndarray, crop_box, image_size: tuple[int, int], tolerance: float = CROP_EDGE_TOLERANCE_PX) -> np.ndarray:
    """[n] bool: boxes (image frame, XYXY) with a side within `tolerance` of a crop edge that is not an image edge."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    crop = np.asarray(crop_box, dtype=np.float32)[None]
    image = np.asarray([0, 0, image_size[1], image_size[0]], dtype=np.float32)[None]
    at_crop = np.abs(boxes - crop) <= tolerance
    at_image = np.abs(boxes - image) <= tolerance
    return np.any(at_crop & ~at_image, axis=1)


def stability_scores(logits: np.ndarray, mask_threshold: float, offset: float) -> np.ndarray:
    """[n] float32: IoU of the masks thresholded at mask_threshold + offset and mask_threshold - offset (the
    first lies inside the second, so it is a ratio of pixel counts); NaN when both are empty."""
    high = np.count_nonzero(logits > np.float32(mask_threshold + offset), axis=(1, 2)).astype(np.float32)
    low = np.count_nonzero(logits > np.float32(mask_threshold - offset), axis=(1, 2)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return high / low


def remove_small_regions(mask: np.ndarray, min_area: float, mode: str) -> tuple[np.ndarray, bool]:
    """(mask, changed): mode "holes" fills background regions under `min_area` pixels enclosed by nothing
    else, mode "islands" drops foreground regions under it (keeping the largest when all are small).
    8-connected components from OpenCV, as upstream."""
    import cv2

    fill_holes = mode == "holes"
    working = (mask != fill_holes).astype(np.uint8)  # holes: the background becomes the foreground to label
    count, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = [label + 1 for label, size in enumerate(sizes) if size < min_area]
    if not small:
        return mask, False
    if fill_holes:
        return np.isin(labels, [0, *small]), True
    big = [label for label in range(1, count) if label not in small]
    return np.isin(labels, big or [int(np.argmax(sizes)) + 1]), True


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a boolean mask: column-major run lengths starting with a background run."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _pycocotools_mask():
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise RuntimeUnavailable("segment everything needs pycocotools (masks are kept as COCO RLE)", hint=DATA_EXTRA_HINT) from None
    return coco_mask


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Compressed COCO RLEs of boolean masks [n,H,W] (pycocotools)."""
    coco_mask = _pycocotools_mask()
    # pycocotools wants H x W x n in column-major order: fill an [n,W,H] array and view it transposed.
    columns = np.ascontiguousarray(np.asarray(masks, dtype=np.uint8).transpose(0, 2, 1))
    return coco_mask.encode(columns.transpose(2, 1, 0)) if len(columns) else []


def decode_mask(rle: dict) -> np.ndarray:
    """[H,W] bool from a compressed COCO RLE."""
    coco_mask = _pycocotools_mask()
    with warnings.catch_warnings():
        # pycocotools' Cython array lacks numpy 2's `copy` keyword; numpy warns on every decode, the values are right.
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


# ------------------------------------------------------------------------------------------ kept masks


@dataclass
class MaskSet:
    """Masks kept so far, in the original image frame: compressed RLEs with their boxes (XYXY, inclusive),
    predicted IoU, stability score, prompt point and crop box (XYXY)."""

    rles: list = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    predicted_iou: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    stability: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))
    crop_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.rles)

    def take(self, index) -> MaskSet:
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return MaskSet(
            rles=[self.rles[i] for i in index],
            boxes=self.boxes[index],
            predicted_iou=self.predicted_iou[index],
            stability=self.stability[index],
            points=self.points[index],
            crop_boxes=self.crop_boxes[index],
        )

    @staticmethod
    def concat(parts: list[MaskSet]) -> MaskSet:
        if not parts:
            return MaskSet()
        return MaskSet(
            rles=[rle for part in parts for rle in part.rles],
            boxes=np.concatenate([p.boxes for p in parts]),
            predicted_iou=np.concatenate([p.predicted_iou for p in parts]),
            stability=np.concatenate([p.stability for p in parts]),
            points=np.concatenate([p.points for p in parts]),
            crop_boxes=np.concatenate([p.crop_boxes for p in parts]),
        )


def xywh(box) -> list[int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


# ------------------------------------------------------------------------------------------ settings checks


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _check_fraction(name: str, value, upper_open: bool = False) -> float:
    if not _is_number(value) or not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        bound = "0 <= value < 1" if upper_open else "0..1"
        raise UsageError(f"{name} must be a number in {bound}, got {value!r}"[:160])
    return float(value)


def _check_int(name: str, value, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}"[:160])
    return int(value)


def _check_point_grids(point_grids, layers: int) -> list[np.ndarray]:
    if isinstance(point_grids, np.ndarray) and point_grids.ndim == 2:
        point_grids = [point_grids]
    try:
        grids = [np.asarray(grid, dtype=np.float64) for grid in point_grids]
    except (TypeError, ValueError):
        raise UsageError("point_grids must be a list of [N,2] arrays of (x, y) in 0..1, one per crop layer") from None
    if len(grids) < layers:
        raise UsageError(f"point_grids has {len(grids)} grid(s) for {layers} crop layer(s)", hint="one grid per layer: crop_n_layers + 1")
    for index, grid in enumerate(grids):
        if grid.ndim != 2 or grid.shape[1] != 2 or grid.shape[0] < 1:
            raise UsageError(f"point_grids[{index}] must have shape [N,2] with N >= 1, got {list(grid.shape)}")
        if not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 1:
            raise UsageError(f"point_grids[{index}] has points outside 0..1", hint="grids are normalised (x, y), scaled to each crop")
    return grids


# ------------------------------------------------------------------------------------------ generator


def check_settings(
    *,
    points_per_side,
    points_per_batch,
    pred_iou_thresh,
    stability_score_thresh,
    stability_score_offset,
    box_nms_thresh,
    crop_n_layers,
    crop_nms_thresh,
    crop_overlap_ratio,
    crop_n_points_downscale_factor,
    point_grids,
    min_mask_region_area,
    output_mode,
) -> dict:
    """MaskGenerator's settings checked (one-line UsageError for a value out of range, RuntimeUnavailable for a
    missing pycocotools / OpenCV) and normalised, with the per-layer `point_grids` built: before any model
    loads, so `evsam-export segment` refuses bad options first."""
    checked = {
        "points_per_batch": _check_int("points_per_batch", points_per_batch, 1),
        "pred_iou_thresh": _check_fraction("pred_iou_thresh", pred_iou_thresh),
        "stability_score_thresh": _check_fraction("stability_score_thresh", stability_score_thresh),
        "box_nms_thresh": _check_fraction("box_nms_thresh", box_nms_thresh),
        "crop_n_layers": _check_int("crop_n_layers", crop_n_layers, 0),
        "crop_nms_thresh": _check_fraction("crop_nms_thresh", crop_nms_thresh),
        "crop_overlap_ratio": _check_fraction("crop_overlap_ratio", crop_overlap_ratio, upper_open=True),
        "crop_n_points_downscale_factor": _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1),
    }
    if not _is_number(stability_score_offset) or stability_score_offset < 0:
        raise UsageError(f"stability_score_offset must be a number >= 0 (a logit offset), got {stability_score_offset!r}"[:160])
    checked["stability_score_offset"] = float(stability_score_offset)
    if not _is_number(min_mask_region_area) or min_mask_region_area < 0:
        raise UsageError(f"min_mask_region_area must be a number of pixels >= 0, got {min_mask_region_area!r}"[:160])
    checked["min_mask_region_area"] = min_mask_region_area
    if output_mode not in OUTPUT_MODES:
        raise UsageError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}"[:160])
    checked["output_mode"] = output_mode
    if (points_per_side is None) == (point_grids is None):
        raise UsageError("give exactly one of points_per_side and point_grids", hint="points_per_side=32 is upstream's default")
    layers, factor = checked["crop_n_layers"], checked["crop_n_points_downscale_factor"]
    if points_per_side is not None:
        points_per_side = _check_int("points_per_side", points_per_side, 1)
        if int(points_per_side / factor**layers) < 1:
            raise UsageError(
                f"crop layer {layers} would get no points: points_per_side {points_per_side} / "
                f"crop_n_points_downscale_factor {factor}**{layers} < 1",
                hint="raise points_per_side, or lower crop_n_layers or the downscale factor",
            )
        checked["point_grids"] = layer_point_grids(points_per_side, layers, factor)
    else:
        checked["point_grids"] = _check_point_grids(point_grids, layers + 1)
    checked["points_per_side"] = points_per_side
    _pycocotools_mask()
    if checked["min_mask_region_area"] > 0:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise RuntimeUnavailable("min_mask_region_area > 0 needs OpenCV", hint=DATA_EXTRA_HINT) from None
    return checked




class MaskGenerator:
    """Every mask in an image from a point grid: upstream's automatic mask generator over a Predictor.

    MaskGenerator(predictor, points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88,
                  stability_score_thresh=0.95, stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0,
                  crop_nms_thresh=0.7, crop_overlap_ratio=512/1500, crop_n_points_downscale_factor=1,
                  point_grids=None, min_mask_region_area=0, output_mode="binary_mask")

    Settings mean what they mean upstream (docs/segment.md). points_per_batch is how many grid points go to
    the predictor at once; the predictor splits them further to the decoder's limits (a static-prompt graph's
    fixed count, or its memory budget). Bad settings raise a one-line UsageError."""

    def __init__(
        self,
        predictor,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        settings = dict(locals())
        del settings["self"], settings["predictor"]
        self.__dict__.update(check_settings(**settings))
        if getattr(predictor, "num_tokens", None) == 1:
            raise UsageError(
                f"{predictor.decoder_artifact.id} returns only token 0 (exported with --single-mask); segment everything "
                "scores the three multimask candidates of every point",
                hint="export without --single-mask",
            )
        self.predictor = predictor
        # The last generate() call: "counts" of masks after each stage (candidates, predicted_iou, stability,
        # crop_edge, box_nms, crop_nms, small_regions, masks) and "seconds" per stage (docs/segment.md).
        self.last_stats: dict = {}

    # -- one image ---------------------------------------------------------------------------------
    def generate(self, image) -> list[dict]:
        """Records for every mask of `image` (numpy HxW / HxWx3 / HxWx4 or a PIL image), upstream's fields:
        segmentation (per output_mode), area, bbox (XYWH), predicted_iou, point_coords, stability_score,
        crop_box (XYWH)."""
        from evsam_export.runtime.prompts import is_pil_image

        started = time.perf_counter()
        try:
            rgb = processing.pil_to_rgb_uint8(image) if is_pil_image(image) else processing.as_rgb_uint8(image)
        except (ValueError, OSError, TypeError) as exc:
            raise UsageError(f"cannot use the image: {' '.join(str(exc).split())[:160]}") from None
        image_size = rgb.shape[:2]
        self.last_stats = {
            "counts": dict.fromkeys(("candidates", "predicted_iou", "stability", "crop_edge", "box_nms"), 0),
            "seconds": dict.fromkeys(("encoder", "decoder", "postprocess"), 0.0),
        }
        crops = crop_boxes(image_size, self.crop_n_layers, self.crop_overlap_ratio)
        masks = MaskSet.concat([self._process_crop(rgb, box, layer) for box, layer in crops])
        if len(crops) > 1 and len(masks):
            # Across crops, prefer the mask from the smaller crop.
            widths = masks.crop_boxes[:, 2] - masks.crop_boxes[:, 0]
            heights = masks.crop_boxes[:, 3] - masks.crop_boxes[:, 1]
            masks = masks.take(box_nms(masks.boxes, np.float32(1) / (widths * heights).astype(np.float32), self.crop_nms_thresh))
        self.last_stats["counts"]["crop_nms"] = len(masks)
        if self.min_mask_region_area > 0 and len(masks):
            masks = self._remove_small_regions(masks)
        self.last_stats["counts"]["small_regions"] = len(masks)
        records = [self._record(masks, index) for index in range(len(masks))]
        self.last_stats["counts"]["masks"] = len(records)
        self.last_stats["seconds"]["total"] = time.perf_counter() - started
        return records

    def _process_crop(self, rgb: np.ndarray, crop_box, layer: int) -> MaskSet:
        x0, y0, x1, y1 = crop_box
        started = time.perf_counter()
        self.predictor.set_image(rgb[y0:y1, x0:x1])
        self.last_stats["seconds"]["encoder"] += time.perf_counter() - started
        geometry = self.predictor.geometry
        crop_h, crop_w = geometry.original_size
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        parts = [
            self._process_batch(points[start : start + self.points_per_batch], crop_box, rgb.shape[:2])
            for start in range(0, len(points), self.points_per_batch)
        ]
        self.predictor.reset_image()
        masks = MaskSet.concat(parts)
        # Within a crop, duplicates go by box overlap; the higher predicted IoU wins. Boxes are still crop-frame.
        masks = masks.take(box_nms(masks.boxes, masks.predicted_iou, self.box_nms_thresh))
        self.last_stats["counts"]["box_nms"] += len(masks)
        offset = np.array([x0, y0, x0, y0], dtype=np.int64)
        masks.boxes = masks.boxes + offset
        masks.points = masks.points + offset[:2]
        masks.crop_boxes = np.tile(np.asarray(crop_box, dtype=np.int64), (len(masks), 1))
        return masks

    def _process_batch(self, points: np.ndarray, crop_box, image_size: tuple[int, int]) -> MaskSet:
        from evsam_export.model.processing import postprocess_into

        started = time.perf_counter()
        low_res, predicted_iou = self.predictor.predict_low_res(points[:, None, :], np.ones((len(points), 1)), multimask_output=True)
        self.last_stats["seconds"]["decoder"] += time.perf_counter() - started
        started = time.perf_counter()
        candidates = low_res.shape[1]
        low_res = low_res.reshape(-1, *low_res.shape[2:])
        predicted_iou = predicted_iou.reshape(-1)
        points = np.repeat(points, candidates, axis=0)
        self.last_stats["counts"]["candidates"] += len(predicted_iou)
        if self.pred_iou_thresh > 0:
            keep = predicted_iou > np.float32(self.pred_iou_thresh)
            low_res, predicted_iou, points = low_res[keep], predicted_iou[keep], points[keep]
        self.last_stats["counts"]["predicted_iou"] += len(predicted_iou)

        geometry = self.predictor.geometry
        crop_h, crop_w = geometry.original_size
        x0, y0 = crop_box[0], crop_box[1]
        height, width = image_size
        per_band = max(1, UPSCALE_BAND_BYTES // (4 * crop_h * crop_w))
        parts = []
        for start in range(0, len(predicted_iou), per_band):
            band = slice(start, start + per_band)
            # Stability is scored on the logits upscaled to the crop's size, where upstream scores it.
            logits = np.empty((len(predicted_iou[band]), crop_h, crop_w), np.float32)
            postprocess_into(low_res[band], geometry, logits)
            stability = stability_scores(logits, processing.MASK_THRESHOLD, self.stability_score_offset)
            keep = np.ones(len(stability), bool)
            if self.stability_score_thresh > 0:
                keep = stability >= np.float32(self.stability_score_thresh)
            self.last_stats["counts"]["stability"] += int(keep.sum())
            binary = processing.binarize(logits[keep])
            del logits
            boxes = mask_boxes(binary)
            inside = ~near_crop_edge(boxes + np.array([x0, y0, x0, y0]), crop_box, image_size)
            binary, boxes = binary[inside], boxes[inside]
            self.last_stats["counts"]["crop_edge"] += len(boxes)
            full = np.zeros((len(binary), height, width), bool)
            full[:, y0 : y0 + crop_h, x0 : x0 + crop_w] = binary
            selected = np.flatnonzero(keep)[inside] + start
            parts.append(MaskSet(
                rles=list(encode_masks(full)),
                boxes=boxes,
                predicted_iou=predicted_iou[selected],
                stability=stability[keep][inside],
                points=points[selected],
                crop_boxes=np.zeros((len(boxes), 4), np.int64),
            ))
        self.last_stats["seconds"]["postprocess"] += time.perf_counter() - started
        return MaskSet.concat(parts)

    def _remove_small_regions(self, masks: MaskSet) -> MaskSet:
        """Fill small holes and drop small islands of every mask, then NMS again preferring untouched masks.

        One decoded mask at a time: a changed mask is re-encoded at once, so memory holds RLEs, not masks."""
        started = time.perf_counter()
        boxes = np.empty_like(masks.boxes)
        cleaned_rles = {}
        for index, rle in enumerate(masks.rles):
            mask, holes_changed = remove_small_regions(decode_mask(rle), self.min_mask_region_area, "holes")
            mask, islands_changed = remove_small_regions(mask, self.min_mask_region_area, "islands")
            boxes[index] = mask_boxes(mask[None])[0]
            if holes_changed or islands_changed:
                cleaned_rles[index] = encode_masks(mask[None])[0]
        untouched = np.asarray([index not in cleaned_rles for index in range(len(masks))], dtype=np.float32)
        keep = box_nms(boxes, untouched, max(self.box_nms_thresh, self.crop_nms_thresh))
        for index in keep:
            if index in cleaned_rles:
                masks.rles[index] = cleaned_rles[index]
                masks.boxes[index] = boxes[index]
        self.last_stats["seconds"]["postprocess"] += time.perf_counter() - started
        return masks.take(keep)

    def _record(self, masks: MaskSet, index: int) -> dict:
        rle = masks.rles[index]
        if self.output_mode == "coco_rle":
            counts = rle["counts"]
            segmentation = {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        elif self.output_mode == "binary_mask":
            segmentation = decode_mask(rle)
        else:
            segmentation = uncompressed_rle(decode_mask(rle))
        return {
            "segmentation": segmentation,
            "area": int(_pycocotools_mask().area(rle)),
            "bbox": xywh(masks.boxes[index]),
            "predicted_iou": float(masks.predicted_iou[index]),
            "point_coords": [[float(v) for v in masks.points[index]]],
            "stability_score": float(masks.stability[index]),
            "crop_box": xywh(masks.crop_boxes[index]),
        }
