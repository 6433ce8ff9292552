"""Runner.infer_staged and Runner.concurrent on ONNX Runtime, over small graphs built here: the head computes
the gating output, the tail the rest for the rows asked for (and, given a window, only the grid cells under it),
and every computed row and pixel equals the whole graph's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from evsam_export.manifest import TensorSpec  # noqa: E402
from evsam_export.runners.ort_runner import OrtRunner, staged_subgraphs, windowed_subgraph  # noqa: E402


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


def grid_graph(path, local: bool = True):
    """t [B, 36, 2] image tokens of a 6x6 grid -> score [B, 1] = max(t); masks [B, 1, 12, 12]: the tokens laid
    out as a grid (Reshape by the tokens' own batch size, read as the exported decoder reads it), a per-cell
    MatMul + Relu to 4 channels, each cell's 4 channels spread to its 2x2 block (DepthToSpace), reshaped to the
    declared [B, 1, 12, 12]. local=False adds each column's mean over the rows to every cell, so a cell reads
    cells outside any window."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 4], rng.normal(size=8).astype(np.float32))
    nodes = [
        helper.make_node("ReduceMax", ["t"], ["peak"], axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["peak", "one"], ["score"]),
        helper.make_node("Shape", ["t"], ["t_shape"]),
        helper.make_node("Constant", [], ["first"], value=helper.make_tensor("f", TensorProto.INT64, [], [0])),
        helper.make_node("Gather", ["t_shape", "first"], ["batch_scalar"]),
        helper.make_node("Constant", [], ["axis0"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])),
        helper.make_node("Unsqueeze", ["batch_scalar", "axis0"], ["batch"]),
        helper.make_node("Constant", [], ["grid_dims"], value=helper.make_tensor("g", TensorProto.INT64, [3], [6, 6, 2])),
        helper.make_node("Concat", ["batch", "grid_dims"], ["grid_shape"], axis=0),
        helper.make_node("Reshape", ["t", "grid_shape"], ["grid"]),
        helper.make_node("MatMul", ["grid", "w"], ["cells0"]),
        helper.make_node("Relu", ["cells0"], ["cells"]),
    ]
    spread_from = "cells"
    if not local:
        nodes += [helper.make_node("ReduceMean", ["cells"], ["column_mean"], axes=[1], keepdims=1),
                  helper.make_node("Add", ["cells", "column_mean"], ["mixed"])]
        spread_from = "mixed"
    nodes += [
        helper.make_node("Transpose", [spread_from], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("DepthToSpace", ["nchw"], ["spread"], blocksize=2),
        helper.make_node("Concat", ["batch", "mask_dims"], ["mask_shape"], axis=0),
        helper.make_node("Reshape", ["spread", "mask_shape"], ["masks"]),
    ]
    consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1]),
              helper.make_tensor("mask_dims", TensorProto.INT64, [3], [1, 12, 12])]
    return token_graph_runner(path, "grid", nodes, [w, *consts], 12)


