"""The automatic mask generator's crop-size logits from low-res logits (evsam_export.runtime.mask_generator
.CropUpscale): the counts, boxes and masks it decides from the low-res windows and the band along each outline
are bit for bit those of the full-size upscale, processing.postprocess_masks."""

from __future__ import annotations

import numpy as np
import pytest

from evsam_export.model import processing
from evsam_export.runtime import mask_generator as amg


def smooth_logits(rng, count: int, cells: int = 4) -> np.ndarray:
    """[count, 256, 256] float32 low-res logits with a few blobs each (smooth noise), then one of pixel noise and
    one all negative."""
    import cv2

    coarse = rng.normal(0, 1, size=(count, cells, cells)).astype(np.float32)
    logits = np.stack([cv2.resize(c, (256, 256), interpolation=cv2.INTER_CUBIC) * 8 for c in coarse])
    logits[-2] = rng.normal(0, 2, size=(256, 256))  # ragged: upscaled whole (DENSE_BAND_SHARE)
    logits[-1] = -3.0  # an empty mask
    return logits


CROP_SIZES = [(400, 600), (48, 64), (512, 512), (1030, 700), (7, 9), (1, 300), (300, 1), (1500, 2000)]


@pytest.mark.parametrize("size", CROP_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_crop_upscale_is_exact(size):
    """The generator's crop-size logits, pixel counts above a threshold, boxes and masks computed from the
    low-res logits (full-size values only in the band along each outline) are exactly those of the full-size
    upscale, processing.postprocess_masks: the stability and box decisions are the full-size ones."""
    rng = np.random.default_rng(sum(size))
    geometry = processing.image_geometry(*size, 512)
    upscale = amg.CropUpscale(geometry)
    low = smooth_logits(rng, 6)
    full = processing.postprocess_masks(low, geometry)
    assert np.array_equal(upscale.values(low), full)
    rows, cols = rng.integers(0, size[0], 9), rng.integers(0, size[1], 9)
    assert np.array_equal(upscale.values(low, rows, cols), full[:, rows][:, :, cols])
    index = rng.integers(0, len(low), 50)
    pixel_rows, pixel_cols = rng.integers(0, size[0], 50), rng.integers(0, size[1], 50)
    assert np.array_equal(upscale.pixel_values(low, index, pixel_rows, pixel_cols), full[index, pixel_rows, pixel_cols])
    used = upscale.axes[0]["used"], upscale.axes[1]["used"]
    low = np.ascontiguousarray(low[:, : used[0], : used[1]])  # what the generator keeps
    window_max, window_min = upscale.extremes(low)
    # A ragged mask goes through the runtime's fast upscale (OpenCV): within 4e-4 of the exact logits.
    fast = upscale.above(low, window_max, window_min, processing.MASK_THRESHOLD)
    if size[0] * size[1] > 100:
        assert len(fast.dense) >= 1
    for which in range(len(low)):
        differ = fast.mask(which) != (full[which] > 0)
        assert which in fast.dense or not differ.any()
        assert np.all(np.abs(full[which][differ]) < 4e-4)
    upscale.exact_dense = True  # from here on bit-exact for every mask
    for threshold in (1.0, 0.0, -1.0, 0.1):
        above = upscale.above(low, window_max, window_min, threshold)
        exact = np.count_nonzero(full > np.float32(threshold), axis=(1, 2))
        assert np.array_equal(above.counts(), exact), threshold
        most, least = upscale.count_bounds(window_max, window_min, threshold)
        assert np.all(least <= exact) and np.all(exact <= most), threshold
    binary = upscale.above(low, window_max, window_min, processing.MASK_THRESHOLD)
    assert np.array_equal(binary.boxes(), amg.mask_boxes(full > 0))
    for which in range(len(low)):
        assert np.array_equal(binary.mask(which), full[which] > 0)
    # Most pixels are decided by their window alone: only a band along the outlines is computed.
    assert len(binary.index) < 0.5 * np.count_nonzero(full > 0) + 50
