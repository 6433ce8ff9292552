"""OpenVINO target (evsam_export.targets.openvino) and runner: IR parity with the ONNX it came from, the f32
compile precision, NNCF INT8 structure and fallback bookkeeping, and the shared Runner contract.

One L0 export (synthetic:0) per module; INT8 calibrates on 4 images. The build-time gate of INT8 is stubbed
(round 0 fails, round 1 passes) so the fallback rounds are exercised without gating twice; the fp16 IRs go
through the real ctx.gate() on a one-image suite with the shipped tolerances.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from evsam_export.data.scenes import synthetic_scene  # noqa: E402
from evsam_export.environment import cpu_flags  # noqa: E402
from evsam_export.errors import RecipeError, UsageError  # noqa: E402
from evsam_export.export.onnx_export import decoder_spec, sample_feeds  # noqa: E402
from evsam_export.files import sha256_file  # noqa: E402
from evsam_export.manifest import read_manifest  # noqa: E402
from evsam_export.metrics import compare_tensors  # noqa: E402
from evsam_export.model.processing import preprocess_image  # noqa: E402
from evsam_export.model.variants import get_variant  # noqa: E402
from evsam_export.parity.gate import ParityGate  # noqa: E402
from evsam_export.precision import nncf_int8  # noqa: E402
from evsam_export.progress import Reporter  # noqa: E402
from evsam_export.runners.openvino_runner import OpenVINORunner  # noqa: E402
from evsam_export.runners.ort_runner import OrtRunner  # noqa: E402
from evsam_export.steps import fallback  # noqa: E402
from evsam_export.steps.step import StepContext  # noqa: E402
from evsam_export.targets import openvino as target  # noqa: E402

# One small scene, two prompt kinds, the shipped default tolerances (as tests/export/test_validate.py does).

F32 = ("f32", str(ov.Type.f32))  # the runner's actual_precision() returns str(ov.Type): "<Type: 'float32'>"


@pytest.fixture(scope="module")
def ctx(copy_export, gate_suite) -> StepContext:
    folder = copy_export("openvino")
    return StepContext(folder=folder, manifest=read_manifest(folder), variant=get_variant("l0"),
                       reporter=Reporter(quiet=True), suite=str(gate_suite), threads=2, gating=ParityGate())


@pytest.fixture(scope="module")
def built(ctx) -> dict:
    """fp32 and fp16 IRs of both components, added to the context's manifest."""
    artifacts = {}
    for component in ("encoder", "decoder"):
        parent = ctx.manifest.artifact(f"{component}.onnx.fp32")
        for precision in ("fp32", "fp16"):
            (artifact,) = target.build(ctx, parent, target.Settings(precision=precision))
            ctx.manifest.add(artifact)
            artifacts[artifact.id] = artifact
    return artifacts


@pytest.fixture(scope="module")
def int8(ctx, module_cache_dir):
    """Encoder INT8 with fallback on and a stub gate: round 0 (base scope) fails, round 1 passes."""
    pytest.importorskip("nncf")
    rounds = []

    def stub_gate(_ctx, artifact, suite=fallback.GATE_SUITE):
        rounds.append(artifact.facts["ignored_scope"]["fallback_groups"])
        return fallback.Verdict(passed=len(rounds) > 1, failed=[] if len(rounds) > 1 else [
            {"stage": "encoder", "kind": "all", "metric": "embedding_snr_db.min", "value": 3.0, "threshold": 10.0, "op": ">="}])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fallback, "gate_candidate", stub_gate)
        settings = target.Settings(precision="int8", calibration_images=4, min_speedup=0,  # (timing: tests/builds/test_int8_gain.py)
                                   fallback_method="widen")
        (artifact,) = target.build(ctx, ctx.manifest.artifact("encoder.onnx.fp32"), settings)
    return artifact, rounds


def runner(ctx, artifact, **kwargs) -> OpenVINORunner:
    return OpenVINORunner(ctx.path_of(artifact), artifact.inputs, artifact.outputs, precision=artifact.precision, threads=2, **kwargs)


def scene_input(seed: int = 7) -> np.ndarray:
    """A preprocessed scene that is neither a calibration image nor a suite image."""
    return preprocess_image(synthetic_scene(seed, 300, 500).rgb, 512)[0]


def onnx_outputs(ctx, component: str, feeds: dict) -> dict:
    artifact = ctx.manifest.artifact(f"{component}.onnx.fp32")
    with OrtRunner(ctx.path_of(artifact), artifact.inputs, artifact.outputs, threads=2) as ort_runner:
        return ort_runner.infer(feeds)


