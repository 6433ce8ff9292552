"""The web target and the browser runner: graphs onnxruntime-web can run, the runtime's files copied in, parity
gated inside headless Chromium (Debian's chromium + Playwright + the onnxruntime-web npm package; the browser
tests skip with the install command when one is missing, like a missing TensorRT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evsam_export.errors import ExportError, RuntimeUnavailable
from evsam_export.manifest import read_manifest
from evsam_export.model.variants import VARIANTS
from evsam_export.parity.gate import ParityGate
from evsam_export.progress import Reporter
from evsam_export.runners import availability_of, runner_for_artifact
from evsam_export.steps.step import StepContext
from evsam_export.targets import web
from evsam_export.web.dist import BUNDLES, find_dist

BROWSER = availability_of("onnxruntime-web")
needs_browser = pytest.mark.skipif(not BROWSER.available, reason=f"onnxruntime-web unavailable here: {BROWSER.reason}")
needs_dist = pytest.mark.skipif(find_dist() is None, reason="onnxruntime-web npm package not installed")


def web_build(folder: Path, component: str, precision: str, execution_provider: str = "wasm"):
    """The web target step on `folder`'s fp32 ONNX `component`, added to its manifest."""
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=VARIANTS["l0"], reporter=Reporter(quiet=True), gating=ParityGate())
    settings = web.Settings(execution_provider=execution_provider, precision=precision)
    [artifact] = web.build(ctx, manifest.artifact(f"{component}.onnx.fp32"), settings)
    manifest.add(artifact)
    web.finish(folder, manifest)
    manifest.write(folder)
    return artifact


def test_missing_pieces_name_their_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("EVSAM_ORT_WEB", str(tmp_path))
    state = availability_of("onnxruntime-web")
    if "Playwright" not in state.reason and "chromium" not in state.reason:
        assert not state.available and "npm install --prefix ~/.cache/evsam-export/onnxruntime-web onnxruntime-web@1.30.0" in state.reason
    monkeypatch.setenv("EVSAM_CHROMIUM", str(tmp_path / "no-chromium"))
    state = availability_of("onnxruntime-web")
    assert not state.available and ("apt-get install -y chromium" in state.reason or "pip install playwright" in state.reason)
    with pytest.raises(RuntimeUnavailable, match="web target: onnxruntime-web not found"):
        web.preflight({"execution_provider": "wasm"})


@needs_dist
def test_web_target_writes_standard_onnx_fp16_storage_and_the_runtime(copy_export):
    import onnx
    import onnxruntime as ort

    folder = copy_export("web-target")
    artifact = web_build(folder, "decoder", "fp16")
    model = onnx.load(str(folder / artifact.path))
    assert web.foreign_ops(model) == []
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == artifact.facts["fp16_storage"]["initializers_fp16"] > 10
    assert artifact.size_bytes == artifact.facts["download_bytes"] < 0.6 * read_manifest(folder).artifact("decoder.onnx.fp32").size_bytes
    for name in BUNDLES["wasm"]:
        assert (folder / "ort-web" / name).read_bytes() == (find_dist() / name).read_bytes()
    assert (folder / "ort-web" / "VERSION").read_text().strip() == artifact.facts["ort_web_version"]
    info = read_manifest(folder).model["web"]
    assert info["entry"] == "ort.wasm.min.mjs" and info["decoder"] == "decoder.web.fp16"
    assert info["download_bytes"]["total"] == info["download_bytes"]["runtime"] + artifact.size_bytes
    # fp16 storage, fp32 compute: the stored weights' rounding is all that changes
    from evsam_export.contract import artifact_spec, sample_feeds

    feeds = {k: v for k, v in sample_feeds(artifact_spec(artifact), batch=2, num_points=3, seed=1).items()
             if k in [t.name for t in artifact.inputs]}
    fp32 = ort.InferenceSession(str(folder / "decoder.fp32.onnx")).run(["low_res_masks"], feeds)[0]
    fp16 = ort.InferenceSession(str(folder / artifact.path)).run(["low_res_masks"], feeds)[0]
    assert fp16.dtype == np.float32 and 0 < np.abs(fp16 - fp32).max() < 5e-2


def test_the_apps_mask_graph_is_the_predictors_postprocessing_for_one_token():
    """targets.web.mask_graph (run here by native onnxruntime, in the page by onnxruntime-web): the chosen token
    upscaled like processing.postprocess_masks and thresholded like binarize; a pixel may differ only where the
    logit is within float rounding of the threshold. At a smaller size it is the same crop resized to that size."""
    import onnxruntime as ort

    from evsam_export.model import processing

    session = ort.InferenceSession(web.mask_graph().SerializeToString())
    low = (np.random.default_rng(3).standard_normal((1, 4, 256, 256)) * 4).astype(np.float32)
    geometry = processing.image_geometry(480, 640, 512)
    for token, size in ((2, (480, 640)), (0, (240, 320))):
        color = np.frombuffer(bytes([0, 0, 255, 110]), np.int32).reshape(())  # RGBA bytes packed in one int32
        pixels = session.run(None, {"low_res_masks": low, "token": np.array([token]), "frame_crop": np.array(geometry.input_size),
                                    "size": np.array(size), "color": color})[0]
        rgba = pixels.view(np.uint8).reshape(*size, 4)
        frame = processing.resize_bilinear(low[0, token], 1024, 1024)[: geometry.input_size[0], : geometry.input_size[1]]
        logits = processing.resize_bilinear(frame, *size)
        on = rgba[..., 3] == 110
        assert rgba.shape == (*size, 4) and set(np.unique(rgba[..., 2])) == {0, 255} and on.sum() > 0.3 * on.size
        assert np.abs(logits[on != processing.binarize(logits)]).max(initial=0.0) < 1e-4