def token_graph_runner(path, name: str, nodes, initializers, side: int) -> OrtRunner:
    """Save a graph of t [B, 36, 2] -> score [B, 1], masks [B, 1, side, side] and return its OrtRunner."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B", 36, 2])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", 1]),
         helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["B", 1, side, side])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return OrtRunner(path, [TensorSpec("t", "float32", ["B", 36, 2])],
                     [TensorSpec("score", "float32", ["B", 1]), TensorSpec("masks", "float32", ["B", 1, side, side])], name)


def test_windowed_tail_computes_only_the_cells_under_the_window(tmp_path):
    runner = grid_graph(tmp_path / "g.onnx").load()
    _, tail, _ = staged_subgraphs(runner.path, "score")
    model, grid, scale = windowed_subgraph(tail, "masks")
    assert grid == (6, 6) and scale == 2
    t = np.random.default_rng(1).normal(size=(5, 36, 2)).astype(np.float32)
    whole = runner.infer({"t": t})["masks"]
    every = lambda score: np.ones(len(score), bool)  # noqa: E731
    for rows, cols in [(7, 12), (12, 3), (1, 1), (11, 9)]:
        staged = runner.infer_staged({"t": t}, "score", every, {"masks": (rows, cols)})["masks"]
        cell_rows, cell_cols = -(-rows // 2) * 2, -(-cols // 2) * 2  # whole 2x2 blocks of the cells under it
        np.testing.assert_array_equal(staged[..., :cell_rows, :cell_cols], whole[..., :cell_rows, :cell_cols])
        assert not staged[..., cell_rows:, :].any() and not staged[..., :, cell_cols:].any()
    assert runner._windowed[("score", "masks")] is not None
    # Rows asked for and a window together; a window over the whole grid runs the plain tail.
    some = runner.infer_staged({"t": t}, "score", lambda score: score[:, 0] > np.median(score), {"masks": (5, 5)})["masks"]
    rows = runner.infer({"t": t})["score"][:, 0] > np.median(runner.infer({"t": t})["score"])
    np.testing.assert_array_equal(some[rows][..., :6, :6], whole[rows][..., :6, :6])
    assert not some[~rows].any() and not some[..., 6:, :].any()
    np.testing.assert_array_equal(runner.infer_staged({"t": t}, "score", every, {"masks": (12, 12)})["masks"], whole)
    with pytest.raises(Exception, match="window for unknown outputs"):
        runner.infer_staged({"t": t}, "score", every, {"logits": (4, 4)})


def test_windowed_tail_is_not_used_where_cells_read_outside_the_window(tmp_path):
    """A cell that reads other rows (a column mean) gives other values in a window: the check on the first
    call's inputs finds it and every cell is computed."""
    runner = grid_graph(tmp_path / "g.onnx", local=False).load()
    assert windowed_subgraph(staged_subgraphs(runner.path, "score")[1], "masks") is not None  # the shape matches
    t = np.random.default_rng(2).normal(size=(3, 36, 2)).astype(np.float32)
    staged = runner.infer_staged({"t": t}, "score", lambda score: np.ones(len(score), bool), {"masks": (6, 6)})["masks"]
    np.testing.assert_array_equal(staged, runner.infer({"t": t})["masks"])
    assert runner._windowed[("score", "masks")] is None


def merged_rows_graph(path):
    """t [B, 36, 2] of a 6x6 grid -> score [B, 1] = max(t); masks [B, 1, 6, 6]: the tokens reshaped straight to
    rows merged into the batch, [B*6, 6, 2], by a constant shape (as a simplifier leaves the decoder's
    upscaling), a per-cell MatMul + Relu + ReduceSum, then [B, 1, -1, 6]: only rows can be windowed."""
    rng = np.random.default_rng(3)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 4], rng.normal(size=8).astype(np.float32))
    nodes = [
        helper.make_node("ReduceMax", ["t"], ["peak"], axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["peak", "one"], ["score"]),
        helper.make_node("Reshape", ["t", "rows_merged"], ["rows"]),
        helper.make_node("MatMul", ["rows", "w"], ["cells0"]),
        helper.make_node("Relu", ["cells0"], ["cells"]),
        helper.make_node("ReduceSum", ["cells", "last"], ["summed"], keepdims=0),
        helper.make_node("Shape", ["t"], ["t_shape"]),
        helper.make_node("Slice", ["t_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "mask_dims"], ["mask_shape"], axis=0),
        helper.make_node("Reshape", ["summed", "mask_shape"], ["masks"]),
    ]
    consts = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1]),
              helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
              helper.make_tensor("rows_merged", TensorProto.INT64, [3], [-1, 6, 2]),
              helper.make_tensor("mask_dims", TensorProto.INT64, [3], [1, -1, 6])]
    return token_graph_runner(path, "merged", nodes, [w, *consts], 6)


def test_windowed_tail_of_merged_rows_computes_the_rows_under_the_window(tmp_path):
    runner = merged_rows_graph(tmp_path / "m.onnx").load()
    assert windowed_subgraph(staged_subgraphs(runner.path, "score")[1], "masks")[1:] == ((6, 6), 1)
    t = np.random.default_rng(4).normal(size=(4, 36, 2)).astype(np.float32)
    whole = runner.infer({"t": t})["masks"]
    staged = runner.infer_staged({"t": t}, "score", lambda score: np.ones(len(score), bool), {"masks": (3, 2)})["masks"]
    np.testing.assert_array_equal(staged[..., :3, :], whole[..., :3, :])  # every column of the rows asked for
    assert not staged[..., 3:, :].any()
    assert runner._windowed[("score", "masks")][3]  # rows only
