"""Graph passes: each one preserves outputs (against ONNX Runtime's own op and against PyTorch), matches
only what it can rewrite exactly, and is recorded where it ran."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from evsam_export import api
from evsam_export.errors import ExportError, RecipeError
from evsam_export.export import graph_passes
from evsam_export.export.graph_passes import PASSES, apply_checked, apply_passes, cubic_resize_matrix
from evsam_export.export.onnx_export import ComponentSpec
from evsam_export.export.simplify import ort_outputs
from evsam_export.manifest import TensorSpec, read_manifest


def ops(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def resize_model(in_hw, sizes=None, scales=None, mode="half_pixel", a=-0.75, exclude_outside=0, resize_mode="cubic",
                 dynamic_spatial=False, shape_concat=False):
    """x[N, 3, h, w] -> Resize -> y, with sizes/scales as initializers or as TorchScript's Shape/Concat."""
    h, w = in_hw
    batch = "n" if shape_concat or scales is not None else 2  # constant sizes fix the batch too
    x_shape = [batch, 3, "h", "w"] if dynamic_spatial else [batch, 3, h, w]
    nodes, inits = [], [numpy_helper.from_array(np.zeros(0, np.float32), "empty")]
    inputs = ["x", "", "empty"]
    if shape_concat:
        inits += [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                  (("starts", [0]), ("ends", [2]), ("axes", [0]), ("spatial", list(sizes)))]
        nodes += [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("Slice", ["shape", "starts", "ends", "axes"], ["lead"]),
                  helper.make_node("Concat", ["lead", "spatial"], ["sizes"], axis=0)]
        inputs = ["x", "", "", "sizes"]
    elif sizes is not None:
        inits.append(numpy_helper.from_array(np.array([2, 3, *sizes], np.int64), "sizes"))
        inputs = ["x", "", "", "sizes"]
    else:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        inputs = ["x", "", "scales"]
    nodes.append(helper.make_node("Resize", inputs, ["y"], name="/neck/Resize", mode=resize_mode,
                                  coordinate_transformation_mode=mode, cubic_coeff_a=a, exclude_outside=exclude_outside))
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    return ort_outputs(model, {"x": x})[0]


# ------------------------------------------------------------------------------------ bicubic resize


@pytest.mark.parametrize("mode", ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"])
@pytest.mark.parametrize("in_len,out_len,a", [(16, 64, -0.75), (7, 20, -0.75), (64, 24, -0.75), (32, 64, -0.5), (5, 5, -0.75)])
def test_cubic_matrix_equals_onnx_runtime_resize(mode, in_len, out_len, a):
    rng = np.random.default_rng(in_len * 100 + out_len)
    x = rng.standard_normal((2, 3, in_len, in_len + 3)).astype(np.float32)
    model = resize_model((in_len, in_len + 3), sizes=(out_len, out_len + 1), mode=mode, a=a)
    expected = run(model, x)
    rows = cubic_resize_matrix(in_len, out_len, mode, a)
    cols = cubic_resize_matrix(in_len + 3, out_len + 1, mode, a)
    ours = np.einsum("Hh,nchw,Ww->ncHW", rows, x.astype(np.float64), cols)
    np.testing.assert_allclose(ours, expected, atol=2e-5)


@pytest.mark.parametrize("form", ["sizes", "scales", "shape_concat"])
def test_bicubic_pass_replaces_resize_and_keeps_outputs(form):
    kwargs = {"sizes": (64, 48)} if form != "scales" else {"scales": [1.0, 1.0, 4.0, 3.0]}
    model = resize_model((16, 16), shape_concat=form == "shape_concat", **kwargs)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32) * 10
    rewritten, counts = apply_passes(model, ["bicubic-resize-as-matmul"])
    assert counts == {"bicubic-resize-as-matmul": 1}
    assert ops(rewritten) == {"MatMul": 2}, ops(rewritten)  # Shape/Slice/Concat of the sizes are gone too
    names = sorted(node.name for node in rewritten.graph.node)
    assert names == ["/neck/Resize/bicubic_cols", "/neck/Resize/bicubic_rows"]  # what fp16's islands match
    expected, got = run(model, x), run(rewritten, x)
    assert got.shape == expected.shape == (2, 3, 64, 48)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sizes": (64, 64), "resize_mode": "linear"},  # not cubic
        {"sizes": (64, 64), "exclude_outside": 1},  # renormalised taps at the border: not our matrix
        {"sizes": (64, 64), "mode": "tf_crop_and_resize"},  # needs the roi input
        {"sizes": (64, 64), "dynamic_spatial": True},  # input size unknown: no constant matrix
        {"scales": [1.0, 2.0, 4.0, 4.0]},  # resizes channels too
        {"scales": [1.0, 1.0, 1.7, 1.7]},  # 16 x 1.7 = 27.2: ONNX maps coordinates with 1.7, not 27/16
    ],
)
def test_bicubic_pass_leaves_what_it_cannot_rewrite_exactly(kwargs):
    model = resize_model((16, 16), **kwargs)
    rewritten, counts = apply_passes(model, ["bicubic-resize-as-matmul"])
    assert counts == {"bicubic-resize-as-matmul": 0}
    assert ops(rewritten) == ops(model)


