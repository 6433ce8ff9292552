"""Checkpoint loading (`load_model(variant, path)`) and synthetic weights.

Official layouts (raw state dict, {"state_dict": sd}, {"model": sd}) load and behave exactly like the
weights they hold; every broken or mismatched file is refused with one CheckpointError line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from evsam_export.errors import CheckpointError
from evsam_export.model.checkpoint import load_model, variant_signature
from evsam_export.model.variants import VARIANTS

L0 = VARIANTS["l0"]
SPEC = "synthetic:7"


class NotWeights:
    """A pickled instance of this class is code to run, which weights_only refuses."""

    def __init__(self) -> None:
        self.payload = torch.ones(2)


@pytest.fixture(scope="module")
def synthetic_l0():
    model, weights = load_model(L0, SPEC)
    return model, weights


@pytest.fixture(scope="module")
def state_dict(synthetic_l0):
    return {key: value.clone() for key, value in synthetic_l0[0].state_dict().items()}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def raw_checkpoint(ckpt_dir, state_dict) -> Path:
    path = ckpt_dir / "efficientvit_sam_l0.pt"
    torch.save(state_dict, path)
    return path


@torch.inference_mode()
def outputs(model) -> list[torch.Tensor]:
    """Embeddings of a small deterministic input, and one point prompt decoded on them."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32))
    embedding = model.image_encoder(x)
    masks, iou = model.predict(
        embedding, point_coords=torch.tensor([[[300.0, 200.0]]]), point_labels=torch.tensor([[1]])
    )
    return [embedding, masks, iou]


@pytest.fixture(scope="module")
def synthetic_outputs(synthetic_l0):
    return outputs(synthetic_l0[0])


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model"])
def test_official_layouts_load_like_synthetic(layout, ckpt_dir, raw_checkpoint, state_dict, synthetic_outputs):
    if layout == "raw":
        path = raw_checkpoint
    else:
        path = ckpt_dir / f"wrapped_{layout}.pt"
        torch.save({layout: state_dict, "epoch": 3}, path)  # extra non-tensor entries beside the wrapper
    model, weights = load_model(L0, str(path) if layout == "model" else path)
    assert weights.spec == str(path)
    assert weights.synthetic_seed is None and not weights.is_synthetic
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not model.training
    loaded = model.state_dict()
    assert list(loaded) == list(state_dict)
    assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)
    for ours, reference in zip(outputs(model), synthetic_outputs):
        assert torch.equal(ours, reference)


def refusal(source, variant=L0) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_model(variant, source)
    err = info.value
    line = err.one_line()
    assert "\n" not in line and "\n" not in err.message and "\r" not in line, repr(line)
    assert "\x1b" not in line, repr(line)  # no terminal colour codes leaking from torch's messages
    assert err.hint, "every refusal says how to fix it"
    assert err.exit_code == 3
    assert len(line) < 400, line
    return err


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    line = refusal(path).one_line()
    assert "not found" in line and str(path) in line


def test_directory(tmp_path):
    line = refusal(tmp_path).one_line()
    assert "directory" in line and str(tmp_path) in line


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert "empty" in refusal(path).one_line()


def test_truncated_file(tmp_path, raw_checkpoint):
    data = raw_checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    line = refusal(path).one_line()
    assert "truncated" in line and str(path) in line


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    line = refusal(path).one_line()
    assert str(path) in line


def test_pickled_object_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"model": NotWeights()}, path)
    line = refusal(path).one_line()
    assert str(path) in line and "NotWeights" in line


@pytest.mark.parametrize(
    "payload", [{1, 2, 3}, {"a": 1}, [torch.ones(2)], torch.ones(3)], ids=["set", "dict", "list", "tensor"]
)
def test_not_a_state_dict(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    line = refusal(path).one_line()
    assert "no state dict" in line and str(path) in line


def test_other_variant(tmp_path):
    l1 = {
        key: torch.zeros(shape, dtype=torch.int64 if key.endswith("num_batches_tracked") else torch.float32)
        for key, shape in variant_signature("l1").items()
    }
    path = tmp_path / "efficientvit_sam_l1.pt"
    torch.save(l1, path)
    line = refusal(path).one_line()
    assert "this checkpoint is l1, not l0" in line
    load_model(VARIANTS["l1"], path)  # and it is a fine l1 checkpoint


def test_missing_key(tmp_path, state_dict):
    key = "mask_decoder.iou_token.weight"
    path = tmp_path / "missing_key.pt"
    torch.save({k: v for k, v in state_dict.items() if k != key}, path)
    line = refusal(path).one_line()
    assert "missing" in line and key in line and "l0" in line


def test_extra_key(tmp_path, state_dict):
    key = "image_encoder.extra.weight"
    path = tmp_path / "extra_key.pt"
    torch.save({**state_dict, key: torch.zeros(3)}, path)
    line = refusal(path).one_line()
    assert "unexpected" in line and key in line


def test_wrong_shape(tmp_path, state_dict):
    key = "prompt_encoder.not_a_point_embed.weight"
    path = tmp_path / "wrong_shape.pt"
    torch.save({**state_dict, key: torch.zeros(1, 255)}, path)
    line = refusal(path).one_line()
    assert "shape" in line and key in line and "255" in line


@pytest.mark.parametrize("spec", ["synthetic:abc", "synthetic:-1", "synthetic:", "synthetic:1.5"])
def test_bad_synthetic_spec(spec):
    line = refusal(spec).one_line()
    assert spec in line


def test_synthetic_weights_are_deterministic(synthetic_l0, state_dict):
    first = synthetic_l0[1]
    assert first.spec == SPEC and first.synthetic_seed == 7 and first.is_synthetic
    model, again = load_model(L0, SPEC)
    assert again.sha256 == first.sha256
    assert all(torch.equal(value, state_dict[key]) for key, value in model.state_dict().items())
    _, other = load_model(L0, "synthetic:8")
    assert other.synthetic_seed == 8 and other.sha256 != first.sha256
