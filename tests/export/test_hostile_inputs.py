"""Inputs a hostile or careless user gives: hand-edited manifests, artifact paths that leave the folder, odd
image types and extreme aspect ratios, arbitrary prompt arrays. Each gets a result or one error line with its
exit code, never a traceback. The property-based tests use Hypothesis, derandomized so
every run tries the same examples."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from folders import linked_copy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from evsam_export.errors import ArtifactError, UsageError
from evsam_export.manifest import MANIFEST_NAME, Artifact, Manifest, read_manifest
from evsam_export.model import processing
from evsam_export.model.variants import PROMPT_FRAME
from evsam_export.runtime import Predictor

# Deterministic and modest: the same examples on every machine, a few seconds of suite time each.
PROPERTY_SETTINGS = dict(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def real_manifest(l0_export) -> dict:
    return json.loads((l0_export / MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def predictor(l0_export) -> Predictor:
    with Predictor(l0_export, threads=2) as runtime:
        yield runtime


def write_manifest(folder: Path, data, raw: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).write_text(raw if raw is not None else json.dumps(data))
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "CI": "1"}, timeout=300)


def assert_one_line(error: Exception, *needles: str) -> None:
    line = error.one_line()
    assert "\n" not in line and len(line) < 400, line
    for needle in needles:
        assert needle in line, line


# ------------------------------------------------------------------------------------ hand-edited manifests


def _set(path: tuple, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(path: tuple):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


HAND_EDITS = {
    "artifacts-list-of-str": (_set(("artifacts",), ["x"]), "artifacts[0] must be an object"),
    "artifacts-null": (_set(("artifacts",), None), "artifacts must be a list"),
    "encoder-size-str": (_set(("encoder_size",), "abc"), "encoder_size must be an integer"),
    "encoder-size-float": (_set(("encoder_size",), 512.0), "encoder_size must be an integer"),
    "encoder-size-other-variant": (_set(("encoder_size",), 1024), "encoder_size is 1024, but variant l0 has 512"),
    "variant-unknown": (_set(("variant",), "l9"), "variant is \"l9\""),
    "weights-missing": (_delete(("weights",)), "weights is missing"),
    "weights-sha-int": (_set(("weights", "sha256"), 5), "weights.sha256 must be a string"),
    "model-list": (_set(("model",), []), "model must be an object"),
    "mask-selection-str": (_set(("model", "mask_selection"), "all4"), "model.mask_selection must be an object"),
    "decoder-profile": (_set(("model", "decoder_profile"), "onnx"), "model.decoder_profile"),
    "history-str": (_set(("history",), "yesterday"), "history must be a list"),
    "environment-list": (_set(("environment",), [1]), "environment must be an object"),
    "id-missing": (_delete(("artifacts", 0, "id")), "artifacts[0].id is missing"),
    "id-duplicate": (_set(("artifacts", 1, "id"), "encoder.onnx.fp32"), "artifacts[1].id \"encoder.onnx.fp32\" appears twice"),
    "component-unknown": (_set(("artifacts", 0, "component"), "neck"), "artifacts[0].component"),
    "size-negative": (_set(("artifacts", 0, "size_bytes"), -1), "artifacts[0].size_bytes must not be negative"),
    "size-bool": (_set(("artifacts", 0, "size_bytes"), True), "artifacts[0].size_bytes must be an integer"),
    "sha-short": (_set(("artifacts", 0, "sha256"), "abc"), "artifacts[0].sha256 must be 64 lowercase hex digits"),
    "inputs-dict": (_set(("artifacts", 0, "inputs"), {}), "artifacts[0].inputs must be a list"),
    "shape-null-dim": (_set(("artifacts", 1, "inputs", 0, "shape"), [1, None]), "artifacts[1].inputs[0].shape[1]"),
    "shape-float-dim": (_set(("artifacts", 0, "outputs", 0, "shape", 1), 256.5), "artifacts[0].outputs[0].shape[1]"),
    "dtype-unknown": (_set(("artifacts", 1, "inputs", 0, "dtype"), "abc"), "artifacts[1].inputs[0].dtype"),
    "dtype-string-type": (_set(("artifacts", 1, "inputs", 0, "dtype"), "str"), "artifacts[1].inputs[0].dtype"),
    "tensor-name-missing": (_delete(("artifacts", 1, "outputs", 0, "name")), "artifacts[1].outputs[0].name is missing"),
    "unknown-artifact-field": (_set(("artifacts", 0, "extra_file"), ["a.bin"]), "artifacts[0].extra_file is not a known artifact field"),
    "wall-time-nan": (_set(("artifacts", 0, "wall_time_s"), math.nan), "artifacts[0].wall_time_s must be a finite number"),
    "extra-files-str": (_set(("artifacts", 0, "extra_files"), "a.bin"), "artifacts[0].extra_files must be a list"),
    "format-version-true": (_set(("format_version",), True), "manifest format true"),
    "path-absolute": (_set(("artifacts", 0, "path"), "/etc/passwd"), "artifacts[0].path \"/etc/passwd\" is absolute"),
    "path-parent": (_set(("artifacts", 0, "path"), "../encoder.fp32.onnx"), "leaves the artifact folder"),
    "path-parent-inner": (_set(("artifacts", 0, "path"), "sub/../../x.onnx"), "leaves the artifact folder"),
    "path-windows-drive": (_set(("artifacts", 0, "path"), "C:\\models\\x.onnx"), "is absolute"),
    "path-empty": (_set(("artifacts", 0, "path"), ""), "artifacts[0].path"),
    "extra-file-parent": (_set(("artifacts", 0, "extra_files"), ["../secret.bin"]), "artifacts[0].extra_files[0]"),
}


@pytest.mark.parametrize("case", list(HAND_EDITS))
def test_hand_edited_manifest_is_one_line_naming_the_field(real_manifest, tmp_path, case):
    edit, needle = HAND_EDITS[case]
    data = copy.deepcopy(real_manifest)
    edit(data)
    folder = write_manifest(tmp_path / case, data)
    with pytest.raises(ArtifactError) as info:
        read_manifest(folder)
    assert_one_line(info.value, needle)
    assert info.value.exit_code == 6


def test_unreadable_manifests_are_one_line(tmp_path):
    cases = {
        "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
        "not-utf8": b"\xff\xfe{",
        "truncated": b'{"format": "evsam-export/manifest", ',
    }
    for name, raw in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / MANIFEST_NAME).write_bytes(raw)
        with pytest.raises(ArtifactError) as info:
            read_manifest(folder)
        assert_one_line(info.value, "not valid JSON")


def test_real_manifest_still_reads(real_manifest, l0_export):
    manifest = read_manifest(l0_export)
    assert manifest.variant == real_manifest["variant"] and manifest.encoder_size == real_manifest["encoder_size"]
    assert [a.id for a in manifest.artifacts] == [a["id"] for a in real_manifest["artifacts"]]
    assert [artifact.to_json() for artifact in manifest.artifacts] == real_manifest["artifacts"]


# -------------------------------------------------------------------------------- artifact paths stay inside


def test_symlink_out_of_the_folder_is_refused(l0_export, tmp_path):
    outside = linked_copy(l0_export, tmp_path / "elsewhere")
    folder = tmp_path / "folder"
    folder.mkdir()
    data = json.loads((l0_export / MANIFEST_NAME).read_text())
    for path in l0_export.glob("*.onnx"):
        (folder / path.name).symlink_to(outside / path.name)
    write_manifest(folder, data)
    with pytest.raises(ArtifactError) as info:
        Predictor(folder)
    assert_one_line(info.value, "resolves outside", str(folder))


def test_symlink_inside_the_folder_is_fine(l0_export, tmp_path):
    folder = linked_copy(l0_export, tmp_path / "folder")
    data = json.loads((l0_export / MANIFEST_NAME).read_text())
    encoder = next(a for a in data["artifacts"] if a["component"] == "encoder")
    (folder / "models").mkdir()
    (folder / "models" / "encoder.onnx").symlink_to(folder / encoder["path"])
    encoder["path"] = "models/encoder.onnx"
    write_manifest(folder, data)
    with Predictor(folder) as runtime:
        assert runtime.encoder_artifact.path == "models/encoder.onnx"


def test_extra_file_symlinked_out_is_refused(l0_export, tmp_path):
    folder = linked_copy(l0_export, tmp_path / "folder")
    (tmp_path / "secret.bin").write_bytes(b"x")
    (folder / "weights.bin").symlink_to(tmp_path / "secret.bin")
    data = json.loads((l0_export / MANIFEST_NAME).read_text())
    data["artifacts"][0]["extra_files"] = ["weights.bin"]
    write_manifest(folder, data)
    with pytest.raises(ArtifactError) as info:
        Predictor(folder)
    assert_one_line(info.value, "weights.bin resolves outside")


# ------------------------------------------------------------------------ property: the manifest reader


@pytest.fixture(scope="module")
def scratch_folder(tmp_path_factory) -> Path:
    """One folder whose manifest.json each example overwrites."""
    return tmp_path_factory.mktemp("manifests")


JSON_SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def read_or_artifact_error(folder: Path, data) -> Manifest | None:
    """read_manifest's outcome for `data` written as manifest.json: a well-typed Manifest, or None after one
    ArtifactError line. Anything else (another exception, a warning) fails the test."""
    write_manifest(folder, None, raw=json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            manifest = read_manifest(folder)
        except ArtifactError as error:
            assert_one_line(error)
            event("ArtifactError")
            return None
    event("read")
    assert isinstance(manifest.variant, str) and type(manifest.encoder_size) is int
    assert isinstance(manifest.weights, dict) and isinstance(manifest.model, dict) and isinstance(manifest.history, list)
    for artifact in manifest.artifacts:
        assert isinstance(artifact, Artifact)
        assert isinstance(artifact.path, str) and not artifact.path.startswith("/") and ".." not in Path(artifact.path).parts
        for spec in artifact.inputs + artifact.outputs:
            assert all((type(d) is int and d >= 0) or (isinstance(d, str) and d) for d in spec.shape)
    return manifest


@settings(max_examples=150, **PROPERTY_SETTINGS)
@given(data=JSON_VALUES)
def test_manifest_reader_on_arbitrary_json(scratch_folder, data):
    read_or_artifact_error(scratch_folder, data)


@settings(max_examples=100, **PROPERTY_SETTINGS)
@given(data=st.dictionaries(st.sampled_from(["variant", "encoder_size", "weights", "model", "artifacts", "history", "command"]),
                            JSON_VALUES, max_size=7))
def test_manifest_reader_on_arbitrary_fields_of_a_manifest(scratch_folder, data):
    read_or_artifact_error(scratch_folder, {"format": "evsam-export/manifest", "format_version": 1, **data})


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


@settings(max_examples=200, **PROPERTY_SETTINGS)
@given(choice=st.data())
def test_manifest_reader_on_mutations_of_a_real_manifest(scratch_folder, real_manifest, choice):
    data = copy.deepcopy(real_manifest)
    for _ in range(choice.draw(st.integers(1, 3), label="mutations")):
        paths = [path for path, _ in _paths(data) if path]
        path = choice.draw(st.sampled_from(paths), label="path")
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = choice.draw(st.sampled_from(["replace", "delete", "add-sibling"]), label="action")
        if action == "replace":
            parent[path[-1]] = choice.draw(JSON_VALUES, label="value")
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[choice.draw(st.text(max_size=8), label="key")] = choice.draw(JSON_VALUES, label="value")
        else:
            parent.append(choice.draw(JSON_VALUES, label="value"))
        if not isinstance(data, dict):
            break
    read_or_artifact_error(scratch_folder, data)


# ---------------------------------------------------------------------------------------- set_image inputs


@pytest.mark.parametrize("image", [None, "photo.png", 3, [[1, 2], [3, 4]], b"\x89PNG"], ids=["none", "str", "int", "list", "bytes"])
def test_set_image_refuses_what_is_not_an_image(predictor, image):
    with pytest.raises(UsageError) as info:
        predictor.set_image(image)
    assert_one_line(info.value, "numpy array or a PIL image", type(image).__name__)


@pytest.mark.parametrize(
    "image, needle",
    [
        (np.zeros((8, 8), complex), "dtype complex128"),
        (np.array([["a", "b"]]), "dtype <U1"),
        (np.zeros((0, 8, 3), np.uint8), "shape (0, 8, 3)"),
        (np.zeros((8, 8, 5), np.uint8), "shape (8, 8, 5)"),
        (np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3)"),
        (np.array(5, np.uint8), "shape ()"),
    ],
    ids=["complex", "str", "empty", "5-channels", "batch", "scalar"],
)
def test_set_image_refuses_bad_arrays(predictor, image, needle):
    with pytest.raises(UsageError) as info:
        predictor.set_image(image)
    assert_one_line(info.value, needle)


def test_set_image_refuses_bad_image_format(predictor):
    for image_format in ("rgb", None, np.array(["RGB", "BGR"])):
        with pytest.raises(UsageError) as info:
            predictor.set_image(np.zeros((8, 8, 3), np.uint8), image_format=image_format)
        assert_one_line(info.value, "image_format")
    with pytest.raises(UsageError) as info:
        predictor.set_image(Image.new("RGB", (8, 8)), image_format="BGR")
    assert_one_line(info.value, "PIL image")


def test_uint16_and_pil_modes_convert_like_the_cli_reader(tmp_path):
    from evsam_export.data.images import read_image_file as read_image

    rng = np.random.default_rng(3)
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    dark16 = rng.integers(0, 200, (30, 20), dtype=np.uint16)  # a 16-bit file holding 8-bit values
    wide32 = rng.integers(0, 1_000_000, (30, 20), dtype=np.int32)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    float_gray = rng.uniform(0, 1, (30, 20)).astype(np.float32)
    images = {
        "ramp16.png": Image.fromarray(ramp),
        "dark16.png": Image.fromarray(dark16),
        "wide32.tif": Image.fromarray(wide32),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
        "float.tif": Image.fromarray(float_gray, mode="F"),
        "ycbcr.jpg": Image.fromarray(rgb).convert("YCbCr"),
        "la.png": Image.fromarray(rgb).convert("LA"),
        "bilevel.png": Image.fromarray(rgb).convert("1"),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
        expected = read_image(tmp_path / name)
        with Image.open(tmp_path / name) as opened:
            np.testing.assert_array_equal(processing.pil_to_rgb_uint8(opened), expected, err_msg=name)
    # numpy arrays of 16/32-bit integers follow the same rule as the files.
    np.testing.assert_array_equal(processing.as_rgb_uint8(ramp), read_image(tmp_path / "ramp16.png"))
    np.testing.assert_array_equal(processing.as_rgb_uint8(dark16), read_image(tmp_path / "dark16.png"))
    np.testing.assert_array_equal(processing.as_rgb_uint8(wide32), read_image(tmp_path / "wide32.tif"))
    assert processing.as_rgb_uint8(ramp).max() == round(int(ramp.max()) / 257)  # scaled, not clipped to 255


def test_set_image_uint16_and_cmyk_match_the_cli(predictor, tmp_path):
    from evsam_export.data.images import read_image_file as read_image

    rng = np.random.default_rng(4)
    deep = (rng.integers(0, 256, (40, 56, 3)) * 257).astype(np.uint16)  # 8-bit content in 16 bits
    predictor.set_image(deep)
    from_uint16 = predictor.image_embeddings.copy()
    predictor.set_image((deep // 257).astype(np.uint8))
    np.testing.assert_array_equal(predictor.image_embeddings, from_uint16)

    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    with Image.open(tmp_path / "cmyk.tif") as cmyk:
        assert cmyk.mode == "CMYK"
        predictor.set_image(cmyk)
    from_cmyk = predictor.image_embeddings.copy()
    predictor.set_image(read_image(tmp_path / "cmyk.tif"))
    np.testing.assert_array_equal(predictor.image_embeddings, from_cmyk)


# ----------------------------------------------------------------------------------- extreme aspect ratios


@pytest.mark.parametrize("shape", [(1, 2000), (1, 3000), (3000, 2), (2, 5000), (1, 1)])
def test_extreme_aspect_ratio_predicts(predictor, shape):
    height, width = shape
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert min(predictor.geometry.input_size) >= 1
    result = predictor.predict(point_coords=[[width / 2, height / 2]], point_labels=[1], boxes=[[0, 0, width, height]] * 2,
                               multimask_output=True, return_logits=True)
    assert result.masks.shape == (2, 3, height, width)
    assert np.isfinite(result.masks).all() and np.isfinite(result.scores).all()


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (2, 9000)])
def test_extreme_aspect_ratio_postprocessing_keeps_geometry(shape):
    """Low-res logits positive on the left (top) half of the image content come back positive on the left
    (top) half of the original image: the crop to a 1-pixel strip and the resize keep the geometry."""
    height, width = shape
    geometry = processing.ImageGeometry(shape, processing.resized_shape(height, width, PROMPT_FRAME), 512)
    content_h, content_w = geometry.input_size
    low_res = np.full((1, 1, 256, 256), -1.0, np.float32)
    if width > height:
        low_res[..., : content_w * 256 // PROMPT_FRAME // 2] = 1.0
    else:
        low_res[..., : content_h * 256 // PROMPT_FRAME // 2, :] = 1.0
    mask = processing.binarize(processing.postprocess_masks(low_res, geometry))[0, 0]
    assert mask.shape == shape
    along = mask[0] if width > height else mask[:, 0]
    half, slack = along.size // 2, along.size // 100
    assert along[: half - slack].all() and not along[half + slack:].any()


def test_cli_predict_on_extreme_aspect_ratio(l0_export, tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1, 3000, 3), dtype=np.uint8)).save(tmp_path / "line.png")
    proc = run_cli("predict", str(l0_export), str(tmp_path / "line.png"), "--point", "1500,0", "-o", str(tmp_path / "m.png"))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "m.png").size == (3000, 1)


# ------------------------------------------------------------------------------ property: the prompt checks

REAL_DTYPES = [np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_]
IMAGE_HW = (48, 64)


def any_array(max_dims: int = 3, max_side: int = 4):
    """Numeric arrays of any small shape and dtype, NaN, inf and huge values included, and a few
    non-numeric ones (complex, strings, objects)."""
    numeric = st.sampled_from(REAL_DTYPES).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=max_dims, max_side=max_side),
                                 elements=hnp.from_dtype(np.dtype(dtype), allow_nan=True, allow_infinity=True))
    )
    in_image = hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=max_dims, max_side=max_side),
                          elements=st.floats(0, min(IMAGE_HW)))
    other = (hnp.arrays(np.complex128, hnp.array_shapes(max_dims=2, max_side=3))
             | hnp.arrays(np.dtype("U3"), hnp.array_shapes(max_dims=2, max_side=3))
             | st.lists(st.one_of(st.none(), st.integers(-(2**80), 2**80), st.text(max_size=3), st.floats()), max_size=4))
    return st.one_of(numeric, in_image, in_image, other)


def boxes_in_image():
    height, width = IMAGE_HW
    corner = st.tuples(st.floats(0, width), st.floats(0, height))
    return st.lists(st.tuples(corner, corner).map(lambda c: [min(c[0][0], c[1][0]), min(c[0][1], c[1][1]),
                                                             max(c[0][0], c[1][0]), max(c[0][1], c[1][1])]),
                    min_size=1, max_size=3).map(np.asarray)


def mask_inputs():
    low_res = hnp.arrays(np.float32, st.sampled_from([(256, 256), (1, 256, 256), (1, 1, 256, 256), (2, 1, 256, 256)]),
                         elements=st.floats(-50, 50, width=32))
    huge = st.sampled_from([np.full((1, 256, 256), 1e300), np.full((1, 256, 256), np.nan), np.full((1, 256, 256), -np.inf)])
    return st.none() | low_res | huge | any_array(max_dims=4)


HOSTILE_ARGUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "point_coords": any_array(),
        "point_labels": any_array(max_dims=2) | st.sampled_from([[1], [0], [1, 0], [[1]], [[1, 0]]]),
        "box": any_array(max_dims=2) | boxes_in_image().map(lambda b: b[0]),
        "boxes": any_array() | boxes_in_image(),
        "mask_input": mask_inputs(),
        "multimask_output": st.sampled_from([True, False, 0, 1, 2, None, "yes", np.bool_(True), np.array([1, 0])]),
        "return_logits": st.sampled_from([True, False, np.array(1)]),
    },
)


@st.composite
def prompt_arguments(draw) -> dict:
    """Hostile arguments; half the time with a well-formed point set, so that examples reach the decoder."""
    arguments = draw(HOSTILE_ARGUMENTS)
    if draw(st.booleans()):
        count = draw(st.integers(1, 3))
        arguments["point_coords"] = draw(hnp.arrays(np.float64, (count, 2), elements=st.floats(0, min(IMAGE_HW))))
        arguments["point_labels"] = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, 1)))
    return arguments


@settings(max_examples=120, **PROPERTY_SETTINGS)
@given(arguments=prompt_arguments())
def test_predict_on_arbitrary_prompt_arrays(prompt_predictor, arguments):
    """predict either returns a consistent Prediction or raises one UsageError line: never another
    exception, a warning, or non-finite scores."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            result = prompt_predictor.predict(**arguments)
        except UsageError as error:
            assert_one_line(error)
            event("UsageError")
            return
    event("predicted")
    batch, candidates = result.scores.shape
    assert batch >= 1 and candidates in (1, 3)
    assert result.masks.shape == (batch, candidates, *IMAGE_HW)
    assert result.low_res_logits.shape == (batch, candidates, 256, 256)
    assert np.isfinite(result.scores).all() and np.isfinite(result.low_res_logits).all()


def test_prediction_index_must_be_an_integer(prompt_predictor):
    result = prompt_predictor.predict(point_coords=[[10, 10]], point_labels=[1])
    assert result.best(np.int64(0)).shape == IMAGE_HW
    for index in (np.array([0, 1]), 0.5, "0", True, 1):
        with pytest.raises(UsageError) as info:
            result.best(index)
        assert_one_line(info.value, "prompt index")


@pytest.fixture(scope="module")
def prompt_predictor(l0_export) -> Predictor:
    """A predictor of its own, so no other test changes its image."""
    with Predictor(l0_export, threads=2) as runtime:
        runtime.set_image(np.random.default_rng(5).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8))
        yield runtime
