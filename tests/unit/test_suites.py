"""Parity suites load into typed objects, and every malformed field is refused with its path."""

from pathlib import Path

import pytest

from evsam_export.data.scenes import PROMPT_KINDS, SampleImageSpec, SyntheticImageSpec
from evsam_export.errors import RecipeError
from evsam_export.parity.suites import PRECISIONS, list_suites, load_suite

GOOD = """
[suite]
name = "tiny"
description = "one scene"

[[suite.images]]
synthetic = 3
size = [64, 96]

[[suite.images]]
sample = "coffee"

[suite.prompts]
kinds = ["point", "box"]

[tolerances.fp32]
embedding_snr_db_min = 60.0
embedding_cosine_min = 0.99999
mask_iou_mean_min = 0.999
mask_iou_p5_min = 0.99
iou_pred_max_abs = 1e-3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["default", "full"])
def test_shipped_suites_load_with_every_precision_and_kind(name):
    suite = load_suite(name)
    assert suite.name == name
    assert set(suite.tolerances) == set(PRECISIONS) | {"app-fp32"}
    assert suite.tolerance("fp32", encoder_profile="app") is suite.tolerances["app-fp32"]
    assert suite.prompt_kinds == PROMPT_KINDS
    assert any(isinstance(image, SyntheticImageSpec) for image in suite.images)
    assert any(isinstance(image, SampleImageSpec) for image in suite.images)
    fp32 = suite.tolerance("fp32")
    assert fp32.decoder_logit_max_abs is not None and fp32.allow_nonfinite is False
    for precision in PRECISIONS:
        tolerance = suite.tolerance(precision)
        assert (tolerance.stable_margin is None) == (tolerance.stable_mask_iou_mean_min is None)


def test_list_suites_names_the_shipped_files():
    assert {"default", "full"} <= set(list_suites())


def test_default_suite_is_small_and_has_non_square_photos():
    suite = load_suite("default")
    assert [image.name for image in suite.images if isinstance(image, SampleImageSpec)] == ["coffee", "page"]
    assert sum(isinstance(image, SyntheticImageSpec) for image in suite.images) == 2


def test_suite_from_path_parses_types_and_defaults(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    assert suite.images == (SyntheticImageSpec(seed=3, height=64, width=96), SampleImageSpec(name="coffee"))
    assert suite.prompt_kinds == ("point", "box") and suite.prompt_seed == 0
    fp32 = suite.tolerance("fp32")
    assert fp32.stable_margin is None and fp32.allow_nonfinite is False
    with pytest.raises(RecipeError, match="no tolerances for 'int8'"):
        suite.tolerance("int8")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('kinds = ["point", "box"]', 'kindz = ["point", "box"]', r"\[suite.prompts\] kindz: unknown key"),
        ('kinds = ["point", "box"]', 'kinds = ["point", "lasso"]', r"\[suite.prompts\] kinds: unknown prompt kind 'lasso'"),
        ('kinds = ["point", "box"]', 'kinds = "point"', r"\[suite.prompts\] kinds: expected a non-empty list"),
        ("mask_iou_mean_min = 0.999", 'mask_iou_mean_min = "high"',
         r"\[tolerances.fp32\] mask_iou_mean_min: expected a number, got str"),
        ("mask_iou_mean_min = 0.999", "mask_iou_mean_min = true",
         r"\[tolerances.fp32\] mask_iou_mean_min: expected a number, got bool"),
        ("mask_iou_mean_min = 0.999", "mask_iou_mean_min = 1.5", r"\[tolerances.fp32\] mask_iou_mean_min: 1.5 is outside"),
        ("mask_iou_mean_min = 0.999", "mask_iou_mean = 0.999", r"\[tolerances.fp32\] mask_iou_mean: unknown key"),
        ("mask_iou_mean_min = 0.999\n", "", r"\[tolerances.fp32\] mask_iou_mean_min: missing required key"),
        ("[tolerances.fp32]", "[tolerances.fp8]", r"\[tolerances\] fp8: unknown key"),
        ("iou_pred_max_abs = 1e-3", "iou_pred_max_abs = 1e-3\nallow_nonfinite = 0", r"allow_nonfinite: expected true or false"),
        ("iou_pred_max_abs = 1e-3", "iou_pred_max_abs = 1e-3\nstable_margin = 0.1", r"stable_margin: set together"),
        ("synthetic = 3", "synthetic = 3\nseedz = 1", r"\[suite.images #1\] seedz: unknown key"),
        ("size = [64, 96]", "size = [64]", r"\[suite.images #1\] size: expected \[height, width\]"),
        ("size = [64, 96]", "size = [8, 96]", r"\[suite.images #1\] size: .* within"),
        ("synthetic = 3", 'synthetic = "3"', r"\[suite.images #1\] synthetic: expected an integer"),
        ('sample = "coffee"', 'sample = "skin"', r"\[suite.images #2\] sample: unknown image 'skin'"),
        ('name = "tiny"', "name = 7", r"\[suite\] name: expected a non-empty string"),
        ('description = "one scene"', 'description = "one scene"\nowner = "me"', r"\[suite\] owner: unknown key"),
    ],
)
def test_malformed_fields_are_refused_with_their_path(tmp_path, old, new, message):
    assert old in GOOD
    with pytest.raises(RecipeError, match=message) as caught:
        load_suite(write(tmp_path, GOOD.replace(old, new, 1)))
    assert "\n" not in caught.value.one_line()


def test_unknown_top_level_table_and_bad_toml_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"\[top level\] extra: unknown key"):
        load_suite(write(tmp_path, GOOD + "\n[extra]\nx = 1\n"))
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_suite(write(tmp_path, GOOD + "\n[suite\n"))


def test_unknown_suite_name_lists_the_shipped_ones():
    with pytest.raises(RecipeError) as caught:
        load_suite("no-such-suite")
    assert "default" in caught.value.hint and "full" in caught.value.hint
