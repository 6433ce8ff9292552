"""--pad-points-in-graph: the decoder adds SAM's padding point to bare clicks, as apps that never add it
(X-AnyLabeling) need to get PyTorch SAM's masks; padded or boxed prompts must pass through unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from evsam_export import api, contract
from evsam_export.errors import RecipeError, UsageError
from evsam_export.export.onnx_export import export_onnx
from evsam_export.export.simplify import ort_outputs
from evsam_export.model.checkpoint import load_model
from evsam_export.model.sam import DecoderGraph
from evsam_export.model.variants import get_variant
from evsam_export.pipeline.recipe import load_recipe


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """The l0 (synthetic:0) decoder traced as shipped (caller pads) and with the padding in the graph."""
    model, _ = load_model(get_variant("l0"))
    folder = tmp_path_factory.mktemp("padding")
    spec = contract.decoder_spec("sam")
    paths = {}
    for name, pad in (("caller", False), ("graph", True)):
        paths[name] = folder / f"{name}.onnx"
        export_onnx(DecoderGraph(model, "sam", pad_points=pad, token_layout=True), spec, paths[name])
    return paths, spec


def feeds_for(spec, labels: list[float], batch: int = 3) -> dict:
    feeds = contract.sample_feeds(spec, batch=batch, num_points=len(labels), seed=len(labels))
    feeds[contract.POINT_LABELS] = np.tile(np.array(labels, np.float32), (batch, 1))
    return feeds


@pytest.mark.parametrize("labels", [[1], [1, 0], [0, 1, 1]])
def test_bare_clicks_get_the_padding_point(decoders, labels):
    paths, spec = decoders
    bare = feeds_for(spec, labels)
    padded = dict(bare)
    batch = bare[contract.POINT_COORDS].shape[0]
    padded[contract.POINT_COORDS] = np.concatenate([bare[contract.POINT_COORDS], np.zeros((batch, 1, 2), np.float32)], axis=1)
    padded[contract.POINT_LABELS] = np.concatenate([bare[contract.POINT_LABELS], -np.ones((batch, 1), np.float32)], axis=1)
    want = ort_outputs(paths["caller"], padded)
    got = ort_outputs(paths["graph"], bare)
    for name, a, b in zip(("masks", "iou", "low_res"), want, got):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)
    # The case the option exists for: without it a bare click is another prompt.
    unpadded = ort_outputs(paths["caller"], bare)
    assert np.max(np.abs(unpadded[1] - want[1])) > 1e-3


@pytest.mark.parametrize("labels", [[1, -1], [2, 3], [1, 2, 3], [1, 0, -1]])
def test_padded_and_boxed_prompts_pass_unchanged(decoders, labels):
    paths, spec = decoders
    feeds = feeds_for(spec, labels)
    for a, b in zip(ort_outputs(paths["caller"], feeds), ort_outputs(paths["graph"], feeds)):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_padding_needs_the_sam_profile_and_x_anylabeling_needs_padding():
    with pytest.raises(UsageError, match="static"):
        api.ExportOptions(decoder_profile="tensorrt", pad_points_in_graph=True)
    assert load_recipe("app-annotation").export_options().pad_points_in_graph
    with pytest.raises(RecipeError, match="padding point"):
        load_recipe("app-annotation", overrides=["export.pad_points_in_graph=false"])
