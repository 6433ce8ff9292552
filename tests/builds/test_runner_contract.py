"""One contract, every runner: the same tests run against each runtime that is available here
(PyTorch, ONNX Runtime, OpenVINO, onnxruntime-web in headless Chromium; TensorRT where it and a GPU exist), on the
same exported l0 graphs."""

from __future__ import annotations

import numpy as np
import pytest

from evsam_export import api
from evsam_export.contract import sample_feeds
from evsam_export.errors import UsageError
from evsam_export.manifest import read_manifest
from evsam_export.model.checkpoint import load_model
from evsam_export.model.variants import VARIANTS
from evsam_export.runners import availability_of, runner_for_artifact
from evsam_export.runners.torch_runner import torch_reference_runners

RUNTIMES = ["torch", "onnxruntime", "openvino", "tensorrt", "onnxruntime-web"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract") / "l0"
    api.export("l0", out, options=api.ExportOptions(decoder_profile="tensorrt"))
    return out


@pytest.fixture(scope="module")
def torch_runners():
    model, _ = load_model(VARIANTS["l0"], "synthetic:0")
    return torch_reference_runners(model, VARIANTS["l0"], decoder_profile="tensorrt")


def make_runner(runtime: str, component: str, folder, torch_runners):
    state = availability_of(runtime)
    if not state.available:
        pytest.skip(f"{runtime} unavailable here: {state.reason}")
    if runtime == "torch":
        return torch_runners[0 if component == "encoder" else 1]
    manifest = read_manifest(folder)
    artifact = manifest.artifact(f"{component}.onnx.fp32")
    if runtime == "openvino":
        from evsam_export.runners.openvino_runner import OpenVINORunner

        return OpenVINORunner(folder / artifact.path, artifact.inputs, artifact.outputs, artifact.id)
    if runtime == "onnxruntime-web":
        from evsam_export.runners.browser_runner import BrowserRunner

        return BrowserRunner(folder / artifact.path, artifact.inputs, artifact.outputs, artifact.id)
    if runtime == "tensorrt":
        pytest.skip("TensorRT runs engines, which need the GPU that builds them (see tests/unit/test_tensorrt_target.py)")
    return runner_for_artifact(folder, artifact)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("component", ["encoder", "decoder"])
def test_runner_contract(runtime, component, folder, torch_runners):
    runner = make_runner(runtime, component, folder, torch_runners)
    reference = torch_runners[0 if component == "encoder" else 1]
    spec_names = [t.name for t in reference.inputs]
    with runner:
        assert [t.name for t in runner.input_metadata()] == spec_names
        feeds = {k: v for k, v in sample_feeds(reference.spec, batch=3 if component == "decoder" else 1,
                                               num_points=4, seed=9).items() if k in spec_names}
        outputs = runner.infer(feeds)
        expected = reference.load().infer(feeds)
        assert list(outputs) == [t.name for t in reference.outputs]
        for name, value in expected.items():
            assert outputs[name].shape == value.shape and outputs[name].dtype == np.float32
            assert np.abs(outputs[name] - value).max() < 1e-3, name
        # the base class checks feeds the same way for every runtime
        wrong_rank = dict(feeds, **{spec_names[0]: feeds[spec_names[0]][0]})
        with pytest.raises(UsageError, match="expected rank"):
            runner.infer(wrong_rank)
        with pytest.raises(UsageError, match="feed names do not match"):
            runner.infer({k: v for k, v in feeds.items() if k != spec_names[-1]})
        as_float64 = {k: v.astype(np.float64) for k, v in feeds.items()}
        assert np.allclose(runner.infer(as_float64)[reference.outputs[0].name], outputs[reference.outputs[0].name], atol=1e-5)
    assert not runner.loaded
