"""`evsam-export evaluate`: COCO ground truth, the zero-shot protocol checked against an independent computation
(upstream EfficientViTSamPredictor + pycocotools), shards that merge exactly, --max-drop, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from coco_scenes import ENCODINGS, write_coco_set
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from evsam_export.cli import _register
from evsam_export.cli.root import app
from evsam_export.data.coco import (
    AREA_BUCKETS,
    area_bucket,
    box_prompts,
    decode_masks,
    iter_images,
    load_coco,
    point_prompt,
    select_ids,
)
from evsam_export.errors import UsageError

_register()
AGREEMENT_POINTS = 0.5  # the bound for "the same protocol computed independently"


def invoke(*args: str):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    return result, getattr(result, "stderr", result.output)


def assert_one_line_error(result, stderr: str, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    return write_coco_set(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def whole_run(l0_export, coco_set, tmp_path_factory) -> Path:
    """One evaluate run of the session's l0 export (PyTorch and the fp32 ONNX pipeline) on the whole set."""
    out = tmp_path_factory.mktemp("eval") / "whole"
    result, stderr = invoke(l0_export, "--annotations", coco_set, "--images", coco_set.parent / "images", "--output", out)
    assert result.exit_code == 0, result.output + stderr
    (out.parent / "stderr.txt").write_text(stderr)
    return out


def results_of(folder: Path) -> dict:
    data = json.loads((folder / "eval.json").read_text())
    return {(r["pipeline"], r["prompt"]): r for r in data["results"]}


# ------------------------------------------------------------------------------------------------ the loader


def test_all_three_encodings_decode_like_the_coco_api(coco_set):
    dataset = load_coco(coco_set, coco_set.parent / "images")
    coco = COCO(str(coco_set))
    raw = json.loads(coco_set.read_text())["annotations"]
    kinds = {
        "polygon" if isinstance(a["segmentation"], list) else "uncompressed" if isinstance(a["segmentation"]["counts"], list) else "rle"
        for a in raw
        if not a["iscrowd"]
    }
    assert kinds == set(ENCODINGS)
    assert [image.image_id for image in dataset.images] == sorted(coco.getImgIds())
    assert dataset.crowd_skipped == 4 and dataset.instance_count == sum(1 for a in raw if not a["iscrowd"])
    for image, rgb, masks in iter_images(dataset):
        assert rgb.shape == (image.height, image.width, 3) and rgb.dtype == np.uint8
        for instance, mask in zip(image.instances, masks):
            expected = coco.annToMask(coco.anns[instance.annotation_id]).astype(bool)
            assert np.array_equal(mask, expected) and mask.any()
        x, y, w, h = np.array([coco.anns[i.annotation_id]["bbox"] for i in image.instances]).T
        assert np.allclose(box_prompts(image), np.stack([x, y, x + w, y + h], axis=1))
    buckets = {area_bucket(i.area) for image in dataset.images for i in image.instances}
    assert buckets == set(AREA_BUCKETS)


def test_point_prompt_is_the_pixel_farthest_from_the_background():
    mask = np.zeros((9, 12), bool)
    mask[1:8, 2:9] = True  # a 7x7 square: its centre (5, 4) is the one farthest pixel
    assert point_prompt(mask).tolist() == [5.0, 4.0]
    # The image border counts as background (one pixel of padding): a full-image 5x7 mask peaks in its middle
    # row at distance 3, where columns 2..4 tie and the first one wins.
    assert point_prompt(np.ones((5, 7), bool)).tolist() == [2.0, 2.0]
    # Ties go to the first maximum in row-major order: a 2-pixel-high bar peaks at its top-left-most centre.
    bar = np.zeros((6, 10), bool)
    bar[2:4, 1:9] = True
    assert point_prompt(bar).tolist() == [1.0, 2.0]


def test_selection_is_deterministic_and_shards_partition_it():
    ids = [40, 3, 17, 8, 99, 21, 5, 60, 12, 31]
    sample = select_ids(ids, 6, 7, None)
    assert sample == select_ids(list(reversed(ids)), 6, 7, None) == sorted(sample)
    assert sample != select_ids(ids, 6, 8, None) and len(set(sample)) == 6
    shards = [select_ids(ids, 6, 7, (k, 3)) for k in (1, 2, 3)]
    assert sorted(i for shard in shards for i in shard) == sample
    assert select_ids(ids, None, 0, None) == sorted(ids)


# ------------------------------------------------------------------------------------------------ the protocol


