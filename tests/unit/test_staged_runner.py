"""Runner.infer_staged and Runner.concurrent on ONNX Runtime, over a small graph built here: the head computes
the gating output, the tail the rest for the rows asked for, and every computed row equals the whole graph's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from evsam_export.manifest import TensorSpec  # noqa: E402
from evsam_export.runners.ort_runner import OrtRunner, staged_subgraphs  # noqa: E402


def gated_graph(path):
    """x [B,3] -> score [B,1] = max(relu(x W0)) * ones([rows, 1]) / 2; masks [B,2,2] = reshape((relu(x W0) W1 + b) / 2,
    [rows, 2, 2]): `rows` (from Shape(h)) is an int tensor of the head, so the tail recomputes it for its rows,
    and the scalar constant 1/2 is shared by both sides."""
    rng = np.random.default_rng(0)
    w0 = helper.make_tensor("w0", TensorProto.FLOAT, [3, 5], rng.normal(size=15).astype(np.float32))
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [5, 4], rng.normal(size=20).astype(np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], rng.normal(size=4).astype(np.float32))
    tail_shape = helper.make_tensor("tail_shape", TensorProto.INT64, [2], [2, 2])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("Shape", ["h"], ["h_shape"]),
        helper.make_node("Slice", ["h_shape", "zero", "one"], ["rows"]),
        helper.make_node("Concat", ["rows", "one"], ["score_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["score_shape"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceMax", ["h"], ["peak"], axes=[1], keepdims=1),
        helper.make_node("Constant", [], ["half"], value=helper.make_tensor("h", TensorProto.FLOAT, [], [0.5])),
        helper.make_node("Mul", ["peak", "ones"], ["peak_rows"]),
        helper.make_node("Mul", ["peak_rows", "half"], ["score"]),
        helper.make_node("Concat", ["rows", "tail_shape"], ["mask_shape"], axis=0),
        helper.make_node("MatMul", ["h", "w1"], ["m0"]),
        helper.make_node("Add", ["m0", "b"], ["m_biased"]),
        helper.make_node("Mul", ["m_biased", "half"], ["m1"]),
        helper.make_node("Reshape", ["m1", "mask_shape"], ["masks"]),
    ]
    consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(
        nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", 1]),
         helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["B", 2, 2])],
        [w0, w1, b, tail_shape, *consts],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return OrtRunner(path, [TensorSpec("x", "float32", ["B", 3])],
                     [TensorSpec("score", "float32", ["B", 1]), TensorSpec("masks", "float32", ["B", 2, 2])], "gated")


def test_staged_cut_recomputes_shape_arithmetic(tmp_path):
    head, tail, boundary = staged_subgraphs(gated_graph(tmp_path / "g.onnx").path, "score")
    assert boundary == ["h"]  # the one float tensor the tail reads; `rows` is recomputed there from it
    assert [o.name for o in head.graph.output] == ["score", "h"]
    assert {n.op_type for n in tail.graph.node} >= {"Shape", "Slice", "Reshape", "Constant"}


def test_infer_staged_computes_only_the_rows_asked_for(tmp_path):
    runner = gated_graph(tmp_path / "g.onnx").load()
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    whole = runner.infer({"x": x})
    asked = []

    def rows_needed(score):
        asked.append(score.copy())
        return score[:, 0] > np.median(score)

    staged = runner.infer_staged({"x": x}, "score", rows_needed)
    np.testing.assert_array_equal(asked[0], whole["score"])
    rows = whole["score"][:, 0] > np.median(whole["score"])
    assert 0 < rows.sum() < len(rows)
    np.testing.assert_array_equal(staged["score"], whole["score"])
    np.testing.assert_array_equal(staged["masks"][rows], whole["masks"][rows])
    assert not staged["masks"][~rows].any()
    every = runner.infer_staged({"x": x}, "score", lambda score: np.ones(len(score), bool))
    np.testing.assert_array_equal(every["masks"], whole["masks"])
    none = runner.infer_staged({"x": x}, "score", lambda score: np.zeros(len(score), bool))
    assert none["masks"].shape == (6, 2, 2) and not none["masks"].any()


def test_concurrent_runner_gives_the_same_outputs(tmp_path):
    runner = gated_graph(tmp_path / "g.onnx").load()
    concurrent = runner.concurrent().load()
    assert concurrent.threads == 1
    feeds = [{"x": np.random.default_rng(seed).normal(size=(4, 3)).astype(np.float32)} for seed in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(concurrent.infer, feeds))
    for feed, result in zip(feeds, results):
        np.testing.assert_allclose(result["masks"], runner.infer(feed)["masks"], rtol=1e-6, atol=1e-6)
    concurrent.close()
