"""Pure numpy comparison metrics for parity reports. No torch, no runtime: every function takes arrays and
returns numbers (or a small frozen dataclass), so a machine without torch can compare saved outputs.

Conventions: `ref` is the PyTorch fp32 reference, `test` the artifact under test. Reductions run in float64
so the metric itself adds no error. Masks are thresholded like the shared post-processing (logit > 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from evsam_export.model.processing import MASK_THRESHOLD


def _as_float64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _json_number(value):
    """JSON has no NaN/Infinity: NaN (no data) -> None, +-inf (exact match, or zero reference) -> "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _check_same_shape(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {test.shape}")


def _iou_last_two_axes(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    if valid is not None:
        a, b = a & valid, b & valid
    intersection = np.count_nonzero(a & b, axis=(-2, -1))
    union = np.count_nonzero(a | b, axis=(-2, -1))
    # IoU(empty, empty) = 1 (docs/design.md "IoU of two empty masks"): two runtimes agreeing on "no mask" agree perfectly.
    safe_union = np.maximum(union, 1)
    return np.where(union == 0, 1.0, intersection / safe_union).astype(np.float64)


def mask_iou(a, b) -> np.ndarray:
    """IoU of boolean masks over their last two axes, one value per mask ([...] for inputs [..., H, W]).
    IoU(empty, empty) is 1.0."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_same_shape(a, b)
    if a.ndim < 2:
        raise ValueError(f"masks need at least two axes (H, W), got shape {a.shape}")
    return _iou_last_two_axes(a, b)


def stable_mask_iou(ref_logits, test_logits, margin: float) -> np.ndarray:
    """Mask IoU counted only over pixels where the reference is confident (|ref_logit| > margin).

    Near-zero reference logits flip sign under any rounding, which says nothing about the artifact; with
    random weights most logits are small, so plain IoU would be noise. One value per mask; a mask with no
    stable pixel (or no stable foreground on either side) scores 1.0."""
    ref, test = _as_float64(ref_logits), _as_float64(test_logits)
    _check_same_shape(ref, test)
    if ref.ndim < 2:
        raise ValueError(f"logits need at least two axes (H, W), got shape {ref.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    stable = np.abs(ref) > margin
    return _iou_last_two_axes(ref > MASK_THRESHOLD, test > MASK_THRESHOLD, valid=stable)


def max_abs_diff(ref, test) -> float:
    """Largest |ref - test| (0.0 for empty arrays)."""
    ref, test = _as_float64(ref), _as_float64(test)
    _check_same_shape(ref, test)
    return float(np.max(np.abs(ref - test))) if ref.size else 0.0


def mean_abs_diff(ref, test) -> float:
    """Mean |ref - test| (0.0 for empty arrays)."""
    ref, test = _as_float64(ref), _as_float64(test)
    _check_same_shape(ref, test)
    return float(np.mean(np.abs(ref - test))) if ref.size else 0.0


def snr_db(ref, test) -> float:
    """Signal-to-noise ratio 10*log10(sum(ref^2) / sum((ref - test)^2)) in dB; +inf when identical,
    -inf when the reference is all zeros and the test is not."""
    ref, test = _as_float64(ref), _as_float64(test)
    _check_same_shape(ref, test)
    noise = float(np.sum((ref - test) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(ref, test) -> float:
    """Cosine similarity of the flattened arrays. Two all-zero arrays score 1.0; one all-zero array 0.0."""
    ref, test = _as_float64(ref).ravel(), _as_float64(test).ravel()
    _check_same_shape(ref, test)
    ref_norm, test_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(test))
    if ref_norm == 0.0 and test_norm == 0.0:
        return 1.0
    if ref_norm == 0.0 or test_norm == 0.0:
        return 0.0
    return float(np.dot(ref, test) / (ref_norm * test_norm))


def relative_l2(ref, test) -> float:
    """||ref - test|| / ||ref||; 0.0 when identical, +inf when the reference is all zeros and the test not."""
    ref, test = _as_float64(ref), _as_float64(test)
    _check_same_shape(ref, test)
    error = float(np.linalg.norm((ref - test).ravel()))
    reference = float(np.linalg.norm(ref.ravel()))
    if error == 0.0:
        return 0.0
    return math.inf if reference == 0.0 else error / reference


def nonfinite_count(array) -> int:
    """Number of NaN or +-Inf elements (0 for integer and boolean arrays)."""
    values = np.asarray(array)
    if not np.issubdtype(values.dtype, np.inexact):
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


@dataclass(frozen=True)
class Summary:
    """Distribution of a per-sample metric. With count == 0 every statistic is NaN, so any `>=` gate
    fails rather than passing on no evidence; `as_dict()` writes them as None for JSON."""

    mean: float
    min: float
    p5: float
    median: float
    max: float
    count: int

    def as_dict(self) -> dict:
        return {key: _json_number(value) for key, value in asdict(self).items()}


def summarize(values) -> Summary:
    """Mean, min, 5th percentile (numpy's linear interpolation), median, max and count of `values`
    (any shape, flattened). The 5th percentile is what fp16/int8 gates use: one 30-pixel mask can lose
    0.2 IoU from three boundary pixels, so the minimum alone is too noisy (docs/design.md "Percentile, not minimum")."""
    flat = _as_float64(values).ravel()
    if flat.size == 0:
        nan = math.nan
        return Summary(mean=nan, min=nan, p5=nan, median=nan, max=nan, count=0)
    return Summary(
        mean=float(np.mean(flat)),
        min=float(np.min(flat)),
        p5=float(np.percentile(flat, 5)),
        median=float(np.median(flat)),
        max=float(np.max(flat)),
        count=int(flat.size),
    )


@dataclass(frozen=True)
class TensorComparison:
    """Element-wise agreement of one output (embeddings, logits, IoU predictions) with the reference.
    `nonfinite` counts NaN/Inf in the test output: a hard gate of its own (Polygraphy keeps it separate)."""

    max_abs: float
    mean_abs: float
    cosine: float
    snr_db: float
    relative_l2: float
    nonfinite: int

    def as_dict(self) -> dict:
        return {key: _json_number(value) for key, value in asdict(self).items()}


def compare_tensors(ref, test) -> TensorComparison:
    """All tensor metrics of `test` against `ref` (same shape), computed in float64."""
    ref, test = _as_float64(ref), _as_float64(test)
    _check_same_shape(ref, test)
    return TensorComparison(
        max_abs=max_abs_diff(ref, test),
        mean_abs=mean_abs_diff(ref, test),
        cosine=cosine(ref, test),
        snr_db=snr_db(ref, test),
        relative_l2=relative_l2(ref, test),
        nonfinite=nonfinite_count(test),
    )