def upstream_protocol_ious(coco_json: Path, images_dir: Path) -> dict[str, np.ndarray]:
    """The protocol computed independently: upstream's EfficientViTSamPredictor (its own resize and pad, with
    torchvision's PIL path done by Pillow), prompts from the COCO API's annotations, IoU by pycocotools."""
    import importlib

    import torch
    from scipy import ndimage
    from upstream import build_upstream

    from evsam_export.model.checkpoint import load_model
    from evsam_export.model.variants import VARIANTS

    ours, _ = load_model(VARIANTS["l0"], "synthetic:0")  # the weights the default export uses
    model = build_upstream("l0", ours.state_dict())
    sam = importlib.import_module("efficientsam.models.efficientvit.sam")
    sam.to_pil_image = Image.fromarray  # torchvision's PIL path: uint8 array -> PIL image -> bilinear resize
    sam.resize = lambda image, size: image.resize((size[1], size[0]), Image.BILINEAR)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1) / 255
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1) / 255
    resize, pad = sam.SamResize(model.image_size[1]), sam.SamPad(model.image_size[1])
    model.transform = lambda image: pad((torch.from_numpy(resize(image)).permute(2, 0, 1).float() / 255 - mean) / std)
    predictor = sam.EfficientViTSamPredictor(model)

    coco = COCO(str(coco_json))
    ious = {"box": [], "point": []}
    for image_id in sorted(coco.getImgIds()):
        record = coco.imgs[image_id]
        predictor.set_image(np.asarray(Image.open(images_dir / record["file_name"]).convert("RGB")))
        for ann in coco.loadAnns(sorted(coco.getAnnIds(imgIds=[image_id], iscrowd=False))):
            gt = coco.annToRLE(ann)
            x, y, w, h = ann["bbox"]
            masks, _, _ = predictor.predict(box=np.array([x, y, x + w, y + h]), multimask_output=False)
            ious["box"].append(mask_utils.iou([mask_utils.encode(np.asfortranarray(masks[0].astype(np.uint8)))], [gt], [0])[0, 0])
            distance = ndimage.distance_transform_edt(np.pad(coco.annToMask(ann), 1))[1:-1, 1:-1]
            row, col = np.unravel_index(np.argmax(distance), distance.shape)
            masks, scores, _ = predictor.predict(point_coords=np.array([[col, row]]), point_labels=np.array([1]), multimask_output=True)
            best = masks[int(np.argmax(scores))]
            ious["point"].append(mask_utils.iou([mask_utils.encode(np.asfortranarray(best.astype(np.uint8)))], [gt], [0])[0, 0])
    return {kind: np.asarray(values) for kind, values in ious.items()}


@pytest.mark.full  # a whole evaluate run over the COCO set, and upstream's predictor on it
def test_protocol_agrees_with_upstream_predictor_and_pycocotools(whole_run, coco_set):
    independent_ious = upstream_protocol_ious(coco_set, coco_set.parent / "images")
    independent = {kind: float(values.mean()) for kind, values in independent_ious.items()}
    per_instance = json.loads((whole_run / "eval.json").read_text())["per_instance"]["ious"]
    results = results_of(whole_run)
    instances = sum(1 for a in json.loads(coco_set.read_text())["annotations"] if not a["iscrowd"])
    assert set(results) == {(p, k) for p in ("pytorch", "encoder.onnx.fp32 -> decoder.onnx.fp32") for k in ("box", "point")}
    for (pipeline, prompt), entry in results.items():
        assert entry["instances"] == instances
        assert abs(entry["miou"] - independent[prompt]) * 100 <= AGREEMENT_POINTS, (pipeline, prompt, entry["miou"], independent)
        assert sum(entry[b]["instances"] for b in AREA_BUCKETS) == instances
        # Instance by instance too (same order: image id, then annotation id), so a mean cannot hide a swap.
        assert np.abs(np.asarray(per_instance[pipeline][prompt]) - independent_ious[prompt]).max() <= 0.05
    # Synthetic weights give poor masks; the protocol must still see a difference between prompt kinds.
    assert 0 < independent["box"] < 1 and 0 < independent["point"] < 1


@pytest.mark.full  # reads the whole evaluate run
def test_reports_and_summary_line(whole_run):
    data = json.loads((whole_run / "eval.json").read_text())
    assert data["passed"] and data["images"] == 4 and data["timing"]["images_per_s"] > 0
    assert len(data["per_instance"]["ious"]["pytorch"]["box"]) == data["instances"] == len(data["per_instance"]["image_ids"])
    markdown = (whole_run / "eval.md").read_text()
    assert "| pytorch | box |" in markdown and "images/s" in markdown
    junit = (whole_run / "eval-junit.xml").read_text()
    assert 'tests="4"' in junit and 'failures="0"' in junit
    stderr = (whole_run.parent / "stderr.txt").read_text()  # progress with ETA, then the summary line with the rate
    assert "evaluate 4 images: 1/4, ETA" in stderr
    assert any(line.startswith("OK ") and "4 images" in line and "images/s" in line for line in stderr.splitlines()), stderr


