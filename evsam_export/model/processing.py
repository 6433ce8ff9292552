"""Pre- and post-processing shared by every runner (PyTorch, ONNX Runtime, OpenVINO, TensorRT) and the
torch-free runtime. numpy + Pillow only: importing this must never import torch.

Matches upstream EfficientViT-SAM exactly: Pillow bilinear resize of the uint8 image so the long side is
the encoder size (512 or 1024), ToTensor + ImageNet normalisation, zero padding at the bottom/right;
prompts scaled into the 1024-long-side frame; masks upsampled bilinearly to 1024, cropped, resized to the
original size and thresholded at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evsam_export.model.variants import (
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_PADDING,
    LOW_RES_MASK_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_FRAME,
)

MASK_THRESHOLD = 0.0


@dataclass(frozen=True)
class ImageGeometry:
    original_size: tuple[int, int]  # (H, W) of the caller's image
    input_size: tuple[int, int]  # (H, W) after resize-longest-side to the 1024 prompt frame
    encoder_size: int  # 512 or 1024


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) after scaling the long side to `long_side`, rounded like upstream (int(x + 0.5))."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """preprocess_shape with each side at least 1 pixel: upstream rounds the short side of an image longer
    than 1024:1 (2048:1 at 1024) to 0 and crashes, while one row or column keeps the math intact."""
    new_h, new_w = preprocess_shape(height, width, long_side)
    return max(new_h, 1), max(new_w, 1)


def integer_to_uint8(values: np.ndarray) -> np.ndarray:
    """Integer pixels (16/32-bit, signed or not) -> uint8, the rule of `evsam-export predict`'s image reader:
    values up to 255 are kept, up to 65535 divided by 257 (full 16-bit range to full 8-bit range), larger
    ones scaled so the maximum is 255; negatives clip to 0."""
    values = np.asarray(values)
    top = float(values.max()) if values.size else 0.0
    scale = 1.0 if top <= 255 else (257.0 if top <= 65535 else top / 255.0)
    # float32 halves the memory of float64 and rounds the same up to 65535: x/257 is never near a .5 tie.
    work_type = np.float32 if top <= 65535 else np.float64
    return np.clip(values.astype(work_type) / work_type(scale), 0, 255).round().astype(np.uint8)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxW (gray), HxWx1, HxWx3 or HxWx4 (alpha dropped) of uint8/bool/integer/float -> HxWx3 uint8.

    Integers other than uint8 follow integer_to_uint8; floats with a maximum <= 1 are scaled by 255, others
    are clipped to 0..255, NaN counts as 0. Raises ValueError for other dtypes and shapes."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind in "iu" and array.dtype != np.uint8:
        array = integer_to_uint8(array)
    elif array.dtype.kind == "f":
        array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
        if array.size and float(array.max()) <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"image dtype {array.dtype} is not supported (use uint8, uint16, bool or float)")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {tuple(np.shape(image))}")
    return np.ascontiguousarray(array)


def pil_to_rgb_uint8(image) -> np.ndarray:
    """A PIL image -> HxWx3 uint8 RGB, as `evsam-export predict` reads files: EXIF orientation applied,
    palette/1-bit/LA/CMYK/YCbCr/LAB/HSV converted by Pillow, 16/32-bit integer modes by integer_to_uint8."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("L", "RGB", "RGBA"):
        array = np.asarray(image)
    elif mode == "P":
        array = np.asarray(image.convert("RGBA" if "transparency" in image.info else "RGB"))
    elif mode.startswith("I"):
        array = integer_to_uint8(np.asarray(image))
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
    elif mode in ("1", "LA", "La"):
        array = np.asarray(image.convert("L"))
    else:
        array = np.asarray(image.convert("RGB"))
    return as_rgb_uint8(array)


def preprocess_image(image: np.ndarray, encoder_size: int) -> tuple[np.ndarray, ImageGeometry]:
    """RGB image -> encoder input [1,3,S,S] float32 and its geometry."""
    from PIL import Image

    rgb = as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    if max(height, width) != encoder_size:
        new_h, new_w = resized_shape(height, width, encoder_size)
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    # ToTensor then Normalize(mean/255, std/255), in float32 and in that order, as upstream.
    scaled = rgb.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32) / np.float32(255.0)
    std = np.asarray(PIXEL_STD, dtype=np.float32) / np.float32(255.0)
    normalized = ((scaled - mean) / std).transpose(2, 0, 1)
    padded = np.zeros((1, 3, encoder_size, encoder_size), dtype=np.float32)
    padded[0, :, : normalized.shape[1], : normalized.shape[2]] = normalized
    return padded, image_geometry(height, width, encoder_size)


