"""The export's check of the split decoder: the image half chained into the prompt half must give the single
graph's low-res outputs, with and without a mask prompt, within the parity gate's fp32 decoder-stage tolerances
(validators/default.toml: logit and IoU-score max abs diff). Measured differences are recorded in the prompt
half's manifest facts (`split_check`); a pair that misses is an export error, never a shipped artifact."""

from __future__ import annotations

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


def check_split_pair(decoder_path: Path, image_path: Path, image_spec: ComponentSpec, prompt_path: Path,
                     prompt_spec: ComponentSpec) -> dict:
    """Max abs differences of the split pair against the single graph on split_check_cases; raises ExportError
    beyond the fp32 decoder-stage gates of the default parity suite."""
    from evsam_export.parity.suites import load_suite
    from evsam_export.runners.ort_runner import OrtRunner
    from evsam_export.runners.split_decoder import SplitDecoderRunner

    tolerance = load_suite("default").tolerance("fp32")
    limits = {contract.LOW_RES_MASKS: tolerance.decoder_logit_max_abs, contract.IOU_PREDICTIONS: tolerance.iou_pred_max_abs}
    wanted = list(limits)
    image = OrtRunner(image_path, list(image_spec.inputs), list(image_spec.outputs), image_path.name)
    prompt = OrtRunner(prompt_path, list(prompt_spec.inputs), list(prompt_spec.outputs), prompt_path.name)
    worst = dict.fromkeys(wanted, 0.0)
    import onnxruntime as ort

    with SplitDecoderRunner(image, prompt) as split:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        single = ort.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])
        single_inputs = [i.name for i in single.get_inputs()]
        for semantic in split_check_cases(prompt_spec).values():
            # The case keys are the contract's tensor names, which are also decoder_feeds' argument names.
            expected = dict(zip(wanted, single.run(wanted, contract.decoder_feeds(
                single_inputs, original_size=contract.SAMPLE_ORIGINAL_SIZE, **semantic))))
            got = split.infer(contract.decoder_feeds(split, **semantic), outputs=wanted)
            for name in wanted:
                if got[name].shape != expected[name].shape:
                    raise ExportError(f"split decoder: {name} shape {list(got[name].shape)} "
                                      f"!= the single graph's {list(expected[name].shape)}")
                worst[name] = max(worst[name], float(np.max(np.abs(got[name] - expected[name]))))
    failed = [f"{name} differs by {worst[name]:.2e} (> {limits[name]:g})" for name in wanted if not worst[name] <= limits[name]]
    if failed:
        raise ExportError("split decoder does not match the single-graph decoder: " + "; ".join(failed),
                          hint="export with --no-split-decoder and report the difference")
    return {
        "against": Path(decoder_path).name,
        "cases": list(split_check_cases(prompt_spec)),
        "low_res_masks_max_abs": worst[contract.LOW_RES_MASKS],
        "iou_predictions_max_abs": worst[contract.IOU_PREDICTIONS],
        "tolerance": {"low_res_masks": limits[contract.LOW_RES_MASKS], "iou_predictions": limits[contract.IOU_PREDICTIONS],
                      "source": "validators/default.toml [tolerances.fp32] decoder stage"},
    }