@pytest.mark.full  # reads the whole evaluate run
def test_worst_instances_are_drawn_and_shown_in_the_report(whole_run):
    from evsam_export.overlay import ARTIFACT, GROUND_TRUTH, REFERENCE

    data = json.loads((whole_run / "eval.json").read_text())
    worst = {(r["pipeline"], r["prompt"], w["image_id"], w["annotation_id"]): w["iou"] for r in data["results"] for w in r["worst"]}
    pictures = data["pictures"]
    assert {(p["pipeline"], p["prompt"], p["image_id"], p["annotation_id"]) for p in pictures} == set(worst)
    page = (whole_run / "report.html").read_text()
    for picture in pictures:
        # Run again for the picture, the drawn mask has the IoU the streamed pass recorded.
        iou = worst[picture["pipeline"], picture["prompt"], picture["image_id"], picture["annotation_id"]]
        assert f"IoU with ground truth {iou:.4f}" in picture["caption"], (picture, iou)
        assert picture["file"].startswith("eval/worst-") and f'src="{picture["file"]}"' in page
        pixels = np.asarray(Image.open(whole_run / picture["file"]).convert("RGB")).reshape(-1, 3)
        colours = {tuple(c) for c in np.unique(pixels, axis=0)}
        assert GROUND_TRUTH in colours and REFERENCE in colours  # outlines of the GT and PyTorch masks
        assert (ARTIFACT in colours) == (picture["pipeline"] != "pytorch")
    assert sorted(p.relative_to(whole_run).as_posix() for p in (whole_run / "eval").glob("*.png")) == sorted(p["file"] for p in pictures)
    markdown = (whole_run / "eval.md").read_text()
    assert all(f"]({picture['file']})" in markdown for picture in pictures)


def test_weights_other_than_the_exported_ones_are_refused_like_validate(l0_export, coco_set, tmp_path):
    out = tmp_path / "out"
    result, stderr = invoke(l0_export, "--annotations", coco_set, "--images", coco_set.parent / "images", "-c", "synthetic:1", "-o", out)
    assert_one_line_error(result, stderr, 3, "differ from the ones", "--checkpoint")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ shards and gates