def embedding_snr(ctx, artifact, image: np.ndarray) -> float:
    reference = onnx_outputs(ctx, "encoder", {"input_image": image})["image_embeddings"]
    with runner(ctx, artifact) as ov_runner:
        return compare_tensors(reference, ov_runner.infer({"input_image": image})["image_embeddings"]).snr_db


# ------------------------------------------------------------------------------------------ IR files


def test_ir_files_and_manifest_entries(ctx, built):
    for artifact_id, artifact in built.items():
        component, _, precision = artifact_id.split(".")
        assert artifact.path == f"{component}.openvino.{precision}.xml"
        assert artifact.extra_files == [f"{component}.openvino.{precision}.bin"]
        assert artifact.sha256 == sha256_file(ctx.path_of(artifact))
        assert artifact.parent == f"{component}.onnx.fp32"
        assert artifact.settings["inference_precision"] == "f32"
        assert artifact.facts["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert artifact.facts["compiled_inference_precision"] == "f32"
        assert artifact.facts["fake_quantize"] == 0
    # fp16 compression halves the weights file; fp32 keeps 4 bytes per weight (save_model's default would not)
    for component in ("encoder", "decoder"):
        fp32 = built[f"{component}.openvino.fp32"].facts["ir_bytes"]["bin"]
        fp16 = built[f"{component}.openvino.fp16"].facts["ir_bytes"]["bin"]
        assert 0.45 < fp16 / fp32 < 0.55
        # The CPU plugin computes the fp16 IR in f32 (its weights widened on load): its census says so.
        counted = built[f"{component}.openvino.fp16"].facts["lowered"]
        assert counted["precision"] == "fp16" and counted["lowered"] == 0 and counted["total"] > 0
        assert counted["text"].endswith("fp16 (computed in f32 on this CPU)")
    # the dynamic batch of the ONNX survives conversion
    model = ov.Core().read_model(str(ctx.path_of(built["encoder.openvino.fp32"])))
    assert model.input(0).get_partial_shape()[0].is_dynamic


def test_fp32_encoder_ir_equals_onnx(ctx, built):
    assert embedding_snr(ctx, built["encoder.openvino.fp32"], scene_input()) >= 60.0


def test_fp32_decoder_ir_equals_onnx(ctx, built):
    artifact = built["decoder.openvino.fp32"]
    spec = decoder_spec()
    with runner(ctx, artifact) as ov_runner:
        for batch, points in ((1, 2), (3, 5)):  # two dynamic shapes: nothing was baked in
            feeds = sample_feeds(spec, batch=batch, num_points=points, seed=5)
            reference = onnx_outputs(ctx, "decoder", feeds)
            outputs = ov_runner.infer(feeds)
            for name in ("iou_predictions", "low_res_masks"):
                assert outputs[name].shape == reference[name].shape
                assert compare_tensors(reference[name], outputs[name]).snr_db >= 60.0, name
            assert outputs["masks"].shape == reference["masks"].shape
            assert np.mean((outputs["masks"] > 0) == (reference["masks"] > 0)) > 0.999


def test_fp32_ir_computes_in_f32_and_no_hint_would_not(ctx, built):
    artifact = built["encoder.openvino.fp32"]
    with runner(ctx, artifact) as ov_runner:
        assert ov_runner.compile_config()["INFERENCE_PRECISION_HINT"] == "f32"
        assert ov_runner.actual_precision() in F32
    flags = cpu_flags()
    core = ov.Core()
    unhinted = core.compile_model(core.read_model(str(ctx.path_of(artifact))), "CPU")
    default = target.precision_name(unhinted.get_property("INFERENCE_PRECISION_HINT"))
    if not {"avx512_bf16", "amx_bf16"} & set(flags):
        pytest.skip(f"no bf16-capable CPU here (flags {flags}); without a hint this CPU computes {default}")
    assert default == "bf16", f"flags {flags}: OpenVINO's default on a bf16 CPU changed to {default}"



def test_bf16_decoder_upscales_its_masks_in_f32(ctx, built):
    """The `sam` decoder's in-graph mask upscale, split off by the runner (mask_upscale_split), gives the whole
    graph's masks; a bf16 decoder runs it in f32, so its masks are the host post-processing of its own low-res
    logits (in bf16 they measured in-graph upscale IoU 0.77-0.85, docs/precision.md "bf16")."""
    from evsam_export.model import processing
    from evsam_export.runners import openvino_runner

    artifact = built["decoder.openvino.fp32"]
    core = ov.Core()
    model = core.read_model(str(ctx.path_of(artifact)))
    head, upscale = openvino_runner.mask_upscale_split(model)
    assert "masks" not in {name for port in head.outputs for name in port.get_names()}
    assert {p.get_friendly_name() for p in upscale.get_parameters()} == {openvino_runner.UPSCALE_INPUT, "orig_im_size"}
    feeds = sample_feeds(decoder_spec(), batch=2, num_points=3, seed=9)
    whole = {p.get_any_name(): v for p, v in core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds).items()}
    low_res = next(v for p, v in core.compile_model(head, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds).items()
                   if "low_res_masks" in p.get_names())
    masks = next(iter(core.compile_model(upscale, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        {openvino_runner.UPSCALE_INPUT: low_res, "orig_im_size": feeds["orig_im_size"]}).values()))
    np.testing.assert_array_equal(masks, whole["masks"])
    if not {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
        pytest.skip("no bf16-capable CPU here: the bf16 hint would compute f32")
    with OpenVINORunner(ctx.path_of(artifact), artifact.inputs, artifact.outputs, precision="bf16", threads=2) as bf16:
        assert bf16.actual_precision() == "bf16"
        out = bf16.infer(feeds)
    height, width = (int(v) for v in feeds["orig_im_size"])
    host = processing.postprocess_masks(out["low_res_masks"], processing.image_geometry(height, width, 512))
    assert np.abs(host - out["masks"]).max() < 1e-3


# ------------------------------------------------------------------------------------------ fp16


def test_fp16_irs_snr_and_gate(ctx, built):
    assert embedding_snr(ctx, built["encoder.openvino.fp16"], scene_input()) >= 30.0
    report = ctx.gate([built["encoder.openvino.fp16"], built["decoder.openvino.fp16"]])
    own = [s for s in report.stages if s.artifact in ("encoder.openvino.fp16", "decoder.openvino.fp16")]
    assert {s.stage for s in own} == {"encoder", "decoder", "end_to_end"}
    assert report.passed, [g.line() for g in report.failed_gates]


# ------------------------------------------------------------------------------------------ int8


def test_int8_ir_structure_and_snr(ctx, int8):
    artifact, _ = int8
    assert artifact.path == "encoder.openvino.int8.xml" and artifact.extra_files == ["encoder.openvino.int8.bin"]
    model = ov.Core().read_model(str(ctx.path_of(artifact)))
    fake_quantize = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert fake_quantize and len(fake_quantize) == artifact.facts["fake_quantize"]
    litemla = [op.get_friendly_name() for op in model.get_ops()
               if op.get_type_name() == "MatMul" and "/context_module/" in op.get_friendly_name()]
    assert len(litemla) == 8  # L0: 4 LiteMLA blocks x 2 MatMuls
    assert target.int8_fed_matmuls(model) == [] == artifact.facts["int8_fed_matmuls"]
    scope = artifact.facts["ignored_scope"]
    assert "MatMul" in scope["types"] and scope["regions"] == ["encoder-norm"]
    assert artifact.facts["calibration"]["count"] == 4 and len(artifact.facts["calibration"]["fingerprint"]) == 64
    assert artifact.facts["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert embedding_snr(ctx, artifact, scene_input()) >= 10.0


def test_int8_fallback_widens_scope_and_records_every_round(int8):
    artifact, gated = int8
    assert gated == [[], ["litemla-qkv"]]
    rounds = artifact.facts["fallback"]
    assert [r["passed"] for r in rounds] == [False, True]
    assert rounds[0]["failed_gates"] and rounds[1]["added_group"] == "litemla-qkv"
    assert artifact.facts["gate_passed"] is True
    assert artifact.facts["ignored_scope"]["fallback_groups"] == ["litemla-qkv"]
    assert artifact.facts["ignored_scope"]["names"] > 0  # the group reaches NNCF by node name
    overflow = artifact.facts["overflow_fix"]
    assert overflow["resolved"] == target.resolve_overflow_fix("auto", cpu_flags())[0]


def test_int8_rounds_share_one_quantization_and_say_what_they_hold(ctx, int8):
    """Statistics are collected once per build (cached by content): round 1 takes quantizers out of round 0's
    model instead of quantizing again, and the artifact's census counts what runs in INT8."""
    artifact, _ = int8
    once = artifact.facts["quantized_once"]
    assert (nncf_int8.quantized_cache_dir() / once["key"] / "model.xml").is_file()
    taken = artifact.facts["quantizers_taken_back"]
    assert 0 < taken["ops"] < taken["of"]
    counted = artifact.facts["lowered"]
    assert counted["precision"] == "int8" and 0 < counted["ops"]["Conv"]["lowered"] < counted["ops"]["Conv"]["total"]
    assert counted["ops"]["MatMul"]["lowered"] == 0  # the ignored scope keeps LiteMLA's MatMuls fp32
    assert counted["text"] in fallback.summary_outcome(artifact.facts)[1]


def test_stripping_every_quantizer_gives_back_the_fp32_model(ctx, int8):
    """strip_quantizers restores the fp32 weights and the biases that bias correction tuned: with every
    quantizer taken out, the quantized model computes the fp32 IR's embedding."""
    artifact, _ = int8
    core = ov.Core()
    original = core.read_model(str(ctx.path_of(ctx.manifest.artifact("encoder.onnx.fp32"))))
    quantized = core.read_model(str(nncf_int8.quantized_cache_dir() / artifact.facts["quantized_once"]["key"] / "model.xml"))
    ops = nncf_int8.quantized_ops(quantized)
    assert sorted(nncf_int8.strip_quantizers(quantized, original, ops)) == sorted(ops)
    assert not [op for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"]
    image = scene_input()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    reference = core.compile_model(original, "CPU", config)({"input_image": image})[0]
    stripped = core.compile_model(quantized, "CPU", config)({"input_image": image})[0]
    assert compare_tensors(reference, stripped).snr_db > 80.0


def test_stage_groups_reach_nncf_by_name(ctx):
    """A group that picks backbone stages by position has no pattern NNCF could match, so its nodes must
    reach the ignored scope by name; otherwise the stage groups change nothing and consecutive fallback
    rounds measure the same mask IoU to four digits. A pattern group (the stem) goes the same
    way, by the names FallbackGroup.select picks."""
    nncf = pytest.importorskip("nncf")
    parent = ctx.manifest.artifact("encoder.onnx.fp32")
    model = ov.Core().read_model(str(ctx.path_of(parent)))
    nodes = target.model_nodes(model)
    settings = target.Settings(precision="int8", calibration_images=2)
    groups = {g.name: g for g in target.ENCODER_GROUPS}
    kept = (groups["last-stage"], groups["stem"])
    scope = nncf_int8.round_scope(settings, kept, nodes, "encoder")
    base = nncf_int8.round_scope(settings, (), nodes, "encoder").names  # the LayerNorm regions' nodes
    assert {n for g in kept for n in g.select(nodes)} | set(base) == set(scope.names)
    assert scope.to_json(nodes)["names"] == len(scope.names)

    feeds = nncf_int8.calibration_feeds(ctx, parent, settings)
    quantized = nncf.quantize(
        model, nncf.Dataset(feeds), ignored_scope=scope.nncf(), **nncf_int8.quantize_kwargs(settings, "disable", len(feeds))
    )
    passthrough = {"Convert", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}

    def fed_by_fake_quantize(op) -> bool:
        for index in range(op.get_input_size()):
            source = op.input_value(index).get_node()
            while source.get_type_name() in passthrough:
                source = source.input_value(0).get_node()
            if source.get_type_name() == "FakeQuantize":
                return True
        return False

    def int8_convs(scope_name: str) -> list[bool]:
        return [fed_by_fake_quantize(op) for op in quantized.get_ops()
                if op.get_type_name() in ("Convolution", "GroupConvolution") and scope_name in op.get_friendly_name()]

    assert int8_convs("backbone/stages.4/") and not any(int8_convs("backbone/stages.4/"))  # l0's last stage stays fp32
    assert any(int8_convs("backbone/stages.3/"))  # and the stage before it is still INT8 (the check can tell)
    # The stem conv on the image stays fp32 (a pattern group); the next block of stage 0 is still INT8.
    assert int8_convs("stages.0/op_list.0/") and not any(int8_convs("stages.0/op_list.0/"))
    assert any(int8_convs("stages.0/op_list.1/"))


def test_overflow_fix_follows_cpu_flags():
    assert target.resolve_overflow_fix("auto", ["avx2", "avx512f"])[0] == "first_layer"
    assert target.resolve_overflow_fix("auto", ["avx2", "avx512_vnni"])[0] == "disable"
    assert target.resolve_overflow_fix("auto", ["avx2", "avx_vnni"])[0] == "disable"
    assert target.resolve_overflow_fix("enable", ["avx512_vnni"])[0] == "enable"


# ------------------------------------------------------------------------------------------ settings


def test_settings_refused(ctx):
    parent = ctx.manifest.artifact("encoder.onnx.fp32")
    with pytest.raises(RecipeError, match="precision"):
        target.build(ctx, parent, target.Settings(precision="int4"))
    with pytest.raises(RecipeError, match="inference_precision"):
        target.build(ctx, parent, target.Settings(inference_precision="bf16"))
    with pytest.raises(RecipeError, match="inference_precision"):  # a bf16 artifact computed in f32 is not bf16
        target.build(ctx, parent, target.Settings(precision="bf16", inference_precision="f32"))
    with pytest.raises(RecipeError, match="overflow_fix"):
        target.build(ctx, parent, target.Settings(precision="int8", overflow_fix="first"))
    # every value is refused when the settings are built, before any step runs
    for bad in ({"preset": "bogus"}, {"model_type": "cnn"}, {"fallback_method": "bisect"}, {"calibration_images": 0},
                {"max_rounds": 0}, {"accuracy_control_max_iterations": 0}, {"fp32_regions": ["layernorms"]},
                {"fallback_groups": ["stme"]}, {"fallback_groups": ["stem+decoder-output-upscaling"]}):
        with pytest.raises(RecipeError, match=next(iter(bad))):
            target.Settings(precision="int8", **bad)
    with pytest.raises(RecipeError, match="fp32 ONNX"):
        target.build(ctx, replace(parent, precision="fp16", id="encoder.onnx.fp16"), target.Settings())


def test_fallback_groups_set_the_order_of_the_rounds_per_component():
    """A measured order replaces the table's for its component only; table groups keep their reasons."""
    table = {g.name: g for g in target.ENCODER_GROUPS}
    assert nncf_int8.fallback_order(target.Settings(), "encoder") == target.ENCODER_GROUPS
    settings = target.Settings(precision="int8", fallback_groups=["litemla-qkv", "stem", "neck-pointwise+neck-inputs"])
    order = nncf_int8.fallback_order(settings, "encoder")
    assert [g.name for g in order] == ["litemla-qkv", "stem", "neck-pointwise+neck-inputs"]
    assert order[1] is table["stem"] and "measured" in order[2].reason
    assert nncf_int8.fallback_order(settings, "decoder") == target.DECODER_GROUPS


def test_static_batch_encoder(ctx, tmp_path):
    parent = ctx.manifest.artifact("encoder.onnx.fp32")
    (tmp_path / parent.path).symlink_to(ctx.path_of(parent))
    static_ctx = replace(ctx, folder=tmp_path)
    (artifact,) = target.build(static_ctx, parent, target.Settings(static_batch=True))
    assert artifact.inputs[0].shape == (1, 3, 512, 512) and artifact.outputs[0].shape[0] == 1
    model = ov.Core().read_model(str(tmp_path / artifact.path))
    assert list(model.input(0).get_shape()) == [1, 3, 512, 512]
    with runner(static_ctx, artifact) as ov_runner:
        with pytest.raises(UsageError, match="axis 0"):
            ov_runner.infer({"input_image": np.zeros((2, 3, 512, 512), np.float32)})


# ------------------------------------------------------------------------------------------ runner contract


def test_runner_contract_same_feed_checks_as_ort(ctx, built):
    encoder = built["encoder.openvino.fp32"]
    decoder = built["decoder.openvino.fp32"]
    image = scene_input()
    with runner(ctx, encoder) as ov_runner:
        assert [t.name for t in ov_runner.input_metadata()] == ["input_image"]
        with pytest.raises(UsageError, match="expected"):
            ov_runner.infer({"input_image": np.zeros((1, 3, 256, 256), np.float32)})
        with pytest.raises(UsageError, match="rank"):
            ov_runner.infer({"input_image": np.zeros((3, 512, 512), np.float32)})
        with pytest.raises(UsageError, match="feed names"):
            ov_runner.infer({"image": image})
        as_float64 = ov_runner.infer({"input_image": image.astype(np.float64)})  # cast like every runner
        assert list(as_float64) == ["image_embeddings"] and as_float64["image_embeddings"].dtype == np.float32
    feeds = sample_feeds(decoder_spec(), batch=1, num_points=2)
    with runner(ctx, decoder) as ov_runner:
        with pytest.raises(UsageError, match="point_coords"):
            ov_runner.infer({**feeds, "point_coords": np.zeros((1, 2, 3), np.float32)})
        with pytest.raises(UsageError, match="feed names"):
            ov_runner.infer({k: v for k, v in feeds.items() if k != "orig_im_size"})
        assert list(ov_runner.infer(feeds)) == [t.name for t in decoder.outputs]
