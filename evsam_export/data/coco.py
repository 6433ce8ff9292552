"""COCO-format instance annotations (COCO, LVIS, SA-1B) as ground truth: masks, prompts and a deterministic
selection of images, streamed one image at a time.

    dataset = load_coco("instances_val2017.json", images="val2017", limit=500, seed=0, shard=(1, 4))
    for image, rgb, masks in iter_images(dataset):      # one image in memory at a time
        boxes = box_prompts(image)                       # [n,4] x0 y0 x1 y1 (the GT boxes)
        points = point_prompts(masks)                    # [n,2] x y (farthest from the background)

Masks are decoded with pycocotools (polygons, compressed and uncompressed RLE); annotations are checked
(and turned into compact RLE) when the file loads, so bad input fails before any model runs. Crowd
annotations (`iscrowd: 1`, groups rather than objects) are left out, as COCO's own evaluation does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export.errors import UsageError

# COCO's object-size split (pycocotools COCOeval areaRng), on the annotation's area in pixels.
SMALL_AREA = 32**2
LARGE_AREA = 96**2
AREA_BUCKETS = ("small", "medium", "large")
# Polygon vertices and boxes may reach this far past the image border (float rounding in exported
# annotations) before they count as out of bounds.
BOUNDS_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Instance:
    """One ground-truth object: its box prompt, area and mask (compressed RLE, decoded per image)."""

    annotation_id: int
    category_id: int | None
    area: float  # the annotation's `area` (COCO's size split uses it), else the mask's pixel count
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, inside the image
    rle: dict  # pycocotools compressed RLE of the image's size

    @property
    def area_bucket(self) -> str:
        return area_bucket(self.area)


@dataclass(frozen=True)
class AnnotatedImage:
    image_id: int
    path: Path
    height: int
    width: int
    instances: tuple[Instance, ...]  # by annotation id


@dataclass(frozen=True)
class Dataset:
    """The selected images of an annotation file, in image-id order, and how they were selected."""

    annotations: Path
    annotations_sha256: str
    images_dir: Path
    images: tuple[AnnotatedImage, ...]
    candidates: int  # images with at least one usable instance, before --limit and --shard
    crowd_skipped: int  # crowd annotations left out on the selected images
    limit: int | None
    seed: int
    shard: tuple[int, int] | None

    @property
    def instance_count(self) -> int:
        return sum(len(image.instances) for image in self.images)


def area_bucket(area: float) -> str:
    """COCO's small (< 32^2), medium (< 96^2) or large object size."""
    return "small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (1 <= K <= N) -> (K, N), or one UsageError line."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"bad --shard {text!r}", hint="use K/N with 1 <= K <= N, e.g. 2/8") from None
    if not 1 <= index <= count:
        raise UsageError(f"bad --shard {text!r}: K must be in 1..N", hint="use K/N with 1 <= K <= N, e.g. 2/8")
    return index, count


def select_ids(ids: list[int], limit: int | None, seed: int, shard: tuple[int, int] | None) -> list[int]:
    """A deterministic sample of `limit` ids (all when None) drawn with `seed` from the sorted ids, then every
    N-th of them from the K-th on: the N shards of one selection are disjoint and together give all of it."""
    ordered = sorted(ids)
    if limit is not None and limit < len(ordered):
        chosen = np.random.default_rng(seed).choice(len(ordered), size=limit, replace=False)
        ordered = [ordered[i] for i in sorted(chosen.tolist())]
    if shard is not None:
        index, count = shard
        ordered = ordered[index - 1 :: count]
    return ordered


# ------------------------------------------------------------------------------------------------ loading


def load_coco(
    annotations: str | Path,
    images: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
) -> Dataset:
    """Read a COCO-format instances JSON and select images (see select_ids); `images` is the folder their
    `file_name`s are relative to (default: the annotation file's folder).

    Raises UsageError (exit 2) with one line naming the file for: a file that is not COCO JSON, an image file
    that is missing, an empty or out-of-bounds mask or box, and no instance left after the selection."""
    annotations = Path(annotations)
    images_dir = Path(images) if images is not None else annotations.parent
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    data, digest = _read_json(annotations)
    if not images_dir.is_dir():
        raise UsageError(
            f"image folder {images_dir} does not exist", hint="pass --images with the folder the annotations' file_name entries are in"
        )
    records, per_image, crowd = _index(annotations, data)
    candidates = [image_id for image_id, anns in per_image.items() if anns]
    selected = select_ids(candidates, limit, seed, shard)
    if not selected:
        where = f" in shard {shard[0]}/{shard[1]}" if shard else ""
        raise UsageError(
            f"{annotations}: zero instances after filtering{where} ({len(candidates)} images with non-crowd instances)",
            hint="check the file, or use fewer shards / a larger --limit",
        )
    chosen = tuple(_annotated_image(annotations, images_dir, records[image_id], per_image[image_id]) for image_id in selected)
    return Dataset(
        annotations=annotations,
        annotations_sha256=digest,
        images_dir=images_dir,
        images=chosen,
        candidates=len(candidates),
        crowd_skipped=sum(crowd.get(image_id, 0) for image_id in selected),
        limit=limit,
        seed=seed,
        shard=shard,
    )