@pytest.mark.full  # sharded evaluate runs against the whole one
def test_shards_merge_to_the_numbers_of_one_run(l0_export, coco_set, whole_run, tmp_path):
    shard_dirs = []
    for k in (1, 2, 3):
        out = tmp_path / f"shard-{k}"
        result, stderr = invoke(
            l0_export, "--annotations", coco_set, "--images", coco_set.parent / "images", "--shard", f"{k}/3", "-o", out
        )
        assert result.exit_code == 0, result.output + stderr
        shard_dirs.append(out)
    assert [json.loads((d / "eval.json").read_text())["images"] for d in shard_dirs] == [2, 1, 1]
    result, stderr = invoke("--merge", *shard_dirs, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output + stderr
    merged, whole = results_of(tmp_path / "merged"), results_of(whole_run)
    assert merged == whole  # bit for bit: mIoU, size split, worst instances
    # The merged run shows the same worst-instance pictures, taken from the shards that drew them.
    merged_pictures = json.loads((tmp_path / "merged" / "eval.json").read_text())["pictures"]
    whole_pictures = json.loads((whole_run / "eval.json").read_text())["pictures"]
    assert merged_pictures == whole_pictures
    for picture in whole_pictures:
        assert (tmp_path / "merged" / picture["file"]).read_bytes() == (whole_run / picture["file"]).read_bytes()

    # A missing shard, and a shard given twice, are refused with one line.
    result, stderr = invoke("--merge", *shard_dirs[:2], "--output", tmp_path / "partial")
    assert_one_line_error(result, stderr, 2, "shard 3/3 is missing")
    result, stderr = invoke("--merge", shard_dirs[0], shard_dirs[0], shard_dirs[1], "--output", tmp_path / "twice")
    assert_one_line_error(result, stderr, 2, "shard 1/3 is given twice")
    assert not (tmp_path / "partial").exists() and not (tmp_path / "twice").exists()


@pytest.mark.full  # reads the whole evaluate run
def test_max_drop_exits_10_when_an_artifact_falls_behind(whole_run, tmp_path):
    result, stderr = invoke("--merge", whole_run, "--output", tmp_path / "x")
    assert_one_line_error(result, stderr, 2, "holds a whole run, not a shard")
    # A shard whose artifact IoUs are 3 points lower than PyTorch's on every instance.
    shard = tmp_path / "shard"
    shard.mkdir()
    data = json.loads((whole_run / "eval.json").read_text())
    data["selection"].update(shards=1, shard_indices=[1])
    ious = data["per_instance"]["ious"]
    artifact = next(name for name in ious if name != "pytorch")
    for kind in ious[artifact]:
        ious[artifact][kind] = [p - 0.03 for p in ious["pytorch"][kind]]
    (shard / "eval.json").write_text(json.dumps(data))
    result, stderr = invoke("--merge", shard, "--output", tmp_path / "gated", "--max-drop", "2.5")
    assert_one_line_error(result, stderr, 10, "dropped more than --max-drop 2.5 points")
    assert f"FAILED {artifact} [box]" in stderr
    junit = (tmp_path / "gated" / "eval-junit.xml").read_text()
    assert 'failures="2"' in junit
    result, stderr = invoke("--merge", shard, "--output", tmp_path / "passed", "--max-drop", "3.5")
    assert result.exit_code == 0, result.output + stderr
    # Per prompt kind, as validate takes it: only the box results are gated tighter than their drop.
    result, stderr = invoke("--merge", shard, "--output", tmp_path / "per-kind", "--max-drop", "box=2.5,point=3.5",
                            "--record", tmp_path / "results")
    assert_one_line_error(result, stderr, 10, "dropped more than --max-drop box=2.5,point=3.5 points")
    assert f"FAILED {artifact} [box]" in stderr and f"FAILED {artifact} [point]" not in stderr
    rows = {json.loads(p.read_text())["values"]["pipeline"]: json.loads(p.read_text())["values"]
            for p in (tmp_path / "results" / "evaluate").glob("*.json")}
    assert set(rows) == {"pytorch", artifact} and round(rows[artifact]["box_drop_points"], 1) == 3.0
    result, stderr = invoke("--merge", shard, "--output", tmp_path / "bad", "--max-drop", "mask=1")
    assert_one_line_error(result, stderr, 2, "bad --max-drop")


# ------------------------------------------------------------------------------------------------ bad input


def broken_set(coco_set: Path, tmp_path: Path, edit) -> Path:
    """A copy of the set with `edit(data, folder)` applied to its JSON (and files)."""
    folder = tmp_path / "set"
    shutil.copytree(coco_set.parent, folder)
    data = json.loads((folder / "instances.json").read_text())
    edit(data, folder)
    (folder / "instances.json").write_text(json.dumps(data))
    return folder / "instances.json"


def first_polygon(data: dict) -> dict:
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], list))


def truncate_first_image(data: dict, folder: Path) -> None:
    path = folder / "images" / data["images"][0]["file_name"]
    path.write_bytes(path.read_bytes()[:300])


BAD_SETS = {
    "not json": (lambda data, folder: None, "not COCO-format instances JSON: not JSON"),
    "no images list": (lambda data, folder: data.pop("images"), "no 'images' and 'annotations' lists"),
    "missing image file": (lambda data, folder: (folder / "images" / "scene-1.png").unlink(), "image file"),
    "empty mask": (lambda data, folder: first_polygon(data).update(segmentation=[[1, 1, 1, 1, 1, 1]]), "the mask is empty"),
    "polygon out of bounds": (lambda data, folder: first_polygon(data)["segmentation"][0].extend([500.0, 5.0]), "polygon reaches outside"),
    "rle of another size": (
        lambda data, folder: next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))["segmentation"].update(
            size=[5, 5]
        ),
        "RLE size [5, 5]",
    ),
    "rle that runs past the image": (
        lambda data, folder: next(
            a for a in data["annotations"] if isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str)
        )["segmentation"].update(counts=mask_utils.encode(np.ones((300, 300), np.uint8, order="F"))["counts"].decode()),
        "compressed RLE counts do not fit",
    ),
    "zero instances": (lambda data, folder: [a.update(iscrowd=1) for a in data["annotations"]], "zero instances after filtering"),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_annotations_are_one_line_exit_2_before_any_model_runs(case, coco_set, tmp_path, monkeypatch):
    edit, needle = BAD_SETS[case]
    path = broken_set(coco_set, tmp_path, edit)
    if case == "not json":
        path.write_text("{'images': [")
    import evsam_export.evaluation.protocol as protocol

    monkeypatch.setattr(protocol, "open_pipelines", lambda *a, **k: pytest.fail("a model was loaded for bad input"))
    out = tmp_path / "out"
    result, stderr = invoke(tmp_path / "no-models-needed", "--annotations", path, "--images", path.parent / "images", "--output", out)
    assert_one_line_error(result, stderr, 2, needle)
    assert str(path.parent) in stderr or str(path) in stderr
    assert not out.exists()


