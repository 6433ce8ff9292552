"""Segment everything: SAM's automatic mask generator on the torch-free runtime (docs/segment.md).

    from evsam_export.runtime import MaskGenerator, Predictor
    generator = MaskGenerator(Predictor("out/l0"), points_per_side=32)
    records = generator.generate(rgb)        # one dict per mask, upstream's fields and order

The algorithm and its settings are upstream's `SamAutomaticMaskGenerator` (segment-anything, which
EfficientViT-SAM ships as `EfficientViTSamAutomaticMaskGenerator`), written again for numpy: a point grid per
crop layer, one encoder run per crop, the grid through the decoder's prompt axis in batches, filtering by
predicted IoU, by stability of the crop-size logits and by crop edges, box NMS within and across crops, then
optional small-region and hole removal (OpenCV). Stability, boxes and masks are decided from the low-res
logits (CropUpscale: bounds from each pixel's low-res window, exact values only along the outlines), with
the full-size upscale's own answers, so only the masks NMS keeps are built at the crop's size. Masks are kept
as COCO RLE (pycocotools) so memory grows with the masks' outlines, not their pixels. Needs numpy,
pycocotools, and OpenCV for min_mask_region_area > 0 (`pip install 'evsam-export[data]'`); never imports
torch.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from evsam_export.errors import RuntimeUnavailable, UsageError
from evsam_export.model import processing

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Masks whose box lies within this many pixels of a crop edge (but not of the image edge) were cut by the crop.
CROP_EDGE_TOLERANCE_PX = 20.0
# Crop-size float32 logits of masks upscaled whole are held this many bytes at a time, so a batch of 64
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


# ------------------------------------------------------------------------------------------ crop-size logits


# A convex combination computed in float32 can leave [min, max] of its inputs by a few ulps: bounds widen by this
# much (relative to the threshold's magnitude, at least absolute) so they stay bounds.
BOUND_SLACK = 1e-4
# A mask whose outline band holds more than this share of the crop's pixels is upscaled whole (dense_above):
# one pixel of the band costs about as much as 40 pixels of the whole upscale (docs/segment.md).
DENSE_BAND_SHARE = 0.05


class CropUpscale:
    """The crop-size logits of low-res logits, exactly as processing.postprocess_masks computes them (torch's
    bilinear to the 1024 frame, the crop to the input size, bilinear to the crop's size: the same index and
    weight tables and the same float32 operations, so bit-identical), for any block of output pixels, plus
    cheap bounds on them from the low-res logits alone.

    Every output pixel is a convex combination of a window of low-res logits: output row r reads frame rows
    f0(r), f1(r), which read low-res rows lo(r)..hi(r) (at most a few). A window of `span` rows and columns
    starting at (lo(r), lo(c)) holds all of them, so its min and max bound the pixel, and pixels that share
    (lo(r), lo(c)) share the window: counting thresholded window extremes weighted by how many output rows
    and columns start there bounds a mask's pixel count without the full-size upscale."""

    def __init__(self, geometry) -> None:
        from evsam_export.model.variants import LOW_RES_MASK_SIZE, PROMPT_FRAME

        height, width = geometry.original_size
        self.geometry = geometry
        self.size = (int(height), int(width))
        self.low = LOW_RES_MASK_SIZE
        frame = processing._bilinear_axis(LOW_RES_MASK_SIZE, PROMPT_FRAME)  # the same table for rows and columns
        self.axes = []
        for size_in, size_out in zip(geometry.input_size, self.size):
            second = processing._bilinear_axis(int(size_in), int(size_out))
            lo = frame[0][second[0]]
            hi = frame[1][second[1]]
            starts = np.bincount(lo, minlength=self.low)  # output pixels per window start
            first = np.full(self.low, -1, np.int64)
            last = np.full(self.low, -1, np.int64)
            index = np.arange(size_out)
            first[lo[::-1]] = index[::-1]
            last[lo] = index
            self.axes.append({"second": second, "lo": lo, "span": int((hi - lo).max()) + 1, "used": int(hi.max()) + 1,
                              "starts": starts, "first": first, "last": last})
        self.frame = frame

    # -- exact values --------------------------------------------------------------------------------
    def values(self, low_res: np.ndarray, rows=None, cols=None) -> np.ndarray:
        """Crop-size logits [m, len(rows), len(cols)] of low-res logits [m, 256, 256] at output rows x cols
        (default all), bit-identical to the same pixels of processing.postprocess_masks."""
        rows = np.arange(self.size[0]) if rows is None else np.asarray(rows, np.int64)
        cols = np.arange(self.size[1]) if cols is None else np.asarray(cols, np.int64)
        low_res = np.asarray(low_res, np.float32)
        (r0, r1, rw), (c0, c1, cw) = self.axes[0]["second"], self.axes[1]["second"]
        frame_rows, (top_at, bottom_at) = _needed(r0[rows], r1[rows])
        frame_cols, (left_at, right_at) = _needed(c0[cols], c1[cols])
        f0, f1, fw = self.frame
        # The 1024 frame at the frame rows and columns these pixels read: rows first, then columns, as torch.
        top, bottom = low_res[:, f0[frame_rows], :], low_res[:, f1[frame_rows], :]
        blended = top + (bottom - top) * fw[frame_rows, None]
        left, right = blended[..., f0[frame_cols]], blended[..., f1[frame_cols]]
        frame = left + (right - left) * fw[frame_cols]
        # Then the frame to the crop's size.
        top, bottom = frame[:, top_at, :], frame[:, bottom_at, :]
        blended = top + (bottom - top) * rw[rows, None]
        left, right = blended[..., left_at], blended[..., right_at]
        return left + (right - left) * cw[cols]

    def dense_above(self, low_res: np.ndarray, which: np.ndarray, thresholds: list[float]) -> list[list[np.ndarray]]:
        """Whole crop-size masks of low_res[which] above each threshold ([threshold][k] bool), exactly: the
        runtime's fast upscale (processing.postprocess_into, OpenCV when installed) decides every pixel farther
        from the threshold than its error bound, and the few pixels within it are computed exactly
        (pixel_values), so the masks are those of values() at a fraction of its cost."""
        which = np.asarray(which, np.int64)
        padded = np.zeros((len(which), self.low, self.low), np.float32)  # the 256x256 grid it reads
        padded[:, : low_res.shape[1], : low_res.shape[2]] = low_res[which]
        logits = np.empty((len(which), *self.size), np.float32)
        processing.postprocess_into(padded, self.geometry, logits)
        bounds = processing.fast_upscale_error_bound(padded)
        del padded
        cv2 = processing.opencv()  # installed whenever a bound is non-zero
        result: list[list[np.ndarray]] = [[] for _ in thresholds]
        for k, mask_index in enumerate(which):
            for masks, threshold in zip(result, thresholds):
                threshold = np.float32(threshold)
                above = logits[k] > threshold
                if bounds[k] > 0:
                    # cv2.inRange + findNonZero: one pass each, several times faster than numpy's for this
                    near = cv2.findNonZero(cv2.inRange(logits[k], float(threshold - bounds[k]), float(threshold + bounds[k])))
                    if near is not None:
                        near = near.reshape(-1, 2).astype(np.int64)  # (x, y) points
                        cols, rows = near[:, 0], near[:, 1]
                        exact = self.pixel_values(low_res, np.full(len(rows), mask_index), rows, cols)
                        above[rows, cols] = exact > threshold
                masks.append(above)
        return result

    def pixel_values(self, low_res: np.ndarray, index: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Crop-size logits of the scattered pixels (index, rows, cols): low_res[index] at (rows, cols), the same
        float32 operations on the same elements as values(), so bit-identical to it."""
        (r0, r1, rw), (c0, c1, cw) = self.axes[0]["second"], self.axes[1]["second"]
        f0, f1, fw = self.frame
        flat = np.ascontiguousarray(low_res, dtype=np.float32).reshape(-1)
        base = np.asarray(index, np.int64) * (low_res.shape[-2] * low_res.shape[-1])
        stride = low_res.shape[-1]

        def frame(frame_row, frame_col):
            top, bottom = base + f0[frame_row] * stride, base + f1[frame_row] * stride
            left_col, right_col, row_weight = f0[frame_col], f1[frame_col], fw[frame_row]
            top_left, bottom_left = flat.take(top + left_col), flat.take(bottom + left_col)
            top_right, bottom_right = flat.take(top + right_col), flat.take(bottom + right_col)
            left = top_left + (bottom_left - top_left) * row_weight
            right = top_right + (bottom_right - top_right) * row_weight
            return left + (right - left) * fw[frame_col]

        top_row, bottom_row, left_col, right_col = r0[rows], r1[rows], c0[cols], c1[cols]
        top_left, bottom_left = frame(top_row, left_col), frame(bottom_row, left_col)
        top_right, bottom_right = frame(top_row, right_col), frame(bottom_row, right_col)
        left = top_left + (bottom_left - top_left) * rw[rows]
        right = top_right + (bottom_right - top_right) * rw[rows]
        return left + (right - left) * cw[cols]

    # -- from the low-res logits -----------------------------------------------------------------------
    def extremes(self, low_res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window max, window min) [m, used rows, used cols]: at (i, j), bounds on every crop-size pixel whose
        window starts there."""
        rows, cols = self.axes
        used = np.asarray(low_res, np.float32)[:, : rows["used"], : cols["used"]]
        cv2 = processing.opencv()
        if cv2 is not None and used.size:
            # The same windows as below: a flat kernel anchored at its top-left corner, and the replicated last
            # row or column adds no new value to a window that runs past it.
            kernel = np.ones((rows["span"], cols["span"]), np.uint8)
            window_max, window_min = np.empty_like(used), np.empty_like(used)
            for index, mask in enumerate(used):
                cv2.dilate(mask, kernel, dst=window_max[index], anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
                cv2.erode(mask, kernel, dst=window_min[index], anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)
            return window_max, window_min
        result = []
        for reduce in (np.maximum, np.minimum):
            # A window that runs past the last row or column is cut there: it still holds the pixel's own.
            window = used.copy()
            for shift in range(1, rows["span"]):
                reduce(window[:, :-shift], used[:, shift:], out=window[:, :-shift])
            along_rows = window.copy() if cols["span"] > 1 else window
            for shift in range(1, cols["span"]):
                reduce(window[..., :-shift], along_rows[..., shift:], out=window[..., :-shift])
            result.append(window)
        return result[0], result[1]

    def count_bounds(self, window_max: np.ndarray, window_min: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(at most, at least) [m] int64 crop-size pixels above `threshold` per mask, from the windows alone."""
        inside, band = self._windows(window_max, window_min, threshold)
        least = self._weighted_count(inside)
        return least + self._weighted_count(band), least

    def _windows(self, window_max: np.ndarray, window_min: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(inside, band) [m, used rows, used cols]: windows whose every pixel is above `threshold`, and windows
        where some may be."""
        rows, cols = self.axes
        slack = np.float32(BOUND_SLACK * max(1.0, abs(threshold)))
        valid = (rows["starts"][: rows["used"], None] > 0) & (cols["starts"][None, : cols["used"]] > 0)
        inside = (window_min > np.float32(threshold) + slack) & valid
        band = (window_max > np.float32(threshold) - slack) & ~inside & valid
        return inside, band

    def _weighted_count(self, windows: np.ndarray) -> np.ndarray:
        """[m] int64: crop-size pixels whose window is set."""
        rows, cols = self.axes
        col_weight = cols["starts"][: cols["used"]].astype(np.float32)  # < 2**24 pixels per row: exact in float32
        per_row = np.rint(windows.astype(np.float32) @ col_weight).astype(np.int64)
        return per_row @ rows["starts"][: rows["used"]].astype(np.int64)

    def above(self, low_res: np.ndarray, window_max: np.ndarray, window_min: np.ndarray, thresholds) -> list[Above]:
        """Which crop-size pixels of each mask have logits > threshold, exactly, for each of `thresholds` (one
        Above each; a single threshold gives a single Above): windows whose min is above it are inside, windows
        whose max is not are outside, and only the pixels of the windows in between (a band along the mask's
        outline) are computed (pixel_values). A mask whose band covers more than DENSE_BAND_SHARE of the crop
        (a ragged, noisy mask) is computed whole instead (values), once for all thresholds."""
        single = not isinstance(thresholds, (tuple, list))
        thresholds = [thresholds] if single else list(thresholds)
        rows, cols = self.axes
        windows = [self._windows(window_max, window_min, t) for t in thresholds]
        band_pixels = np.max([self._weighted_count(band) for _, band in windows], axis=0)
        dense = np.flatnonzero(band_pixels > DENSE_BAND_SHARE * self.size[0] * self.size[1])
        dense_masks: list[dict[int, np.ndarray]] = [{} for _ in thresholds]
        per_chunk = max(1, UPSCALE_BAND_BYTES // (4 * self.size[0] * self.size[1]))
        for start in range(0, len(dense), per_chunk):
            chunk = dense[start : start + per_chunk]
            for masks, built in zip(dense_masks, self.dense_above(low_res, chunk, thresholds)):
                masks.update(zip(chunk.tolist(), built))
        result = []
        for (inside, band), masks, threshold in zip(windows, dense_masks, thresholds):
            inside[dense] = False
            band[dense] = False
            index, row_start, col_start = np.unravel_index(np.flatnonzero(band), band.shape)
            # Every pixel of each band window: nr x nc pixels starting at the window's first row and column.
            per_row, per_col = rows["starts"][row_start], cols["starts"][col_start]
            sizes = per_row * per_col
            cell = np.repeat(np.arange(len(sizes)), sizes)
            local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            pixel_rows = rows["first"][row_start][cell] + local // per_col[cell]
            pixel_cols = cols["first"][col_start][cell] + local % per_col[cell]
            pixel_index = index[cell]
            positive = self.pixel_values(low_res, pixel_index, pixel_rows, pixel_cols) > np.float32(threshold)
            result.append(Above(self, inside, pixel_index[positive], pixel_rows[positive], pixel_cols[positive],
                                len(low_res), masks))
        return result[0] if single else result

    def expand(self, grid: np.ndarray) -> np.ndarray:
        """A [used rows, used cols] grid of windows as the crop-size grid of the pixels that start there."""
        rows, cols = self.axes
        full = np.repeat(grid, rows["starts"][: rows["used"]], axis=0)
        return np.repeat(full, cols["starts"][: cols["used"]], axis=1)


@dataclass
class Above:
    """Crop-size pixels above a threshold, per mask: whole windows (`inside`, [m, used rows, used cols]) plus the
    band pixels computed exactly (mask index, row, column)."""

    upscale: CropUpscale
    inside: np.ndarray
    index: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    count_masks: int
    dense: dict = field(default_factory=dict)  # mask index -> its whole crop-size mask, for masks computed whole

    def counts(self) -> np.ndarray:
        """[m] int64 pixels above the threshold."""
        counts = self.upscale._weighted_count(self.inside) + np.bincount(self.index, minlength=self.count_masks)
        for which, mask in self.dense.items():
            counts[which] = np.count_nonzero(mask)
        return counts

    def boxes(self) -> np.ndarray:
        """XYXY boxes [m,4] (inclusive, as mask_boxes; zeros for an empty mask)."""
        rows, cols = self.upscale.axes
        big = np.iinfo(np.int64).max
        low = np.full((self.count_masks, 2), big, np.int64)
        high = np.full((self.count_masks, 2), -1, np.int64)
        for axis, (info, any_axis) in enumerate(((cols, 1), (rows, 2))):
            present = self.inside.any(axis=any_axis)
            found = present.any(axis=1)
            first = np.argmax(present, axis=1)
            last = present.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
            low[found, axis] = info["first"][first[found]]
            high[found, axis] = info["last"][last[found]]
            coords = self.cols if axis == 0 else self.rows
            np.minimum.at(low[:, axis], self.index, coords)
            np.maximum.at(high[:, axis], self.index, coords)
        boxes = np.concatenate([low, high], axis=1)
        boxes[high[:, 0] < 0] = 0
        for which, mask in self.dense.items():
            boxes[which] = mask_boxes(mask[None])[0]
        return boxes

    def mask(self, which: int) -> np.ndarray:
        """The crop-size boolean mask of mask `which`."""
        if which in self.dense:
            return self.dense[which].copy()
        mask = self.upscale.expand(self.inside[which])
        own = self.index == which
        mask[self.rows[own], self.cols[own]] = True
        return mask


def _needed(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The sorted distinct indices two index arrays read, and each array's positions among them."""
    needed = np.unique(np.concatenate([first, second]))
    return needed, (np.searchsorted(needed, first), np.searchsorted(needed, second))


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
    decoder_workers=None,
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
        "decoder_workers": None if decoder_workers is None else _check_int("decoder_workers", decoder_workers, 1),
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




@dataclass
class Encoded:
    """MaskGenerator.prepare's result: the image as RGB uint8, (embeddings, geometry) per crop, encoder seconds."""

    rgb: np.ndarray
    embeddings: list
    seconds: float


def _as_rgb(image) -> np.ndarray:
    from evsam_export.runtime.prompts import is_pil_image

    try:
        return processing.pil_to_rgb_uint8(image) if is_pil_image(image) else processing.as_rgb_uint8(image)
    except (ValueError, OSError, TypeError) as exc:
        raise UsageError(f"cannot use the image: {' '.join(str(exc).split())[:160]}") from None


def _encode_dense(above: Above, count: int, wanted: np.ndarray | None = None) -> list:
    """[count] crop-size RLEs of the masks `above` built whole (None for the others, and where not `wanted`)."""
    rles: list = [None] * count
    for which, mask in above.dense.items():
        if wanted is None or wanted[which]:
            rles[which] = encode_masks(mask[None])[0]
    return rles


class _Survivors:
    """A crop's masks that passed the filters, until box NMS: their low-res logits (the rows and columns the crop
    reads) with crop-frame boxes, predicted IoU, stability (NaN where not computed yet) and prompt points."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, low, boxes, predicted_iou, stability, points, rles) -> None:
        self.parts.append((low, boxes, predicted_iou, stability, points, list(rles)))

    def _field(self, index: int, empty: np.ndarray) -> np.ndarray:
        return np.concatenate([part[index] for part in self.parts]) if self.parts else empty

    def boxes(self) -> np.ndarray:
        return self._field(1, np.zeros((0, 4), np.int64))

    def predicted_iou(self) -> np.ndarray:
        return self._field(2, np.zeros((0,), np.float32))

    def take(self, keep: np.ndarray) -> tuple:
        """(low, boxes, predicted_iou, stability, points, rles) of the survivors at `keep`, in that order; an
        RLE (crop-size) where the mask was built whole on the way, else None."""
        keep = np.asarray(keep, np.int64)
        if not self.parts or not len(keep):
            return (np.zeros((0, 1, 1), np.float32), np.zeros((0, 4), np.int64), np.zeros((0,), np.float32),
                    np.zeros((0,), np.float32), np.zeros((0, 2), np.float64), [])
        sizes = np.cumsum([0] + [len(part[0]) for part in self.parts])
        part_of = np.searchsorted(sizes, keep, side="right") - 1
        where = list(zip(part_of, keep - sizes[part_of]))
        arrays = tuple(np.stack([self.parts[p][field][i] for p, i in where]) for field in range(5))
        return (*arrays, [self.parts[p][5][i] for p, i in where])


class MaskGenerator:
    """Every mask in an image from a point grid: upstream's automatic mask generator over a Predictor.

    MaskGenerator(predictor, points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88,
                  stability_score_thresh=0.95, stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0,
                  crop_nms_thresh=0.7, crop_overlap_ratio=512/1500, crop_n_points_downscale_factor=1,
                  point_grids=None, min_mask_region_area=0, output_mode="binary_mask", decoder_workers=None)

    Settings mean what they mean upstream (docs/segment.md). points_per_batch is how many grid points go to
    the predictor at once; the predictor splits them further to the decoder's limits (a static-prompt graph's
    fixed count, or its memory budget). decoder_workers: how many parts of a batch decode at once, each on
    one thread (Predictor.predict_low_res); None: the predictor's `threads`, else the CPU count. Bad settings
    raise a one-line UsageError."""

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
        decoder_workers: int | None = None,
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
        if self.decoder_workers is None:
            self.decoder_workers = getattr(predictor, "threads", None) or os.cpu_count() or 1
        # The last generate() call: "counts" of masks after each stage (candidates, predicted_iou, stability,
        # crop_edge, box_nms, crop_nms, small_regions, masks) and "seconds" per stage (docs/segment.md).
        self.last_stats: dict = {}

    # -- one image ---------------------------------------------------------------------------------
    def prepare(self, image) -> Encoded:
        """Run the encoder on every crop of `image` without touching the predictor's current image: another
        thread can prepare the next image while generate() decodes this one (ONNX Runtime and OpenVINO release
        the GIL while they run). Pass the result to generate(image, encoded)."""
        started = time.perf_counter()
        rgb = _as_rgb(image)
        crops = crop_boxes(rgb.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
        embeddings = [self.predictor.encode(rgb[y0:y1, x0:x1]) for (x0, y0, x1, y1), _ in crops]
        return Encoded(rgb, embeddings, time.perf_counter() - started)

    def generate(self, image, encoded: Encoded | None = None) -> list[dict]:
        """Records for every mask of `image` (numpy HxW / HxWx3 / HxWx4 or a PIL image), upstream's fields:
        segmentation (per output_mode), area, bbox (XYWH), predicted_iou, point_coords, stability_score,
        crop_box (XYWH). `encoded`: what prepare(image) returned, so the encoder does not run again."""
        started = time.perf_counter()
        rgb = encoded.rgb if encoded is not None else _as_rgb(image)
        image_size = rgb.shape[:2]
        self.last_stats = {
            "counts": dict.fromkeys(("candidates", "predicted_iou", "stability", "stability_exact", "crop_edge", "box_nms"), 0),
            "seconds": dict.fromkeys(("encoder", "decoder", "postprocess"), 0.0),
        }
        crops = crop_boxes(image_size, self.crop_n_layers, self.crop_overlap_ratio)
        embedded = [None] * len(crops)
        if encoded is not None:
            embedded = encoded.embeddings
            self.last_stats["seconds"]["encoder"] = encoded.seconds  # spent in prepare(), maybe in another thread
        masks = MaskSet.concat([self._process_crop(rgb, box, layer, emb) for (box, layer), emb in zip(crops, embedded)])
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

    def _process_crop(self, rgb: np.ndarray, crop_box, layer: int, embedded=None) -> MaskSet:
        x0, y0, x1, y1 = crop_box
        started = time.perf_counter()
        if embedded is None:
            self.predictor.set_image(rgb[y0:y1, x0:x1])
        else:
            self.predictor.set_embeddings(*embedded)
        self.last_stats["seconds"]["encoder"] += time.perf_counter() - started
        geometry = self.predictor.geometry
        crop_h, crop_w = geometry.original_size
        upscale = CropUpscale(geometry)
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        survivors = _Survivors()
        batches = [points[start : start + self.points_per_batch] for start in range(0, len(points), self.points_per_batch)]
        # The decoder works on the next batch (in a second thread: the runtimes release the GIL) while this
        # thread filters the last one.
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The decoder computes only the low-res rows and columns the crop's upscale reads (the rest is padding).
            window = (upscale.axes[0]["used"], upscale.axes[1]["used"])
            upcoming = pool.submit(self._decode, batches[0], window)
            for index, batch in enumerate(batches):
                decoded = upcoming.result()
                if index + 1 < len(batches):
                    upcoming = pool.submit(self._decode, batches[index + 1], window)
                self._process_batch(batch, decoded, crop_box, rgb.shape[:2], upscale, survivors)
        self.predictor.reset_image()
        started = time.perf_counter()
        # Within a crop, duplicates go by box overlap; the higher predicted IoU wins. Boxes are still crop-frame.
        keep = box_nms(survivors.boxes(), survivors.predicted_iou(), self.box_nms_thresh)
        self.last_stats["counts"]["box_nms"] += len(keep)
        # Only the masks left now are upscaled in full (one band of logits at a time) and encoded.
        masks = self._final_masks(survivors, keep, upscale, crop_box, rgb.shape[:2])
        offset = np.array([x0, y0, x0, y0], dtype=np.int64)
        masks.boxes = masks.boxes + offset
        masks.points = masks.points + offset[:2]
        masks.crop_boxes = np.tile(np.asarray(crop_box, dtype=np.int64), (len(masks), 1))
        self.last_stats["seconds"]["postprocess"] += time.perf_counter() - started
        return masks

    def _decode(self, points: np.ndarray, window: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits and predicted IoU of every point (the predictor chunks them, decoder_workers at once)."""
        started = time.perf_counter()
        # Candidates at or below pred_iou_thresh are dropped first, so their masks need not be computed.
        low_res, scores = self.predictor.predict_low_res(points[:, None, :], np.ones((len(points), 1)), multimask_output=True,
                                                         workers=self.decoder_workers,
                                                         iou_floor=self.pred_iou_thresh if self.pred_iou_thresh > 0 else None,
                                                         low_res_window=window)
        self.last_stats["seconds"]["decoder"] += time.perf_counter() - started
        return low_res, scores

    def _process_batch(self, points: np.ndarray, decoded, crop_box, image_size: tuple[int, int], upscale: CropUpscale,
                       survivors: _Survivors) -> None:
        low_res, predicted_iou = decoded
        started = time.perf_counter()
        candidates = low_res.shape[1]
        predicted_iou = predicted_iou.reshape(-1)
        points = np.repeat(points, candidates, axis=0)
        self.last_stats["counts"]["candidates"] += len(predicted_iou)
        keep = np.ones(len(predicted_iou), bool)
        if self.pred_iou_thresh > 0:
            keep = predicted_iou > np.float32(self.pred_iou_thresh)
        rows, cols = upscale.axes[0]["used"], upscale.axes[1]["used"]
        # Only the low-res rows and columns the crop reads are kept (a copy: the decoder's output is let go).
        low = np.ascontiguousarray(low_res.reshape(-1, *low_res.shape[2:])[keep, :rows, :cols])
        predicted_iou, points = predicted_iou[keep], points[keep]
        del low_res
        self.last_stats["counts"]["predicted_iou"] += len(predicted_iou)

        window_max, window_min = upscale.extremes(low)
        stability = np.full(len(low), np.nan, np.float32)  # exact where computed; the rest when kept
        boxes = np.full((len(low), 4), -1, np.int64)  # exact where computed
        rles = np.full(len(low), None, object)  # crop-size RLEs of the masks built whole on the way
        if self.stability_score_thresh > 0:
            stability, keep, boxes, rles = self._stability_filter(low, window_max, window_min, upscale)
            low, window_max, window_min = low[keep], window_max[keep], window_min[keep]
            predicted_iou, points, stability, boxes, rles = predicted_iou[keep], points[keep], stability[keep], boxes[keep], rles[keep]
        self.last_stats["counts"]["stability"] += len(low)

        missing = np.flatnonzero(boxes[:, 0] < 0)
        if len(missing):
            binary = upscale.above(low[missing], window_max[missing], window_min[missing], processing.MASK_THRESHOLD)
            boxes[missing] = binary.boxes()
            rles[missing] = _encode_dense(binary, len(missing))
        x0, y0 = crop_box[0], crop_box[1]
        inside = ~near_crop_edge(boxes + np.array([x0, y0, x0, y0]), crop_box, image_size)
        self.last_stats["counts"]["crop_edge"] += int(inside.sum())
        survivors.add(low[inside], boxes[inside], predicted_iou[inside], stability[inside], points[inside], rles[inside])
        self.last_stats["seconds"]["postprocess"] += time.perf_counter() - started

    def _stability_filter(self, low: np.ndarray, window_max: np.ndarray, window_min: np.ndarray,
                          upscale: CropUpscale) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(stability [m] float32, keep [m] bool, boxes [m,4], RLEs [m] object): upstream's stability score of the crop-size
        logits and its filter (>= stability_score_thresh). Pixel counts bounded from the low-res windows decide
        most masks; the rest get their exact counts (CropUpscale.above), so every decision is the one the
        full-size logits give. Stability is NaN where the bounds decided (computed if the mask is kept), boxes
        -1 where not computed on the way (those of the masks that got exact counts are), RLEs None where the
        mask was not built whole."""
        high_t = processing.MASK_THRESHOLD + self.stability_score_offset
        low_t = processing.MASK_THRESHOLD - self.stability_score_offset
        high_most, high_least = upscale.count_bounds(window_max, window_min, high_t)
        low_most, low_least = upscale.count_bounds(window_max, window_min, low_t)
        threshold = np.float32(self.stability_score_thresh)
        with np.errstate(invalid="ignore", divide="ignore"):
            # stability_scores divides float32 counts: bound it by the float64 ratios, with a margin.
            least = high_least / low_most
            most = np.where(low_least > 0, high_most / np.maximum(low_least, 1), np.inf)
        margin = 1e-6
        keep = least >= float(threshold) + margin
        drop = (most < float(threshold) - margin) | (low_most == 0)  # no pixel above -offset: NaN, never kept
        stability = np.full(len(low), np.nan, np.float32)
        boxes = np.full((len(low), 4), -1, np.int64)
        rles = np.full(len(low), None, object)
        exact = np.flatnonzero(~keep & ~drop)
        if len(exact):
            sets = upscale.above(low[exact], window_max[exact], window_min[exact], (high_t, low_t, processing.MASK_THRESHOLD))
            high, low_count = sets[0].counts(), sets[1].counts()
            with np.errstate(invalid="ignore", divide="ignore"):
                stability[exact] = high.astype(np.float32) / low_count.astype(np.float32)
            keep[exact] = stability[exact] >= threshold
            boxes[exact] = sets[2].boxes()
            rles[exact] = _encode_dense(sets[2], len(exact), keep[exact])
        self.last_stats["counts"]["stability_exact"] += len(exact)
        return stability, keep, boxes, rles

    def _final_masks(self, survivors: _Survivors, keep: np.ndarray, upscale: CropUpscale, crop_box,
                     image_size: tuple[int, int]) -> MaskSet:
        """The kept masks at the crop's size, exactly (CropUpscale.above), as image-size COCO RLEs, with their
        stability computed where the filter decided it from bounds."""
        low, boxes, predicted_iou, stability, points, built = survivors.take(keep)
        if not len(low):
            return MaskSet()
        x0, y0, x1, y1 = crop_box
        whole_image = upscale.size == tuple(image_size)
        rles: list = list(built)
        per_band = max(1, UPSCALE_BAND_BYTES // (4 * low[0].size))
        for start in range(0, len(low), per_band):
            part = np.arange(start, min(start + per_band, len(low)))
            missing = part[np.isnan(stability[part])]
            unbuilt = part[[rles[i] is None for i in part]]
            if not len(missing) and not len(unbuilt):
                continue
            window_max, window_min = upscale.extremes(low[part])
            local = {index: k for k, index in enumerate(part)}
            if len(missing):
                at = [local[i] for i in missing]
                thresholds = (processing.MASK_THRESHOLD + self.stability_score_offset,
                              processing.MASK_THRESHOLD - self.stability_score_offset)
                counts = [above.counts() for above in upscale.above(low[missing], window_max[at], window_min[at], thresholds)]
                with np.errstate(invalid="ignore", divide="ignore"):
                    stability[missing] = counts[0].astype(np.float32) / counts[1].astype(np.float32)
            if len(unbuilt):
                at = [local[i] for i in unbuilt]
                binary = upscale.above(low[unbuilt], window_max[at], window_min[at], processing.MASK_THRESHOLD)
                for k, index in enumerate(unbuilt):
                    rles[index] = binary.mask(k)
        for index, mask in enumerate(rles):
            if whole_image and isinstance(mask, np.ndarray):
                rles[index] = encode_masks(mask[None])[0]
            elif not whole_image:  # the crop's mask placed in the image
                full = np.zeros(tuple(image_size), bool)
                full[y0:y1, x0:x1] = mask if isinstance(mask, np.ndarray) else decode_mask(mask)
                rles[index] = encode_masks(full[None])[0]
        return MaskSet(rles=rles, boxes=boxes, predicted_iou=predicted_iou, stability=stability, points=points,
                       crop_boxes=np.zeros((len(boxes), 4), np.int64))

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
