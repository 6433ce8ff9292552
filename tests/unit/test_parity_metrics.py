"""Parity metrics on hand-made arrays whose answers are known in closed form."""

import dataclasses
import math

import numpy as np
import pytest

from evsam_export import metrics


def square(top: int, left: int, size: int = 2, shape=(6, 6)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_iou_of_two_squares_sharing_one_pixel_is_one_seventh():
    # 4 + 4 pixels, 1 shared: union 7.
    assert metrics.mask_iou(square(0, 0), square(1, 1)) == pytest.approx(1 / 7)


def test_iou_identical_disjoint_and_empty():
    assert metrics.mask_iou(square(0, 0), square(0, 0)) == 1.0
    assert metrics.mask_iou(square(0, 0), square(3, 3)) == 0.0
    empty = np.zeros((6, 6), dtype=bool)
    assert metrics.mask_iou(empty, empty) == 1.0
    assert metrics.mask_iou(empty, square(0, 0)) == 0.0


def test_iou_reduces_over_last_two_axes_only():
    a = np.stack([square(0, 0), square(0, 0), np.zeros((6, 6), bool)])[None]  # [1, 3, H, W]
    b = np.stack([square(1, 1), square(0, 0), np.zeros((6, 6), bool)])[None]
    iou = metrics.mask_iou(a, b)
    assert iou.shape == (1, 3)
    np.testing.assert_allclose(iou, [[1 / 7, 1.0, 1.0]])


def test_iou_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def test_stable_iou_ignores_low_margin_pixels():
    ref = np.array([[5.0, 5.0, -5.0, 0.01]])
    test = np.array([[5.0, 5.0, -5.0, -0.01]])  # only the near-zero pixel flips
    assert metrics.mask_iou(ref > 0, test > 0) == pytest.approx(2 / 3)
    assert metrics.stable_mask_iou(ref, test, margin=0.1) == 1.0
    # A confident pixel that flips still counts.
    test_confident_flip = np.array([[5.0, -5.0, -5.0, 0.01]])
    assert metrics.stable_mask_iou(ref, test_confident_flip, margin=0.1) == pytest.approx(1 / 2)


def test_stable_iou_without_stable_pixels_is_one():
    ref = np.full((1, 3, 3), 0.01)
    test = -ref
    np.testing.assert_array_equal(metrics.stable_mask_iou(ref, test, margin=1.0), [1.0])


def test_snr_of_known_noise_power_is_exact():
    ref = np.array([3.0, -3.0, 3.0, -3.0])  # power 36
    noise = np.array([0.3, 0.3, -0.3, -0.3])  # power 0.36: ratio 100 -> 20 dB
    assert metrics.snr_db(ref, ref + noise) == pytest.approx(20.0)
    assert metrics.snr_db(ref, ref) == math.inf
    assert metrics.snr_db(np.zeros(4), noise) == -math.inf


def test_cosine_orthogonal_scaled_and_zero():
    assert metrics.cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert metrics.cosine([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert metrics.cosine([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(-1.0)
    assert metrics.cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert metrics.cosine(np.zeros(3), np.ones(3)) == 0.0


def test_abs_and_relative_errors():
    ref = np.array([[3.0, 4.0]])
    test = np.array([[3.0, 5.0]])
    assert metrics.max_abs_diff(ref, test) == 1.0
    assert metrics.mean_abs_diff(ref, test) == 0.5
    assert metrics.relative_l2(ref, test) == pytest.approx(1 / 5)
    assert metrics.relative_l2(ref, ref) == 0.0


def test_nonfinite_counts_nan_and_both_infinities():
    values = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], dtype=np.float16)
    assert metrics.nonfinite_count(values) == 3
    assert metrics.nonfinite_count(np.arange(4)) == 0


def test_summarize_statistics_and_p5():
    summary = metrics.summarize(np.arange(101, dtype=float))  # 0..100: p5 is 5 exactly
    assert (summary.mean, summary.min, summary.p5, summary.median, summary.max, summary.count) == (
        50.0, 0.0, 5.0, 50.0, 100.0, 101)


def test_summarize_empty_fails_gates_and_serialises_as_none():
    summary = metrics.summarize([])
    assert summary.count == 0
    assert not summary.mean >= 0.0  # NaN: a gate on no evidence fails
    assert summary.as_dict() == {"mean": None, "min": None, "p5": None, "median": None, "max": None, "count": 0}


def test_compare_tensors_bundles_every_metric():
    ref = np.array([3.0, -3.0, 3.0, -3.0], dtype=np.float32)
    test = ref + np.array([0.3, 0.3, -0.3, -0.3], dtype=np.float32)
    result = metrics.compare_tensors(ref, test)
    assert result.max_abs == pytest.approx(0.3)
    assert result.mean_abs == pytest.approx(0.3)
    assert result.snr_db == pytest.approx(20.0, abs=1e-5)
    assert result.relative_l2 == pytest.approx(0.1, rel=1e-5)
    assert result.cosine == pytest.approx(1 / math.sqrt(1.01), rel=1e-6)  # uncorrelated error
    assert result.nonfinite == 0
    exact = metrics.compare_tensors(ref, ref)
    assert exact.as_dict()["snr_db"] == "inf"
    with pytest.raises(dataclasses.FrozenInstanceError):
        exact.max_abs = 1.0


def test_compare_tensors_counts_nonfinite_in_test_output():
    ref = np.ones(4)
    test = np.array([1.0, np.nan, np.inf, 1.0])
    assert metrics.compare_tensors(ref, test).nonfinite == 2


def test_metrics_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, evsam_export.metrics, evsam_export.parity.suites, evsam_export.data.scenes; " \
           "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_in_graph_upscale_agreement_ignores_rounding_at_the_threshold_only():
    from evsam_export.parity.compare import in_graph_upscale_agreement

    host = np.full((1, 1, 8, 8), -9.0, np.float32)
    host[..., 2:4, 2:4] = 9.0
    host[..., 4, 2] = 1e-7  # a boundary pixel on the threshold: two correct Resize kernels may disagree on its sign
    graph = host.copy()
    graph[..., 4, 2] = -1e-7
    assert in_graph_upscale_agreement(host, graph) == 1.0
    graph[..., 3, 3] = -9.0  # a confident pixel that changed: a real disagreement
    assert in_graph_upscale_agreement(host, graph) == 0.75