def test_truncated_image_is_one_line_and_nothing_is_written(l0_export, coco_set, tmp_path):
    path = broken_set(coco_set, tmp_path, truncate_first_image)
    out = tmp_path / "out"
    result, stderr = invoke(l0_export, "--annotations", path, "--images", path.parent / "images", "--output", out, "--prompts", "box")
    assert_one_line_error(result, stderr, 2, "cannot read image", "scene-0.png")
    assert not out.exists()


def test_bad_options_are_refused(coco_set, tmp_path):
    for args, needle in (
        (["--shard", "4/3"], "bad --shard '4/3'"),
        (["--shard", "x"], "bad --shard 'x'"),
        (["--prompts", "box,mask"], "bad --prompts"),
        (["--shard", "5/5"], "zero instances after filtering in shard 5/5"),
    ):
        result, stderr = invoke(tmp_path, "--annotations", coco_set, *args, "--output", tmp_path / "out")
        assert_one_line_error(result, stderr, 2, needle)
    with pytest.raises(UsageError, match="does not exist"):
        load_coco(tmp_path / "absent.json")


def test_images_are_read_one_at_a_time(coco_set):
    dataset = load_coco(coco_set, coco_set.parent / "images")
    stream = iter_images(dataset)
    image, _rgb, masks = next(stream)
    assert masks.shape[0] == len(image.instances) and np.array_equal(masks, decode_masks(image))
    assert stream.gi_frame is not None  # a generator: later images are not read yet


def test_lvis_and_sa1b_layouts_load(coco_set, tmp_path):
    """LVIS image records name their file by coco_url (no file_name); an SA-1B file holds one image."""
    data = json.loads(coco_set.read_text())
    record = data["images"][0]
    lvis = {
        "images": [{k: v for k, v in record.items() if k != "file_name"} | {"coco_url": f"http://x/val/{record['file_name']}"}],
        "annotations": [a for a in data["annotations"] if a["image_id"] == record["id"]],
    }
    sa1b = {"image": record, "annotations": lvis["annotations"]}
    whole = load_coco(coco_set, coco_set.parent / "images")
    expected = next(image for image in whole.images if image.image_id == record["id"]).instances
    for name, content in (("lvis.json", lvis), ("sa1b.json", sa1b)):
        (tmp_path / name).write_text(json.dumps(content))
        dataset = load_coco(tmp_path / name, coco_set.parent / "images")
        assert [i.path for i in dataset.images] == [coco_set.parent / "images" / record["file_name"]]
        assert dataset.images[0].instances == expected


def test_report_files_replace_all_or_nothing(tmp_path, monkeypatch):
    from evsam_export import output

    (tmp_path / "eval.json").write_text("old json")
    (tmp_path / "eval.md").write_text("old md")
    real_write = Path.write_text

    def failing(self, text, *args, **kwargs):
        if ".eval.md.tmp" in self.name:
            raise OSError(28, "No space left on device")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(Exception, match="no space left"):
        output.write_files_atomically(tmp_path, {"eval.json": "new json", "eval.md": "new md"})
    monkeypatch.undo()
    assert (tmp_path / "eval.json").read_text() == "old json" and (tmp_path / "eval.md").read_text() == "old md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md"]  # no temporary left behind


def test_best_only_is_the_best_candidate_of_a_full_prediction(l0_export):
    """The point protocol asks the Predictor for the best candidate only (one full-size upscale, not three)."""
    from evsam_export.data.coco import point_prompts
    from evsam_export.data.scenes import synthetic_scene
    from evsam_export.runtime import Predictor

    scene = synthetic_scene(3, 120, 160)
    points = point_prompts(np.stack(scene.masks))
    prompts = dict(point_coords=points[:, None], point_labels=np.ones((len(points), 1)), multimask_output=True)
    with Predictor(l0_export) as predictor:
        predictor.set_image(scene.rgb)
        full, best = predictor.predict(**prompts), predictor.predict(**prompts, best_only=True)
    rows = np.arange(len(points))
    assert best.masks.shape == (len(points), 1, 120, 160)
    assert np.array_equal(best.best_masks(), full.best_masks()) and np.array_equal(best.scores[:, 0], full.best_scores())
    assert np.array_equal(best.low_res_logits[:, 0], full.low_res_logits[rows, full.best_index()])
