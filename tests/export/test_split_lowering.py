"""The split decoder through a recipe's decoder steps (pipeline/split_lowering.py): a step that
lowers or converts the decoder builds the halves too, parented to the lowered decoder and checked against it;
a step that cannot says so in the lowered decoder's facts; the Predictor runs a recipe-built pair only once
the folder's parity.json says it passed its decoder stage, and never pairs a lowered decoder with fp32 halves."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from evsam_export import contract
from evsam_export.manifest import read_manifest
from evsam_export.model.variants import get_variant
from evsam_export.parity.gate import ParityGate
from evsam_export.pipeline.recipe import build_settings
from evsam_export.pipeline.split_lowering import lower_split_pair
from evsam_export.progress import Reporter
from evsam_export.runtime import Predictor
from evsam_export.steps.step import StepContext
from evsam_export.targets import ort as ort_target

PAIR = "decoder_image+decoder_prompt.ort.fp32"


@pytest.fixture(scope="module")
def ort_folder(copy_export):
    """A copy of the l0 export with decoder.ort.fp32 and its lowered halves, as the cpu-ort-fp32 decoder step writes them."""
    folder = copy_export("lowered")
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant("l0"), reporter=Reporter(quiet=True), threads=2,
                      gating=ParityGate())
    settings = build_settings(ort_target.Settings, {}, "fp32")
    parent = manifest.artifact("decoder.onnx.fp32")
    built = list(ort_target.build(ctx, parent, settings))
    halves = lower_split_pair(ctx, ort_target, settings, parent, built)
    for artifact in built + halves:
        manifest.add(artifact)
    manifest.write(folder)
    return folder


def test_the_ort_step_builds_the_halves_beside_the_lowered_decoder(ort_folder):
    manifest = read_manifest(ort_folder)
    decoder = manifest.artifact("decoder.ort.fp32")
    image, prompt = manifest.artifact("decoder_image.ort.fp32"), manifest.artifact("decoder_prompt.ort.fp32")
    assert image.parent == prompt.parent == decoder.id
    assert decoder.facts["split_decoder"] == {"kept": True, "halves": [image.id, prompt.id]}
    check = prompt.facts["split_check"]
    assert check["against"] == decoder.id
    assert check["low_res_masks_max_abs"] <= check["tolerance"]["low_res_masks"]
    assert check["iou_predictions_max_abs"] <= check["tolerance"]["iou_predictions"]
    assert "[tolerances.fp32]" in check["tolerance"]["source"]


def _write_parity(folder, passed: bool) -> None:
    stages = [{"artifact": PAIR, "stage": "decoder", "precision": "fp32", "passed": passed}]
    (folder / "parity.json").write_text(json.dumps({"format": "evsam-export/parity", "stages": stages}))


def test_a_recipe_built_pair_runs_only_after_it_passed_its_gate(ort_folder):
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    box = [20, 30, 200, 180]
    (ort_folder / "parity.json").unlink(missing_ok=True)
    with Predictor(ort_folder, decoder="decoder.ort.fp32", threads=2) as ungated:
        assert ungated.info["split_decoder"] is None
        assert "no passing decoder stage" in ungated.info["split_decoder_choice"]
        ungated.set_image(image)
        single = ungated.predict(box=box)
    _write_parity(ort_folder, passed=False)
    with Predictor(ort_folder, decoder="decoder.ort.fp32", threads=2) as failed:
        assert failed.info["split_decoder"] is None
    _write_parity(ort_folder, passed=True)
    with Predictor(ort_folder, decoder="decoder.ort.fp32", threads=2) as gated:
        assert gated.info["split_decoder"] == ["decoder_image.ort.fp32", "decoder_prompt.ort.fp32"]
        assert "gated" in gated.info["split_decoder_choice"]
        gated.set_image(image)
        split = gated.predict(box=box)
    np.testing.assert_allclose(split.low_res_logits, single.low_res_logits, rtol=0, atol=1e-3)
    # The export's own pair belongs to decoder.onnx.fp32 only: never to the ORT decoder, never to a lowered one.
    with Predictor(ort_folder, decoder="decoder.onnx.fp32", threads=2) as exported:
        assert exported.info["split_decoder"] == ["decoder_image.onnx.fp32", "decoder_prompt.onnx.fp32"]


def test_a_step_that_cannot_lower_the_halves_says_so_and_builds_none(copy_export):
    folder = copy_export("unlowered")
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant("l0"), reporter=Reporter(quiet=True), gating=ParityGate())
    parent = manifest.artifact("decoder.onnx.fp32")
    lowered = replace(parent, id="decoder.tensorrt.fp16", target="tensorrt", precision="fp16", parent=parent.id, facts={})
    calls = []
    step = SimpleNamespace(__name__="evsam_export.targets.tensorrt", build=lambda *args: calls.append(args) or [])
    assert lower_split_pair(ctx, step, None, parent, [lowered]) == []
    assert calls == []  # no half was built
    assert lowered.facts["split_decoder"]["kept"] is False
    assert "does not build the split decoder at fp16" in lowered.facts["split_decoder"]["reason"]
    # A later step on that decoder (no halves beside it) carries the reason to what ships.
    shipped = replace(lowered, id="decoder.ort.fp16", target="ort", parent=lowered.id, facts={})
    assert lower_split_pair(ctx, ort_target, None, lowered, [shipped]) == []
    assert shipped.facts["split_decoder"] == lowered.facts["split_decoder"]
    assert {a.component for a in read_manifest(folder).artifacts} >= set(contract.SPLIT_DECODER)


@pytest.mark.builds
def test_the_openvino_fp16_step_builds_the_halves_and_they_match(copy_export):
    """OpenVINO IRs of the halves (fp16 storage), reported by their contract names (decoder_image's
    layer0_image_queries port also carries an internal tensor name) and equal to the fp16 single graph."""
    pytest.importorskip("openvino")
    from evsam_export.targets import openvino as openvino_target

    folder = copy_export("openvino-fp16")
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant("l0"), reporter=Reporter(quiet=True), threads=2,
                      gating=ParityGate())
    settings = build_settings(openvino_target.Settings, {"precision": "fp16"}, "fp16")
    parent = manifest.artifact("decoder.onnx.fp32")
    built = list(openvino_target.build(ctx, parent, settings))
    halves = lower_split_pair(ctx, openvino_target, settings, parent, built)
    assert [a.id for a in halves] == ["decoder_image.openvino.fp16", "decoder_prompt.openvino.fp16"]
    assert all(a.parent == "decoder.openvino.fp16" and (folder / a.extra_files[0]).is_file() for a in halves)
    check = halves[1].facts["split_check"]
    assert check["low_res_masks_max_abs"] <= check["tolerance"]["low_res_masks"]