# ------------------------------------------------------------------------------------------ tanh GELU


class GeluBlocks:
    """Conv -> GELU(tanh) in the three places onnxsim leaves it: before a residual Add (0.5 kept), before a
    Conv (0.5 folded into the Conv's weight) and before a Conv *and* an Add (0.5 folded nowhere or as Mul)."""

    @staticmethod
    def module():
        import torch
        from torch import nn

        class Blocks(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
                self.gelu = nn.GELU(approximate="tanh")

            def forward(self, x):
                a = self.gelu(self.c1(x)) + x  # residual: the 0.5 cannot fold
                b = self.c3(self.gelu(self.c2(a)))  # 0.5 folds into c3's weight
                g = self.gelu(self.c4(b))
                return self.c3(g) + g  # read by a Conv and an Add

        return Blocks().eval()


@pytest.fixture(scope="module")
def gelu_graph(tmp_path_factory):
    import torch
    from onnxsim import simplify

    module = GeluBlocks.module()
    x = torch.randn(1, 8, 12, 12)
    path = tmp_path_factory.mktemp("gelu") / "gelu.onnx"
    torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    simplified, ok = simplify(onnx.load(str(path)))
    assert ok
    with torch.no_grad():
        reference = module(x * 4).numpy()
    return simplified, (x * 4).numpy(), reference


def test_gelu_pass_fuses_every_tanh_gelu_and_matches_pytorch(gelu_graph):
    model, x, reference = gelu_graph
    assert ops(model)["Tanh"] == 3
    rewritten, counts = apply_passes(model, ["tanh-gelu-as-fastgelu"])
    assert counts == {"tanh-gelu-as-fastgelu": 3}
    histogram = ops(rewritten)
    assert histogram["FastGelu"] == 3 and "Tanh" not in histogram and "Pow" not in histogram
    assert any(d.domain == "com.microsoft" for d in rewritten.opset_import)
    np.testing.assert_allclose(run(rewritten, x), reference, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(run(rewritten, x), run(model, x), atol=1e-4, rtol=1e-5)


def test_gelu_pass_keeps_shared_intermediates(gelu_graph):
    """A decomposition whose inner tensor has another reader is not a pure GELU: left alone."""
    model, x, _ = gelu_graph
    model = onnx.ModelProto.FromString(model.SerializeToString())
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    model.graph.output.append(helper.make_tensor_value_info(tanh.input[0], TensorProto.FLOAT, None))
    _, counts = apply_passes(model, ["tanh-gelu-as-fastgelu"])
    assert counts == {"tanh-gelu-as-fastgelu": 2}


def test_checked_application_refuses_a_pass_that_moves_outputs(monkeypatch):
    def broken(graph):  # a bicubic rewrite with a wrong coefficient
        node = next(n for n in graph.nodes if n.op == "Resize")
        node.attrs["cubic_coeff_a"] = -0.5
        return graph_passes.rewrite_bicubic_resize(graph)

    monkeypatch.setitem(PASSES, "bicubic-resize-as-matmul",
                        graph_passes.GraphPass("bicubic-resize-as-matmul", "portable", "", "", broken))
    model = resize_model((16, 16), sizes=(64, 64))
    spec = ComponentSpec("encoder", (TensorSpec("x", "float32", ("n", 3, 16, 16)),), (TensorSpec("y", "float32", ("n", 3, 64, 64)),))
    monkeypatch.setattr("evsam_export.export.simplify.equivalence_feeds",
                        lambda _spec: [{"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32) * 10}])
    monkeypatch.setattr("evsam_export.export.onnx_export.check_contract", lambda *_: None)
    with pytest.raises(ExportError, match="moved encoder outputs"):
        apply_checked(model, ["bicubic-resize-as-matmul"], spec)


def test_pass_names_are_checked_where_they_are_configured():
    from evsam_export.precision import ort_int8
    from evsam_export.targets import ort

    with pytest.raises(RecipeError, match="unknown graph pass"):
        api.ExportOptions(graph_passes=("fuse-everything",))
    with pytest.raises(RecipeError, match="emits onnxruntime ops"):
        api.ExportOptions(graph_passes=["tanh-gelu-as-fastgelu"])  # the export feeds OpenVINO and TensorRT too
    with pytest.raises(RecipeError, match="emits onnxruntime ops"):
        ort_int8.Settings(symmetric=True, graph_passes=["tanh-gelu-as-fastgelu"])  # TensorRT Q/DQ flavour
    assert ort_int8.Settings(symmetric=True).passes == ()
    assert ort_int8.Settings().passes == ("tanh-gelu-as-fastgelu",)
    assert ort.Settings(graph_passes=[]).graph_passes == ()


# ---------------------------------------------------------------------------------------- on l0


def test_l0_export_runs_the_portable_passes(l0_export):
    manifest = read_manifest(l0_export)
    encoder = manifest.artifact("encoder.onnx.fp32")
    facts = encoder.facts["graph_passes"]
    assert facts["passes"] == {"bicubic-resize-as-matmul": 2}  # the neck's 16->64 and 32->64 upsamples
    assert facts["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(l0_export / encoder.path), load_external_data=False)
    assert "Resize" not in ops(graph)
    upsample = [n.name for n in graph.graph.node if n.op_type == "MatMul" and "/bicubic_" in n.name]
    assert len(upsample) == 4 and all("/neck/" in name for name in upsample)
    assert encoder.facts["max_abs_diff_vs_torch"] <= 1e-4  # still PyTorch's numbers after the pass


def test_l0_ort_passes_on_the_real_encoder(l0_export):
    """The ORT pass finds all 30 GELUs of l0, whichever way onnxsim left their 0.5."""
    from evsam_export.export.onnx_export import artifact_spec

    encoder = read_manifest(l0_export).artifact("encoder.onnx.fp32")
    model = onnx.load(str(l0_export / encoder.path))
    rewritten, facts = apply_checked(model, ["tanh-gelu-as-fastgelu"], artifact_spec(encoder))
    assert facts["passes"] == {"tanh-gelu-as-fastgelu": 30}
    assert facts["max_abs_diff"] <= 1e-4
    assert "Tanh" not in ops(rewritten)


@pytest.mark.builds  # an export of its own
def test_export_without_graph_passes_keeps_the_resize(tmp_path):
    out = tmp_path / "plain"
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "export", "--output", str(out), "--no-graph-passes"],
                          capture_output=True, text=True, env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stderr
    encoder = read_manifest(out).artifact("encoder.onnx.fp32")
    assert encoder.facts["graph_passes"]["passes"] == {}
    assert ops(onnx.load(str(out / encoder.path), load_external_data=False))["Resize"] == 2