def _not_coco(path: Path, problem: str) -> UsageError:
    return UsageError(
        f"{path} is not COCO-format instances JSON: {problem}",
        hint="give an instances file with 'images' (id, file_name, height, width) and 'annotations' (id, image_id, bbox, segmentation)",
    )


def _read_json(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise UsageError(f"annotation file {path} does not exist", hint="pass --annotations with a COCO-format instances JSON")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_coco(path, f"not JSON ({' '.join(str(exc).split())[:80]})") from None
    if isinstance(data, dict) and isinstance(data.get("image"), dict) and "images" not in data:
        data = {"images": [data["image"]], "annotations": data.get("annotations")}  # SA-1B: one image per file
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise _not_coco(path, "no 'images' and 'annotations' lists")
    return data, hashlib.sha256(raw).hexdigest()


def _field(path: Path, record, key: str, kind, where: str):
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _not_coco(path, f"{where} has no valid {key!r}")
    return value


def _index(path: Path, data: dict) -> tuple[dict[int, dict], dict[int, list[dict]], dict[int, int]]:
    """(image id -> record, image id -> its non-crowd annotations by id, image id -> crowd annotations left out)."""
    records: dict[int, dict] = {}
    for number, record in enumerate(data["images"]):
        image_id = _field(path, record, "id", int, f"image record #{number}")
        _field(path, record, "height", int, f"image {image_id}")
        _field(path, record, "width", int, f"image {image_id}")
        if not isinstance(record.get("file_name"), str) and not isinstance(record.get("coco_url"), str):
            raise _not_coco(path, f"image {image_id} has no 'file_name'")  # LVIS records name the file by coco_url
        records[image_id] = record
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in records}
    crowd: dict[int, int] = {}
    for number, ann in enumerate(data["annotations"]):
        ann_id = _field(path, ann, "id", int, f"annotation #{number}")
        image_id = _field(path, ann, "image_id", int, f"annotation {ann_id}")
        if image_id not in records:
            raise _not_coco(path, f"annotation {ann_id} names image {image_id}, which has no image record")
        if ann.get("iscrowd", 0):
            crowd[image_id] = crowd.get(image_id, 0) + 1
            continue
        per_image[image_id].append(ann)
    for anns in per_image.values():
        anns.sort(key=lambda ann: ann["id"])
    return records, per_image, crowd


def _image_path(path: Path, images_dir: Path, record: dict) -> Path:
    from evsam_export.manifest import unsafe_relative_path

    name = record.get("file_name") or record["coco_url"].rsplit("/", 1)[-1]
    problem = unsafe_relative_path(name)
    if problem:
        raise _not_coco(path, f"image {record['id']} file_name {name!r} {problem.replace('artifact folder', 'image folder')}")
    return images_dir / name


def _annotated_image(path: Path, images_dir: Path, record: dict, anns: list[dict]) -> AnnotatedImage:
    image_path = _image_path(path, images_dir, record)
    if not image_path.is_file():
        raise UsageError(
            f"image file {image_path} is missing (image {record['id']} of {path})",
            hint="pass --images with the folder that holds the annotated images",
        )
    height, width = record["height"], record["width"]
    instances = tuple(_instance(path, ann, height, width) for ann in anns)
    return AnnotatedImage(image_id=record["id"], path=image_path, height=height, width=width, instances=instances)


def _instance(path: Path, ann: dict, height: int, width: int) -> Instance:
    """One annotation checked and turned into compressed RLE (pycocotools: polygons, RLE in both encodings)."""
    from pycocotools import mask as mask_utils

    ann_id = ann["id"]
    where = f"annotation {ann_id} of {path}"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise _not_coco(path, f"annotation {ann_id} has no 'bbox' [x, y, width, height]")
    x, y, box_w, box_h = (float(v) for v in bbox)
    tol = BOUNDS_TOLERANCE_PX
    if box_w <= 0 or box_h <= 0 or x < -tol or y < -tol or x + box_w > width + tol or y + box_h > height + tol:
        raise UsageError(f"{where}: bbox {bbox} is empty or outside the {width}x{height} image", hint="fix or drop the annotation")
    rle = _rle(path, ann, height, width, where, mask_utils)
    mask_area = float(mask_utils.area(rle))
    if mask_area == 0:
        raise UsageError(f"{where}: the mask is empty", hint="fix or drop the annotation")
    area = ann.get("area")
    area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0 else mask_area
    box = (max(0.0, x), max(0.0, y), min(float(width), x + box_w), min(float(height), y + box_h))
    category = ann.get("category_id")
    return Instance(ann_id, category if isinstance(category, int) else None, area, box, rle)


