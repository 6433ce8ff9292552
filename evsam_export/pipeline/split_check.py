"""The export's check of the split decoder: the image half chained into the prompt half must give the single
graph's low-res outputs, with and without a mask prompt, within the parity gate's fp32 decoder-stage tolerances
(validators/default.toml: logit and IoU-score max abs diff). Measured differences are recorded in the prompt
half's manifest facts (`split_check`); a pair that misses is an export error, never a shipped artifact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.contract import ComponentSpec
from evsam_export.errors import ExportError

# Prompt sets x points of the checked calls: several of each, so broadcasting of a [1] image side is exercised.
CHECK_PROMPTS = (3, 4)


def split_check_cases(prompt_spec: ComponentSpec) -> dict[str, dict[str, np.ndarray]]:
    """Semantic decoder inputs of each checked call: no mask prompt, one mask for all prompt sets, one each."""
    static = isinstance(prompt_spec.prompt_batch, int)
    batch, points = (prompt_spec.prompt_batch, prompt_spec.input(contract.POINT_COORDS).shape[1]) if static else CHECK_PROMPTS
    feeds = contract.sample_feeds(contract.decoder_spec("tensorrt"), batch=batch, num_points=points, seed=5)
    base = {name: feeds[name] for name in (contract.IMAGE_EMBEDDINGS, contract.POINT_COORDS, contract.POINT_LABELS)}
    masks = feeds[contract.MASK_INPUT]
    cases = {
        "no mask prompt": {**base, contract.MASK_INPUT: masks[:1], contract.HAS_MASK_INPUT: np.zeros(1, np.float32)},
        "one mask for all prompt sets": {**base, contract.MASK_INPUT: masks[:1], contract.HAS_MASK_INPUT: np.ones(1, np.float32)},
    }
    if not static:
        cases["a mask per prompt set"] = {**base, contract.MASK_INPUT: masks, contract.HAS_MASK_INPUT: np.ones(batch, np.float32)}
    return cases


SPLIT_CHECK_OUTPUTS = (contract.LOW_RES_MASKS, contract.IOU_PREDICTIONS)


def single_graph_outputs(runner) -> Callable[[dict], dict[str, np.ndarray]]:
    """SPLIT_CHECK_OUTPUTS of a loaded single-graph decoder runner for one split_check_cases entry."""
    return lambda semantic: runner.infer(contract.decoder_feeds(runner, original_size=contract.SAMPLE_ORIGINAL_SIZE, **semantic),
                                         outputs=list(SPLIT_CHECK_OUTPUTS))


def split_pair_differences(run_single: Callable[[dict], dict[str, np.ndarray]], split, prompt_spec: ComponentSpec) -> dict[str, float]:
    """Max abs differences of the loaded split-pair runner `split` against the single graph (`run_single` of a
    split_check_cases entry) on split_check_cases (low_res_masks, iou_predictions)."""
    wanted = list(SPLIT_CHECK_OUTPUTS)
    worst = dict.fromkeys(wanted, 0.0)
    for semantic in split_check_cases(prompt_spec).values():
        # The case keys are the contract's tensor names, which are also decoder_feeds' argument names.
        expected = run_single(semantic)
        got = split.infer(contract.decoder_feeds(split, **semantic), outputs=wanted)
        for name in wanted:
            if got[name].shape != expected[name].shape:
                raise ExportError(f"split decoder: {name} shape {list(got[name].shape)} "
                                  f"!= the single graph's {list(expected[name].shape)}")
            difference = np.abs(got[name].astype(np.float32) - expected[name].astype(np.float32))
            worst[name] = max(worst[name], float(np.max(difference)))
    return worst


def split_check_limits(precision: str) -> tuple[dict[str, float], str]:
    """The default parity suite's decoder-stage limits for `precision` (logit and IoU-score max abs diff), and
    the table they come from: fp32's where that precision's table has none (it gates masks by IoU only), so
    a pair must match its own single graph as closely as an fp32 decoder matches PyTorch."""
    from evsam_export.parity.suites import load_suite

    suite = load_suite("default")
    for table in (precision, "fp32"):
        tolerance = suite.tolerance(table)
        limits = {contract.LOW_RES_MASKS: tolerance.decoder_logit_max_abs, contract.IOU_PREDICTIONS: tolerance.iou_pred_max_abs}
        if None not in limits.values():
            return limits, table
    raise ExportError("validators/default.toml has no fp32 decoder-stage logit and IoU-score limits")


def split_check_facts(against: str, prompt_spec: ComponentSpec, worst: dict[str, float], limits: dict[str, float], table: str) -> dict:
    return {
        "against": against,
        "cases": list(split_check_cases(prompt_spec)),
        "low_res_masks_max_abs": worst[contract.LOW_RES_MASKS],
        "iou_predictions_max_abs": worst[contract.IOU_PREDICTIONS],
        "tolerance": {"low_res_masks": limits[contract.LOW_RES_MASKS], "iou_predictions": limits[contract.IOU_PREDICTIONS],
                      "source": f"validators/default.toml [tolerances.{table}] decoder stage"},
    }


def split_check_misses(worst: dict[str, float], limits: dict[str, float]) -> list[str]:
    return [f"{name} differs by {worst[name]:.2e} (> {limits[name]:g})" for name in limits if not worst[name] <= limits[name]]


def check_split_pair(decoder_path: Path, decoder_spec: ComponentSpec, image_path: Path, image_spec: ComponentSpec,
                     prompt_path: Path, prompt_spec: ComponentSpec) -> dict:
    """Max abs differences of the split pair against the single graph on split_check_cases; raises ExportError
    beyond the fp32 decoder-stage gates of the default parity suite."""
    from evsam_export.runners.ort_runner import OrtRunner
    from evsam_export.runners.split_decoder import SplitDecoderRunner

    limits, table = split_check_limits("fp32")
    image, prompt, single = (OrtRunner(path, list(spec.inputs), list(spec.outputs), Path(path).name) for path, spec in
                             ((image_path, image_spec), (prompt_path, prompt_spec), (decoder_path, decoder_spec)))
    with single, SplitDecoderRunner(image, prompt) as split:
        worst = split_pair_differences(single_graph_outputs(single), split, prompt_spec)
    failed = split_check_misses(worst, limits)
    if failed:
        raise ExportError("split decoder does not match the single-graph decoder: " + "; ".join(failed),
                          hint="export with --no-split-decoder and report the difference")
    return split_check_facts(Path(decoder_path).name, prompt_spec, worst, limits, table)
