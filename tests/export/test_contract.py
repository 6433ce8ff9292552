"""The one IO contract (evsam_export.contract): a fresh export's manifest records exactly the contract's
specs, feeds built from semantic inputs satisfy every profile's inputs (runners.base.check_feeds), and the
parity gate's and the fp16 smoke check's feeds are what the contract builds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from folders import linked_copy

from evsam_export import contract
from evsam_export.errors import ArtifactError, UsageError
from evsam_export.manifest import read_manifest
from evsam_export.model import processing
from evsam_export.model.variants import VARIANTS
from evsam_export.runners.base import check_feeds
from evsam_export.runtime import Predictor

PROFILES = [(profile, single) for profile in contract.DECODER_PROFILES for single in (False, True)]


def semantic_decoder_inputs(prompt_sets: int = 2, mask_prompts: int | None = None) -> dict:
    """Embeddings, prompt tokens laid out by processing.build_prompt_tokens, an optional mask prompt and
    the original image size: what a caller of contract.decoder_feeds holds."""
    rng = np.random.default_rng(4)
    _, geometry = processing.preprocess_image(np.zeros((300, 400, 3), np.uint8), 512)
    boxes = np.array([[10.0, 20.0, 200.0, 150.0], [50.0, 60.0, 390.0, 290.0]])[:prompt_sets]
    tokens = processing.build_prompt_tokens(geometry, np.array([[100.0, 90.0]]), np.array([1.0]), boxes)
    inputs = {
        "image_embeddings": rng.standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32),
        "point_coords": tokens.point_coords,
        "point_labels": tokens.point_labels,
        "original_size": geometry.original_size,
    }
    if mask_prompts:
        inputs["mask_input"] = rng.standard_normal((mask_prompts, 1, 256, 256)).astype(np.float32)
    return inputs


# ------------------------------------------------------------------------------------------ manifest IO


def test_fresh_export_records_the_contract(l0_export):
    manifest = read_manifest(l0_export)
    variant = VARIANTS[manifest.variant]
    profile = manifest.model["decoder_profile"]
    expected = {"encoder": contract.encoder_spec(variant), "decoder": contract.decoder_spec(profile),
                contract.DECODER_IMAGE: contract.decoder_image_spec(), contract.DECODER_PROMPT: contract.decoder_prompt_spec()}
    assert sorted(a.component for a in manifest.artifacts) == ["decoder", "decoder_image", "decoder_prompt", "encoder"]
    for artifact in manifest.artifacts:
        spec = expected[artifact.component]
        assert artifact.inputs == list(spec.inputs), artifact.id
        assert artifact.outputs == list(spec.outputs), artifact.id
        assert artifact.settings["dynamic_axes"] == {
            name: {str(axis): dim for axis, dim in axes.items()} for name, axes in spec.dynamic_axes().items()
        }
        assert contract.artifact_spec(artifact) == spec, artifact.id
        assert not contract.missing_io(contract.artifact_spec(artifact))
    assert manifest.model["mask_selection"] == contract.mask_selection(False)
    labels = manifest.model["prompt_rules"]["labels"]
    assert {float(label) for label in labels} == set(contract.POINT_LABEL_MEANINGS)
    assert labels["-1"] == "padding" and labels["2"] == "box top-left" and labels["3"] == "box bottom-right"


def test_artifact_spec_reads_profile_and_single_mask_from_io():
    for profile, single in PROFILES:
        spec = contract.decoder_spec(profile, single)
        as_recorded = type("Artifact", (), {"component": "decoder", "inputs": list(spec.inputs), "outputs": list(spec.outputs)})
        assert contract.artifact_spec(as_recorded) == spec
        assert spec.mask_tokens == (1 if single else 4)
        assert contract.decoder_profile_of(spec.input_names) == profile
    assert contract.SAM_PROFILE_INPUTS == ("orig_im_size",)
    tensorrt = contract.decoder_spec("tensorrt")
    assert "masks" not in tensorrt.output_names and "orig_im_size" not in tensorrt.input_names
    assert contract.decoder_spec("sam").output_names[0] == "masks"
    static = contract.decoder_spec("tensorrt", dynamic_prompts=False)
    assert static.prompt_batch == 1 and contract.decoder_spec().prompt_batch == "num_prompts"
    crippled = contract.ComponentSpec("decoder", tensorrt.inputs[:-1], tensorrt.outputs[:1])
    assert contract.missing_io(crippled) == ["has_mask_input", "low_res_masks"]


# ------------------------------------------------------------------------------------------------ feeds


@pytest.mark.parametrize("profile, single", PROFILES)
@pytest.mark.parametrize("mask_prompts", [None, 1, 2])
def test_decoder_feeds_satisfy_every_profile(profile, single, mask_prompts):
    spec = contract.decoder_spec(profile, single)
    feeds = contract.decoder_feeds(spec, **semantic_decoder_inputs(2, mask_prompts))
    assert list(feeds) == spec.input_names
    checked = check_feeds(list(spec.inputs), feeds, f"decoder:{profile}")
    assert checked["has_mask_input"].tolist() == ([0.0] if mask_prompts is None else [1.0] * mask_prompts)
    assert checked["mask_input"].shape == (mask_prompts or 1, 1, 256, 256)
    if profile == "sam":
        assert checked["orig_im_size"].tolist() == [300.0, 400.0] and checked["orig_im_size"].dtype == np.float32


def test_decoder_feeds_follow_the_inputs_they_are_given():
    semantic = semantic_decoder_inputs(1)
    sam = contract.decoder_spec("sam")
    by_names = contract.decoder_feeds(sam.input_names, **semantic)
    by_specs = contract.decoder_feeds(list(sam.inputs), **semantic)
    assert list(by_names) == list(by_specs) == sam.input_names
    # Without the image size a `sam` graph's feed is incomplete, and check_feeds says which input is missing.
    without_size = contract.decoder_feeds(sam, **dict(semantic, original_size=None))
    with pytest.raises(UsageError, match=r"missing \['orig_im_size'\]"):
        check_feeds(list(sam.inputs), without_size, "decoder:sam")
    with pytest.raises(ValueError, match="has_mask_input given without mask_input"):
        contract.decoder_feeds(sam, **dict(semantic, has_mask_input=np.ones(1, np.float32)))


@pytest.mark.parametrize("component", ["encoder", "decoder"])
@pytest.mark.parametrize("profile", contract.DECODER_PROFILES)
def test_sample_feeds_satisfy_their_spec(component, profile):
    spec = contract.encoder_spec(VARIANTS["xl0"]) if component == "encoder" else contract.decoder_spec(profile)
    for batch, points in ((1, 2), (3, 5)):
        feeds = contract.sample_feeds(spec, batch=batch, num_points=points, seed=7)
        assert list(feeds) == spec.input_names
        check_feeds(list(spec.inputs), feeds, spec.component)
        again = contract.sample_feeds(spec, batch=batch, num_points=points, seed=7)
        assert all(np.array_equal(feeds[name], again[name]) for name in feeds)


def test_exported_decoder_runs_on_contract_feeds(l0_export):
    from evsam_export.runners import availability_of, runner_for_artifact

    if not availability_of("onnxruntime").available:
        pytest.skip("onnxruntime unavailable here")
    artifact = read_manifest(l0_export).artifact("decoder.onnx.fp32")
    with runner_for_artifact(l0_export, artifact, threads=1) as runner:
        outputs = runner.infer(contract.decoder_feeds(runner, **semantic_decoder_inputs(2, 1)))
    assert outputs["low_res_masks"].shape == (2, 4, 256, 256) and outputs["iou_predictions"].shape == (2, 4)
    assert outputs["masks"].shape == (2, 4, 300, 400)


# ---------------------------------------------------- the parity gate's and the fp16 check's feeds


def test_parity_and_fp16_smoke_feeds_are_the_contracts(l0_export):
    from evsam_export.parity.reference import Case, decoder_feeds
    from evsam_export.precision.fp16 import smoke_feeds

    manifest = read_manifest(l0_export)
    decoder = manifest.artifact("decoder.onnx.fp32")
    semantic = semantic_decoder_inputs(1, 1)
    _, geometry = processing.preprocess_image(np.zeros((300, 400, 3), np.uint8), 512)
    case = Case(image=None, kind="box", prompts=None, geometry=geometry, point_coords=semantic["point_coords"],
                point_labels=semantic["point_labels"], mask_input=semantic["mask_input"], has_mask_input=np.ones(1, np.float32))
    for inputs in (decoder.inputs, list(contract.decoder_spec("tensorrt").inputs)):
        theirs = decoder_feeds(case, semantic["image_embeddings"], inputs)
        ours = contract.decoder_feeds(inputs, semantic["image_embeddings"], case.point_coords, case.point_labels,
                                      case.mask_input, case.has_mask_input, original_size=case.geometry.original_size)
        assert list(theirs) == list(ours)
        assert all(np.array_equal(theirs[k], ours[k]) and theirs[k].dtype == ours[k].dtype for k in theirs)

    smoke = smoke_feeds(decoder, VARIANTS["l0"])
    rng = np.random.default_rng(0)
    ours = contract.decoder_feeds(decoder, rng.standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32),
                                  np.array([[[400.0, 300.0], [0.0, 0.0]]], np.float32),
                                  np.array([[contract.LABEL_FOREGROUND, contract.LABEL_PADDING]], np.float32),
                                  original_size=(480, 640))
    assert list(smoke) == list(ours) and all(np.array_equal(smoke[k], ours[k]) and smoke[k].dtype == ours[k].dtype for k in smoke)


def test_contract_imports_neither_torch_nor_onnx():
    code = ("import sys; import evsam_export.contract, evsam_export.manifest, evsam_export.runtime; "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'openvino') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("component, tensor, needle", [
    ("encoder", "input_image", "not an evsam-export encoder"),
    ("decoder", "has_mask_input", "not an evsam-export decoder"),
])
def test_predictor_refuses_a_manifest_that_breaks_the_contract(l0_export, tmp_path, component, tensor, needle):
    linked_copy(l0_export, tmp_path)
    manifest = json.loads((l0_export / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["component"] == component)
    next(t for t in artifact["inputs"] if t["name"] == tensor)["name"] = "renamed"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=needle):
        Predictor(tmp_path)