def _rle(path: Path, ann: dict, height: int, width: int, where: str, mask_utils) -> dict:
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if isinstance(p, list)]
        if (
            len(polygons) != len(segmentation)
            or not polygons
            or any(
                len(p) < 6 or len(p) % 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in polygons
            )
        ):
            raise _not_coco(path, f"annotation {ann.get('id')} has a polygon that is not a flat list of at least 3 (x, y) pairs")
        vertices = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons])
        tol = BOUNDS_TOLERANCE_PX
        if vertices.min() < -tol or vertices[:, 0].max() > width + tol or vertices[:, 1].max() > height + tol:
            raise UsageError(f"{where}: polygon reaches outside the {width}x{height} image", hint="fix or drop the annotation")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if list(size) != [height, width]:
            raise UsageError(f"{where}: RLE size {list(size)} is not the image's [{height}, {width}]", hint="fix or drop the annotation")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise UsageError(
                    f"{where}: uncompressed RLE counts do not cover the {width}x{height} image", hint="fix or drop the annotation"
                )
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, (str, bytes)):  # compressed RLE
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            try:
                x, y, box_w, box_h = mask_utils.toBbox(rle)
                valid = mask_utils.area(rle) <= height * width and x + box_w <= width and y + box_h <= height
            except Exception:  # pycocotools raises plain errors for undecodable strings
                valid = False
            if not valid:  # runs past the image's end: pycocotools would refuse it only when decoding
                raise UsageError(f"{where}: compressed RLE counts do not fit the {width}x{height} image", hint="fix or drop the annotation")
            return rle
    raise _not_coco(path, f"annotation {ann.get('id')} has no 'segmentation' (polygons or RLE)")


# ------------------------------------------------------------------------------------------------ streaming


def decode_masks(image: AnnotatedImage) -> np.ndarray:
    """The image's instance masks, [n, H, W] bool, decoded by pycocotools."""
    from pycocotools import mask as mask_utils

    try:
        masks = mask_utils.decode([instance.rle for instance in image.instances])  # [H, W, n] uint8, Fortran order
    except ValueError as exc:  # "Invalid RLE mask representation"
        raise UsageError(f"cannot decode the masks of {image.path}: {exc}", hint="fix or drop its annotations") from None
    return np.ascontiguousarray(masks.transpose(2, 0, 1)).astype(bool)


def read_annotated_image(image: AnnotatedImage) -> np.ndarray:
    """The image as HxWx3 uint8 RGB, read as `evsam-export predict` reads files; one UsageError line when it is
    unreadable, truncated or not the size its annotation record says."""
    from evsam_export.data.images import read_image_file

    rgb = read_image_file(image.path)
    if rgb.shape[:2] != (image.height, image.width):
        raise UsageError(
            f"image {image.path} is {rgb.shape[1]}x{rgb.shape[0]}, its annotation record says {image.width}x{image.height}",
            hint="use the images the annotations were made for",
        )
    return rgb


def iter_images(dataset: Dataset) -> Iterator[tuple[AnnotatedImage, np.ndarray, np.ndarray]]:
    """(image, HxWx3 uint8 RGB, [n, H, W] bool masks) for each selected image, one at a time."""
    for image in dataset.images:
        yield image, read_annotated_image(image), decode_masks(image)


# ------------------------------------------------------------------------------------------------ prompts


def box_prompts(image: AnnotatedImage) -> np.ndarray:
    """The GT boxes (COCO xywh turned into x0, y0, x1, y1 and clipped to the image), [n, 4] float64."""
    return np.asarray([instance.box for instance in image.instances], dtype=np.float64).reshape(-1, 4)


def point_prompt(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from the background, (x, y): the exact Euclidean distance transform of the
    mask padded with one background pixel (so the image border counts as background), first maximum in
    row-major order."""
    import cv2

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([col, row], dtype=np.float64)


def point_prompts(masks: np.ndarray) -> np.ndarray:
    """point_prompt of every mask, [n, 2] float64."""
    return np.stack([point_prompt(mask) for mask in masks]).reshape(-1, 2)


# ------------------------------------------------------------------------------------------------ as a data source


@dataclass(frozen=True)
class AnnotationSet:
    """An annotation file named as a data source (a suite's `[[suite.annotations]]`, a calibration file):
    its images in `images` (default: the file's folder), `limit` of them sampled with `seed`."""

    file: Path
    images: Path | None = None
    limit: int | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        return self.file.stem

    @property
    def images_dir(self) -> Path:
        return self.images if self.images is not None else self.file.parent

    def load(self) -> Dataset:
        """The selected images (load_coco: every problem is one UsageError line naming the file)."""
        return load_coco(self.file, self.images_dir, limit=self.limit, seed=self.seed)

    def fingerprint(self) -> str:
        """sha256 of the annotation file's bytes, the selection and every image file it names (path, size,
        modification time, or missing), so a cache key over it changes with the annotations and the images."""
        data, file_sha256 = _read_json(self.file)
        digest = hashlib.sha256(f"evsam-annotations-v1|{file_sha256}|{self.limit}|{self.seed}".encode())
        for record in data["images"]:
            try:
                path = _image_path(self.file, self.images_dir, record)
                stat = path.stat()
                digest.update(f"|{record['id']}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except (OSError, KeyError, TypeError, AttributeError, UsageError):
                digest.update(f"|{record!r}|missing".encode())
        return digest.hexdigest()

