"""Our model's state dict is key-exact with upstream's: keys, order, shapes and dtypes of every variant equal
the reference key lists dumped from `efficientsam==1.0.0` (tests/data/reference/efficientvit_sam_<v>.keys.tsv)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from evsam_export.model.checkpoint import variant_signature
from evsam_export.model.sam import EfficientViTSam
from evsam_export.model.variants import VARIANT_NAMES, VARIANTS

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "data" / "reference"


def reference_path(name: str) -> Path:
    path = REFERENCE_DIR / f"efficientvit_sam_{name}.keys.tsv"
    if not path.is_file():
        pytest.fail(f"reference key list missing: {path} (see tests/data/reference/README.md)", pytrace=False)
    return path


def read_reference(name: str) -> tuple[list[tuple[str, tuple[int, ...], str]], list[str]]:
    """(key, shape, dtype) rows in file order, and the '#' comment lines."""
    rows, comments = [], []
    for line in reference_path(name).read_text().splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            comments.append(line)
            continue
        key, shape, dtype = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        rows.append((key, dims, dtype))
    return rows, comments


def meta_model(name: str) -> EfficientViTSam:
    with torch.device("meta"):
        return EfficientViTSam(VARIANTS[name])


def test_every_variant_has_a_reference_list():
    for name in VARIANT_NAMES:
        reference_path(name)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_signature_equals_upstream_key_list(name):
    rows, _ = read_reference(name)
    model = meta_model(name)
    ours = [
        (key, tuple(value.shape), str(value.dtype).removeprefix("torch."))
        for key, value in model.state_dict().items()
    ]
    signature = list(variant_signature(name).items())
    # variant_signature (used to identify checkpoints) is the model's state dict, in order.
    assert signature == [(key, shape) for key, shape, _ in ours]
    if ours != rows:
        ref_keys, our_keys = [r[0] for r in rows], [o[0] for o in ours]
        missing = [k for k in ref_keys if k not in set(our_keys)]
        extra = [k for k in our_keys if k not in set(ref_keys)]
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, rows, strict=False)) if a != b), min(len(ours), len(rows)))
        pytest.fail(
            f"{name}: {len(ours)} entries vs {len(rows)} upstream; missing {missing[:3]}, extra {extra[:3]}; "
            f"first difference at #{first_diff}: ours {ours[first_diff:first_diff + 1]} "
            f"upstream {rows[first_diff:first_diff + 1]}"
        )


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_dtypes_and_header_counts(name):
    rows, comments = read_reference(name)
    for key, _, dtype in rows:
        expected = "int64" if key.endswith("num_batches_tracked") else "float32"
        assert dtype == expected, key
    header = next(c for c in comments if "state-dict entries" in c)
    entries, params = (int(n) for n in re.search(r"(\d+) state-dict entries, (\d+) parameters", header).groups())
    assert entries == len(rows)
    model = meta_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    encoder_size = int(re.search(r"image_size=\(1024, (\d+)\)", header).group(1))
    assert VARIANTS[name].encoder_size == encoder_size
