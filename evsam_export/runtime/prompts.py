"""Prompt checks for the torch-free runtime: a caller's points, labels, boxes and mask input checked and laid out
as the decoder's feeds, each problem one UsageError line that says what and how to fix."""

from __future__ import annotations

import sys

import numpy as np

from evsam_export import contract
from evsam_export.errors import UsageError
from evsam_export.model.variants import LOW_RES_MASK_SIZE


def as_float_array(value, name: str) -> np.ndarray:
    """`value` as a float64 array of finite real numbers, or one UsageError line saying why not."""
    try:
        raw = np.asarray(value)
        if raw.dtype.kind not in "biufO":  # strings, complex, dates: never a coordinate
            raise TypeError(f"dtype {raw.dtype} is not a real number type")
        array = raw.astype(np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"{name} must be real numbers ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})") from None
    if not np.all(np.isfinite(array)):
        raise UsageError(f"{name} contains NaN or infinite values")
    return array


def as_flag(value, name: str) -> bool:
    """A bool argument (True/False, numpy bools, 0/1), refused otherwise so an array never decides a branch."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise UsageError(f"{name} must be True or False, got {type(value).__name__}")


def is_pil_image(value) -> bool:
    """Whether `value` is a PIL image, without importing Pillow for callers that pass numpy arrays."""
    if "PIL.Image" not in sys.modules:
        return False
    return isinstance(value, sys.modules["PIL.Image"].Image)


def _shape(array: np.ndarray) -> str:
    return "x".join(str(d) for d in array.shape) or "scalar"


def check_prompts(
    image_size: tuple[int, int],
    point_coords=None,
    point_labels=None,
    box=None,
    boxes=None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Validate prompts in original-image pixels for an image of `image_size` (H, W).

    Returns (points [B,N,2] or None, labels [B,N] or None, boxes [B,4] or None) as float arrays, or raises
    a one-line UsageError: wrong shapes, labels not 0/1, prompts outside the image, x1 < x0 or y1 < y0."""
    height, width = int(image_size[0]), int(image_size[1])
    if box is not None and boxes is not None:
        raise UsageError("give either box (one box) or boxes (a batch), not both")
    box_array = None
    if box is not None:
        box_array = as_float_array(box, "box")
        if box_array.shape not in ((4,), (1, 4)):
            raise UsageError(f"box must have shape [4] (x0, y0, x1, y1), got {_shape(box_array)}", hint="use boxes= for a batch")
        box_array = box_array.reshape(1, 4)
    elif boxes is not None:
        box_array = as_float_array(boxes, "boxes")
        if box_array.ndim == 1 and box_array.shape == (4,):
            box_array = box_array.reshape(1, 4)
        if box_array.ndim != 2 or box_array.shape[1] != 4 or box_array.shape[0] < 1:
            raise UsageError(f"boxes must have shape [B,4] (x0, y0, x1, y1 per row), got {_shape(box_array)}")

    points = labels = None
    if point_coords is None and point_labels is not None:
        raise UsageError("point_labels given without point_coords")
    if point_coords is not None:
        if point_labels is None:
            raise UsageError("point_coords need point_labels (1 foreground, 0 background)")
        points = as_float_array(point_coords, "point_coords")
        labels = as_float_array(point_labels, "point_labels")
        if points.ndim == 2:
            points = points[None]
            labels = labels.reshape(1, -1) if labels.ndim == 1 else labels
        if points.ndim != 3 or points.shape[-1] != 2 or points.shape[0] < 1 or points.shape[1] < 1:
            raise UsageError(f"point_coords must have shape [N,2] or [B,N,2], got {_shape(np.asarray(point_coords))}")
        if labels.shape != points.shape[:2]:
            raise UsageError(
                f"point_labels must have shape {list(points.shape[:2]) if points.shape[0] > 1 else [points.shape[1]]} "
                f"to match point_coords, got {_shape(np.asarray(point_labels))}"
            )
        bad = labels[~np.isin(labels, contract.USER_POINT_LABELS)]
        if bad.size:
            raise UsageError(f"point label {bad.flat[0]:g} is not allowed", hint="use 1 for foreground, 0 for background")
        outside = (points[..., 0] < 0) | (points[..., 0] > width) | (points[..., 1] < 0) | (points[..., 1] > height)
        if outside.any():
            x, y = points[outside][0]
            raise UsageError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image", hint=f"x in 0..{width}, y in 0..{height}")
    if points is None and box_array is None:
        raise UsageError("give at least one point or one box")

    if box_array is not None:
        for x0, y0, x1, y1 in box_array:
            corners = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
            if x1 < x0 or y1 < y0:
                raise UsageError(f"box {corners} has x1 < x0 or y1 < y0", hint="boxes are x0, y0, x1, y1 with x0 <= x1, y0 <= y1")
            if min(x0, y0) < 0 or max(x0, x1) > width or max(y0, y1) > height:
                raise UsageError(f"box {corners} is outside the {width}x{height} image", hint=f"x in 0..{width}, y in 0..{height}")
        if points is not None and points.shape[0] not in (1, box_array.shape[0]):
            raise UsageError(f"{points.shape[0]} point sets but {box_array.shape[0]} boxes", hint="give one point set, or one per box")
    return points, labels, box_array


def mask_feed(mask_input, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask_input [1|B,1,256,256], has_mask_input [1|B]) for the decoder."""
    low = LOW_RES_MASK_SIZE
    if mask_input is None:
        return contract.no_mask_input()
    array = as_float_array(mask_input, "mask_input")
    if array.size and float(np.abs(array).max()) > float(np.finfo(np.float32).max):
        raise UsageError("mask_input has values beyond the float32 range", hint="pass low-res logits from an earlier prediction")
    array = array.astype(np.float32)
    if array.shape in ((low, low), (1, low, low)):
        array = array.reshape(1, 1, low, low)
    elif array.ndim == 3 and array.shape[1:] == (low, low):
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (1, low, low):
        raise UsageError(
            f"mask_input must have shape [1,{low},{low}] or [B,1,{low},{low}] (low-res logits), got {_shape(array)}",
            hint="pass prediction.best_low_res() or prediction.low_res_logits[b, c][None]",
        )
    if array.shape[0] not in (1, batch):
        raise UsageError(f"mask_input has {array.shape[0]} masks for {batch} prompt sets", hint="give one mask, or one per prompt set")
    return np.ascontiguousarray(array), np.ones((array.shape[0],), np.float32)
