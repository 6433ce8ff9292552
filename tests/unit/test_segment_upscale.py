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
    # A ragged mask is upscaled whole (the runtime's fast upscale, its near-threshold pixels computed exactly):
    # every mask, whichever way it went, is the exact one.
    fast = upscale.above(low, window_max, window_min, processing.MASK_THRESHOLD)
    if size[0] * size[1] > 100:
        assert len(fast.dense) >= 1
    for which in range(len(low)):
        assert np.array_equal(fast.mask(which), full[which] > 0), which
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


@pytest.mark.parametrize("size", [(400, 600), (1, 300), (1500, 2000), (3000, 4000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_upscale_stays_well_inside_its_error_bound(size):
    """The generator trusts the fast upscale (OpenCV) for every pixel farther from a threshold than
    processing.fast_upscale_error_bound: on smooth, noisy and saturated logits of several scales it strays at
    most a tenth of that bound from the exact upscale."""
    rng = np.random.default_rng(size[0])
    geometry = processing.image_geometry(*size, 512)
    smooth = smooth_logits(rng, 3)[:2]
    low = np.concatenate([smooth, smooth * 12, rng.normal(0, 20, (1, 256, 256)), np.where(smooth[:1] > 0, 50.0, -50.0)])
    low = low.astype(np.float32)
    exact = processing.postprocess_masks(low, geometry)
    fast = np.empty_like(exact)
    processing.postprocess_into(low, geometry, fast)
    assert np.all(np.abs(fast - exact).max(axis=(1, 2)) <= processing.fast_upscale_error_bound(low) / 10)


def test_crop_upscale_without_opencv_is_the_same(monkeypatch):
    """Without OpenCV the window extremes and the masks upscaled whole take numpy's exact path: the same answers."""
    rng = np.random.default_rng(7)
    geometry = processing.image_geometry(400, 600, 512)
    upscale = amg.CropUpscale(geometry)
    used = upscale.axes[0]["used"], upscale.axes[1]["used"]
    low = np.ascontiguousarray(smooth_logits(rng, 5)[:, : used[0], : used[1]])
    with_opencv = upscale.extremes(low)
    above = upscale.above(low, *with_opencv, (1.0, -1.0))
    monkeypatch.setattr(processing, "opencv", lambda: None)
    without = upscale.extremes(low)
    assert all(np.array_equal(a, b) for a, b in zip(with_opencv, without))
    plain = upscale.above(low, *without, (1.0, -1.0))
    assert len(plain[0].dense) >= 1
    for ours, theirs in zip(above, plain):
        assert np.array_equal(ours.counts(), theirs.counts())
        assert all(np.array_equal(ours.mask(k), theirs.mask(k)) for k in range(len(low)))
