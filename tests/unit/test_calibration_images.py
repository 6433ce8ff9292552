"""Deterministic scenes, sample photos and prompt sets for parity and calibration."""

import numpy as np
import pytest

from evsam_export.data.scenes import (
    PROMPT_KINDS,
    SampleImageSpec,
    SyntheticImageSpec,
    load_image_spec,
    prompts_for,
    sample_image,
    synthetic_scene,
)
from evsam_export.errors import UsageError
from evsam_export.parity.suites import load_suite

SCENE_SIZES = [(480, 640), (768, 320), (64, 1024), (1024, 64), (32, 32)]


def test_same_seed_gives_identical_bytes():
    first, second = synthetic_scene(7, 120, 160), synthetic_scene(7, 120, 160)
    assert first.rgb.tobytes() == second.rgb.tobytes()
    assert len(first.masks) == len(second.masks)
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, second.masks))


def test_different_seeds_differ():
    assert synthetic_scene(0, 120, 160).rgb.tobytes() != synthetic_scene(1, 120, 160).rgb.tobytes()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("height", "width"), SCENE_SIZES)
def test_scene_has_two_to_five_nonempty_masks_of_its_size(seed, height, width):
    scene = synthetic_scene(seed, height, width)
    assert scene.rgb.shape == (height, width, 3) and scene.rgb.dtype == np.uint8
    assert 2 <= len(scene.masks) <= 5
    for mask in scene.masks:
        assert mask.shape == (height, width) and mask.dtype == bool and mask.any()
    union = np.logical_or.reduce(scene.masks)
    assert not union.all()  # some background is left for negative points
    # Visible masks never overlap: each pixel belongs to at most one object.
    assert int(np.sum(scene.masks, axis=0).max()) == 1


def test_scene_size_is_bounded():
    with pytest.raises(ValueError):
        synthetic_scene(0, 8, 64)


def assert_prompt_inside(prompt, height, width):
    if prompt.points is not None:
        assert prompt.points.ndim == 2 and prompt.points.shape[1] == 2
        assert prompt.labels.shape == (prompt.points.shape[0],)
        assert np.all((prompt.points[:, 0] >= 0) & (prompt.points[:, 0] <= width - 1))
        assert np.all((prompt.points[:, 1] >= 0) & (prompt.points[:, 1] <= height - 1))
    if prompt.boxes is not None:
        x0, y0, x1, y1 = prompt.boxes.T
        assert np.all((x0 >= 0) & (x0 < x1) & (x1 <= width - 1))
        assert np.all((y0 >= 0) & (y0 < y1) & (y1 <= height - 1))
    assert prompt.points is not None or prompt.boxes is not None


@pytest.mark.parametrize("kind", PROMPT_KINDS)
@pytest.mark.parametrize(("height", "width"), SCENE_SIZES)
def test_prompts_lie_inside_the_image_for_every_kind(kind, height, width):
    for seed in range(4):
        scene = synthetic_scene(seed, height, width)
        for masks in (scene.masks, None):
            assert_prompt_inside(prompts_for(kind, scene.rgb, masks, seed=seed), height, width)


def test_prompt_shapes_and_flags_per_kind():
    scene = synthetic_scene(0, 240, 320)
    by_kind = {kind: prompts_for(kind, scene.rgb, scene.masks, seed=0) for kind in PROMPT_KINDS}
    assert by_kind["point"].points.shape == (1, 2) and by_kind["point"].boxes is None
    np.testing.assert_array_equal(by_kind["points_neg"].labels, [1, 1, 0])
    assert by_kind["box"].points is None and by_kind["box"].boxes.shape == (1, 4)
    assert by_kind["box_point"].points.shape == (1, 2) and by_kind["box_point"].boxes.shape == (1, 4)
    assert by_kind["boxes16"].boxes.shape == (16, 4) and by_kind["boxes16"].points is None
    assert by_kind["multimask"].multimask and not by_kind["point"].multimask
    assert by_kind["mask_refine"].refine and not by_kind["point"].refine
    for prompt in by_kind.values():
        for array in (prompt.points, prompt.labels, prompt.boxes):
            assert array is None or array.dtype == np.float32


def test_prompts_target_ground_truth_objects():
    scene = synthetic_scene(2, 240, 320)
    union = np.logical_or.reduce(scene.masks)
    prompt = prompts_for("points_neg", scene.rgb, scene.masks, seed=1)
    (fx0, fy0), (fx1, fy1), (bx, by) = prompt.points.astype(int)
    assert union[fy0, fx0] and union[fy1, fx1]  # foreground points on an object
    assert not union[by, bx]  # the background point off every object
    point = prompts_for("box_point", scene.rgb, scene.masks, seed=1)
    x, y = point.points[0].astype(int)
    x0, y0, x1, y1 = point.boxes[0]
    assert union[y, x] and x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1


def test_prompts_are_deterministic_and_refuse_unknown_kinds():
    scene = synthetic_scene(0, 120, 160)
    first = prompts_for("boxes16", scene.rgb, scene.masks, seed=3)
    second = prompts_for("boxes16", scene.rgb, scene.masks, seed=3)
    np.testing.assert_array_equal(first.boxes, second.boxes)
    with pytest.raises(UsageError):
        prompts_for("lasso", scene.rgb, scene.masks)


def suite_sample_names() -> list[str]:
    names = set()
    for suite in ("default", "full"):
        names |= {image.name for image in load_suite(suite).images if isinstance(image, SampleImageSpec)}
    return sorted(names)


@pytest.mark.parametrize("name", suite_sample_names())
def test_suite_sample_images_load_as_rgb_uint8(name):
    pytest.importorskip("skimage")
    rgb = sample_image(name)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    image = load_image_spec(SampleImageSpec(name))
    assert image.name == name and image.masks is None and np.array_equal(image.rgb, rgb)


def test_known_sample_sizes_and_grayscale_stacking():
    pytest.importorskip("skimage")
    assert sample_image("coffee").shape == (400, 600, 3)
    page = sample_image("page")
    assert page.shape == (191, 384, 3)
    assert np.array_equal(page[..., 0], page[..., 1]) and np.array_equal(page[..., 1], page[..., 2])
    assert sample_image("logo").shape == (500, 500, 3)  # RGBA: alpha dropped


def test_unknown_sample_name_is_refused():
    with pytest.raises(UsageError, match="unknown sample image"):
        sample_image("skin")  # needs a network download (docs/design.md "Offline sample photos"), so not offered


def test_load_image_spec_for_synthetic_scenes():
    image = load_image_spec(SyntheticImageSpec(seed=4, height=96, width=128))
    assert image.name == "synthetic-4-96x128"
    assert image.rgb.shape == (96, 128, 3) and image.masks


def test_missing_scikit_image_names_the_install(monkeypatch):
    import sys

    from evsam_export.errors import RuntimeUnavailable

    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage.data` fail
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(RuntimeUnavailable) as caught:
        sample_image("coffee")
    assert caught.value.hint == "pip install scikit-image"