def image_geometry(height: int, width: int, encoder_size: int) -> ImageGeometry:
    """The geometry of an H x W image, for encoders that preprocess in the graph (the `app` profile)."""
    return ImageGeometry(original_size=(height, width), input_size=resized_shape(height, width, PROMPT_FRAME),
                         encoder_size=encoder_size)


def encoder_input(rgb: np.ndarray, encoder_profile: str, encoder_size: int) -> tuple[np.ndarray, ImageGeometry]:
    """What an encoder of `encoder_profile` is fed for an HxWx3 uint8 RGB image, and the image's geometry:
    the raw pixels for an `app` encoder (it preprocesses in the graph), else the host-preprocessed tensor."""
    if encoder_profile == "app":
        return rgb, image_geometry(rgb.shape[0], rgb.shape[1], encoder_size)
    return preprocess_image(rgb, encoder_size)


def transform_coords(coords: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Pixel (x, y) in the original image -> the 1024 prompt frame. Any leading shape, last dim 2."""
    old_h, old_w = geometry.original_size
    new_h, new_w = geometry.input_size
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out.astype(np.float32)


@dataclass(frozen=True)
class PromptTokens:
    """Decoder feed in SAM's ONNX contract: coords [B,N,2] (1024 frame) and float labels [B,N]."""

    point_coords: np.ndarray
    point_labels: np.ndarray


def build_prompt_tokens(
    geometry: ImageGeometry,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> PromptTokens:
    """PyTorch SAM's token layout: points; SAM's padding point (0,0,-1) only when there is no box; box
    corners with labels 2 and 3. `points` [N,2] or [B,N,2] with `labels` [N] or [B,N]; `boxes` [4] or [B,4]
    in original-image pixels. Several boxes become a batch of B prompt sets (the points are shared)."""
    if points is None and boxes is None:
        raise ValueError("give at least one point or one box")
    box_array = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    batch = 1 if box_array is None else box_array.shape[0]
    coord_parts, label_parts = [], []
    if points is not None:
        point_array = np.asarray(points, dtype=np.float64)
        if labels is None:
            raise ValueError("point labels are required with points")
        label_array = np.asarray(labels, dtype=np.float64)
        if point_array.ndim == 2:
            point_array, label_array = point_array[None], label_array.reshape(1, -1)
        if point_array.ndim != 3 or point_array.shape[-1] != 2 or label_array.shape != point_array.shape[:2]:
            raise ValueError(
                f"points must be [N,2] with labels [N] (got points {point_array.shape}, labels {label_array.shape})"
            )
        if point_array.shape[0] == 1 and batch > 1:
            point_array = np.repeat(point_array, batch, axis=0)
            label_array = np.repeat(label_array, batch, axis=0)
        batch = point_array.shape[0]
        coord_parts.append(transform_coords(point_array, geometry))
        label_parts.append(label_array.astype(np.float32))
        if box_array is None:
            coord_parts.append(np.zeros((batch, 1, 2), dtype=np.float32))
            label_parts.append(np.full((batch, 1), LABEL_PADDING, dtype=np.float32))
    if box_array is not None:
        if box_array.shape[0] != batch:
            raise ValueError(f"{box_array.shape[0]} boxes but {batch} point sets")
        coord_parts.append(transform_coords(box_array.reshape(-1, 2, 2), geometry))
        label_parts.append(np.tile(np.array([[LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]], dtype=np.float32), (batch, 1)))
    return PromptTokens(
        point_coords=np.ascontiguousarray(np.concatenate(coord_parts, axis=1), dtype=np.float32),
        point_labels=np.ascontiguousarray(np.concatenate(label_parts, axis=1), dtype=np.float32),
    )


def _bilinear_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear interpolation (align_corners=False, no antialias)."""
    scale = np.float32(size_in) / np.float32(size_out)
    # torch computes scale * (dst + 0.5) - 0.5 as one fused multiply-add in float32 (one rounding, on
    # x86 AVX2/AVX-512 and CUDA). The float64 product is exact, so a single cast reproduces it; rounding
    # twice in float32 moves the weights by up to ~index * 2**-24 (1e-3 logit error at 1080p).
    src = ((np.arange(size_out, dtype=np.float64) + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    index0 = np.floor(src).astype(np.int64)
    index0 = np.minimum(index0, size_in - 1)
    index1 = np.minimum(index0 + 1, size_in - 1)
    weight1 = (src - index0).astype(np.float32)
    return index0, index1, weight1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes, numerically matching torch.nn.functional.interpolate
    (mode="bilinear", align_corners=False)."""
    x = np.asarray(x, dtype=np.float32)
    rows0, rows1, row_w = _bilinear_axis(x.shape[-2], height)
    cols0, cols1, col_w = _bilinear_axis(x.shape[-1], width)
    top = x[..., rows0, :]
    bottom = x[..., rows1, :]
    rows = top + (bottom - top) * row_w[:, None]
    left = rows[..., cols0]
    right = rows[..., cols1]
    return left + (right - left) * col_w


def opencv():
    """The cv2 module when OpenCV is installed (the `data` extra), else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def resize_bilinear_fast(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """resize_bilinear through OpenCV's float32 cv2.resize (INTER_LINEAR, the same half-pixel grid) when
    OpenCV is installed, else resize_bilinear itself. OpenCV derives source coordinates in its own float
    arithmetic, not torch's single rounding (see _bilinear_axis): measured within 2.4e-6 of resize_bilinear
    for 256 -> 1024 and within 4e-4 for resizes to photo sizes up to 4000x3000, below the parity gate's 1e-3
    logit tolerance; 20-50x faster on 2 cores (docs/benchmarks.md)."""
    cv2 = opencv()
    if cv2 is None:
        return resize_bilinear(x, height, width)
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(x.shape[:-2] + (height, width), np.float32)
    for index in np.ndindex(x.shape[:-2]):
        out[index] = cv2.resize(x[index], (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def postprocess_masks(low_res: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Low-res logits [..., 256, 256] -> logits at the original image size [..., H, W], in torch's arithmetic."""
    low_res = np.asarray(low_res, dtype=np.float32)
    out = np.empty(low_res.shape[:-2] + tuple(int(n) for n in geometry.original_size), np.float32)
    postprocess_into(low_res, geometry, out, exact=True)
    return out


# The final resize to the original size runs in row bands of about this many bytes of float temporaries,
# so a 12000x12000 photo costs its boolean masks plus one band, not several float copies of the image.
POSTPROCESS_BAND_BYTES = 64 * 2**20


def postprocess_into(low_res: np.ndarray, geometry: ImageGeometry, out: np.ndarray, band_bytes: int = POSTPROCESS_BAND_BYTES,
                     exact: bool = False) -> None:
    """Low-res logits [..., 256, 256] -> logits at the original image size (then binarize when `out` is bool),
    written into `out` [..., H, W] band by band: the one mask post-processing of the runtime, the parity gate
    and the mask generator.

    Numpy (without OpenCV, or `exact`): torch's bilinear arithmetic (resize_bilinear), bit-identical whatever
    the band size; postprocess_masks is this path. With OpenCV (opencv), `_postprocess_into_opencv`. Only the
    float temporaries of the final resize are limited to about `band_bytes` at a time."""
    if not exact and opencv() is not None:
        _postprocess_into_opencv(low_res, geometry, out, band_bytes)
        return
    frame = resize_bilinear(low_res, PROMPT_FRAME, PROMPT_FRAME)
    frame = frame[..., : geometry.input_size[0], : geometry.input_size[1]]
    height, width = geometry.original_size
    # Same index/weight tables resize_bilinear computes, so each band repeats its arithmetic exactly.
    rows0, rows1, row_weight = _bilinear_axis(frame.shape[-2], height)
    cols0, cols1, col_weight = _bilinear_axis(frame.shape[-1], width)
    bytes_per_row = 4 * 4 * width * max(1, int(np.prod(frame.shape[:-2])))  # left, right, result, slack (float32)
    band = max(1, band_bytes // bytes_per_row)
    for start in range(0, height, band):
        rows = slice(start, min(start + band, height))
        top = frame[..., rows0[rows], :]
        bottom = frame[..., rows1[rows], :]
        blended_rows = top + (bottom - top) * row_weight[rows, None]
        del top, bottom
        left = blended_rows[..., cols0]
        right = blended_rows[..., cols1]
        logits = left + (right - left) * col_weight
        out[..., rows, :] = logits if out.dtype != bool else binarize(logits)


def frame_crop_source(input_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the 256x256 low-res logits that the 1024 frame's crop [:h, :w] reads: bilinear x4 with
    half-pixel centres maps output n to source (n + 0.5) / 4 - 0.5, so the crop needs rows below ceil(h / 4) + 1."""
    scale = PROMPT_FRAME // LOW_RES_MASK_SIZE
    return tuple(min(LOW_RES_MASK_SIZE, -(-int(n) // scale) + 1) for n in input_size)


# |OpenCV path - numpy reference| of postprocess_into, relative to max(1, the mask's largest |low-res logit|): OpenCV
# rounds source coordinates in its own float arithmetic, so a weight moves by up to a few ulps of the coordinate.
# Measured at most 4e-5 over crop sizes from 1x300 to 4000x3000 and logits up to +-100; the bound is 25 times that.
FAST_UPSCALE_RELATIVE_ERROR = 1e-3


def fast_upscale_error_bound(low_res: np.ndarray) -> np.ndarray:
    """[...] float32: a bound on how far postprocess_into's OpenCV path strays from the exact numpy path, per mask
    of low-res logits [..., h, w] (zero when OpenCV is not installed, where both paths are the numpy one)."""
    if opencv() is None:
        return np.zeros(np.shape(low_res)[:-2], np.float32)
    largest = np.abs(np.asarray(low_res, np.float32)).max(axis=(-2, -1), initial=0.0)
    return (FAST_UPSCALE_RELATIVE_ERROR * np.maximum(largest, 1.0)).astype(np.float32)


def _postprocess_into_opencv(low_res: np.ndarray, geometry: ImageGeometry, out: np.ndarray, band_bytes: int) -> None:
    """postprocess_into with OpenCV, one mask at a time: cv2.resize of only the low-res rows and columns the
    crop reads (frame_crop_source) by the frame's factor of 4, so the crop comes out without the rest of the
    1024 frame, then cv2.resize of the crop's width only (its height kept, so OpenCV moves columns alone),
    then numpy's exact row blend in bands. Within fast_upscale_error_bound of the numpy reference; the band size
    never changes a value."""
    cv2 = opencv()
    new_h, new_w = geometry.input_size
    height, width = geometry.original_size
    source_h, source_w = frame_crop_source(geometry.input_size)
    scale = PROMPT_FRAME // LOW_RES_MASK_SIZE
    rows0, rows1, row_weight = _bilinear_axis(new_h, height)
    band = max(1, band_bytes // (2 * 4 * width))  # two float32 rows per output row
    low_res = np.asarray(low_res, dtype=np.float32)
    for index in np.ndindex(low_res.shape[:-2]):
        source = low_res[index][:source_h, :source_w]
        frame = cv2.resize(source, (source_w * scale, source_h * scale), interpolation=cv2.INTER_LINEAR)[:new_h, :new_w]
        # A bilinear resize to the same width moves no column (all weights 0): skip the copy.
        widened = frame if width == new_w else cv2.resize(frame, (width, new_h), interpolation=cv2.INTER_LINEAR)
        if height == new_h:  # a bilinear resize to the same height moves no row (all row weights are 0)
            if out.dtype == bool:
                np.greater(widened, MASK_THRESHOLD, out=out[index])
            else:
                out[index] = widened
            continue
        for start in range(0, height, band):
            rows = slice(start, min(start + band, height))
            logits = widened[rows1[rows]]
            top = widened[rows0[rows]]
            # top + (bottom - top) * weight, in place: the same float32 operations without temporaries
            np.subtract(logits, top, out=logits)
            np.multiply(logits, row_weight[rows, None], out=logits)
            np.add(logits, top, out=logits)
            out[index + (rows,)] = logits if out.dtype != bool else binarize(logits)


def binarize(logits: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    return np.asarray(logits) > threshold


def select_masks(masks: np.ndarray, iou_predictions: np.ndarray, multimask_output: bool):
    """PyTorch SAM's selection from the four tokens: tokens 1..3 when multimask, else token 0."""
    selection = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, selection], iou_predictions[:, selection]