@needs_dist
def test_contrib_ops_are_refused_in_one_line(copy_export):
    import onnx
    from onnx import helper

    folder = copy_export("web-contrib")
    source = folder / "decoder.fp32.onnx"
    model = onnx.load(str(source))
    model.graph.node.append(helper.make_node("FastGelu", ["iou_predictions"], ["unused"], domain="com.microsoft"))
    onnx.save(model, str(source))
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=VARIANTS["l0"], reporter=Reporter(quiet=True), gating=ParityGate())
    with pytest.raises(ExportError) as info:
        web.build(ctx, manifest.artifact("decoder.onnx.fp32"), web.Settings())
    assert "com.microsoft.FastGelu" in info.value.one_line() and "graph_passes = []" in info.value.one_line()


@needs_browser
def test_web_folder_gates_in_the_browser(copy_export, gate_suite):
    """fp16-stored encoder and fp32 decoder, run by onnxruntime-web (WASM) in Chromium, pass the shipped gates."""
    from evsam_export.parity.suites import load_suite
    from evsam_export.parity.validate import validate_folder

    folder = copy_export("web-gate")
    encoder, decoder = web_build(folder, "encoder", "fp16"), web_build(folder, "decoder", "fp32")
    runner = runner_for_artifact(folder, decoder)
    assert runner.runtime == "onnxruntime-web" and runner.execution_provider == "wasm"
    report = validate_folder(folder, load_suite(gate_suite), artifacts=[encoder.id, decoder.id], reporter=Reporter(quiet=True))
    assert report.passed, [g.line() for g in report.failed_gates]
    assert {s.artifact for s in report.stages} == {encoder.id, decoder.id} and not report.unavailable


@needs_browser
def test_webgpu_is_refused_in_one_line_where_the_browser_has_none(tmp_path):
    missing = web.webgpu_missing()
    if not missing:
        pytest.skip("this browser exposes WebGPU")
    env = {**os.environ, "CI": "1"}
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", "web-webgpu", "-v", "l0", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 7, proc.stderr
    assert "the browser here has no WebGPU" in proc.stderr and "web-wasm" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.full
@pytest.mark.heavy
def test_web_wasm_recipe_passes_its_gate_in_the_browser(tmp_path, quick_suite):
    """The whole recipe (export, fp16 storage of the encoder, the decoder and its split halves, the halves' check
    in the browser, browser validation)."""
    if not BROWSER.available:
        pytest.skip(BROWSER.reason)
    out = tmp_path / "web"
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", "web-wasm", "-v", "l0", "-o", str(out),
                           "--set", f"validate.suite={quick_suite}"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    manifest = read_manifest(out)
    web_info = manifest.model["web"]
    assert web_info["encoder"] == "encoder.web.fp16" and web_info["decoder"] == "decoder.web.fp16"
    # The app runs the split decoder's halves, so the page downloads them and not the single graph.
    assert (web_info["decoder_image"], web_info["decoder_prompt"]) == ("decoder_image.web.fp16", "decoder_prompt.web.fp16")
    loaded = ("runtime", "encoder.web.fp16", "decoder_image.web.fp16", "decoder_prompt.web.fp16")
    assert web_info["download_bytes"]["total"] == sum(web_info["download_bytes"][name] for name in loaded)
    assert (out / "index.html").is_file() and all((out / name).is_file() for name in web_info["app"])
    assert "download" in proc.stdout


def test_bench_times_a_subject_by_its_own_clock():
    """Browser subjects report onnxruntime-web's in-page time, not this process's wall time around the transfer."""
    from evsam_export.bench.timing import alternate

    class InPage:
        calls = 0

        def timed_run_ms(self, feeds):
            InPage.calls += 1
            return 7.0 + InPage.calls

        def infer(self, feeds):
            raise AssertionError("a subject with its own clock is not timed around infer()")

    times = alternate({"web": InPage()}, {"web": {}}, runs=3, warmup=1)
    assert times == {"web": [9.0, 10.0, 11.0]}


@needs_browser
def test_a_graph_the_browser_cannot_run_fails_in_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from evsam_export.errors import ArtifactError
    from evsam_export.manifest import TensorSpec
    from evsam_export.runners.browser_runner import BrowserRunner

    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [3])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    specs = [TensorSpec("x", "float32", ("n",))], [TensorSpec("y", "float32", (3,))]
    onnx.save(model, str(tmp_path / "ir-too-new.onnx"))  # onnx writes IR 14 today; onnxruntime-web 1.30 reads up to 13
    if model.ir_version > 13:
        with pytest.raises(ArtifactError, match="cannot load ir-too-new.onnx: .*IR version"):
            BrowserRunner(tmp_path / "ir-too-new.onnx", *specs).load()
    model.ir_version = 8  # what our exports carry
    onnx.save(model, str(tmp_path / "reshape.onnx"))
    runner = BrowserRunner(tmp_path / "reshape.onnx", *specs)
    with runner:
        assert runner.info["crossOriginIsolated"] and runner.threads >= 1
        output = runner.infer({"x": np.arange(3, dtype=np.float32)})["y"]
        assert output.tolist() == [0.0, 1.0, 2.0] and output.flags.writeable  # like every runtime's outputs
        with pytest.raises(ArtifactError) as info:
            runner.infer({"x": np.arange(4, dtype=np.float32)})
        assert "onnxruntime-web failed to run it" in info.value.one_line()
        assert "\n" not in info.value.one_line()
    assert not runner.loaded
