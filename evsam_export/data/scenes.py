"""Deterministic images and prompts for parity and calibration (numpy only; scikit-image is imported
only to load its sample photos).

Synthetic scenes come with ground-truth masks, so a prompt can target a real object and a parity report
can also score the task (docs/design.md "Parity inputs"). Everything derives from an integer seed through
np.random.default_rng, so the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from evsam_export.data.coco import AnnotationSet
from evsam_export.data.images import ImageFolder
from evsam_export.errors import RuntimeUnavailable, UsageError
from evsam_export.model.processing import as_rgb_uint8

PROMPT_KINDS = ("point", "points_neg", "box", "box_point", "boxes16", "mask_refine", "multimask")

# Loaders that ship inside the scikit-image wheel and work offline (docs/design.md "Offline sample photos"). Others (e.g. `skin`,
# `eagle`) fetch over the network through pooch, which a parity run must never depend on.
SAMPLE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text",
)

MIN_SCENE_SIDE = 32
MAX_SCENE_SIDE = 4096


@dataclass(frozen=True)
class SyntheticImageSpec:
    """A seeded synthetic scene of the given size (with ground-truth masks)."""

    seed: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"synthetic-{self.seed}-{self.height}x{self.width}"


@dataclass(frozen=True)
class SampleImageSpec:
    """A scikit-image sample photo at its own size (no ground truth)."""

    name: str


# A folder (data.images.ImageFolder) or an annotation file (data.coco.AnnotationSet) stands for many images:
# parity.reference.build_cases expands it.
ImageSpec = SyntheticImageSpec | SampleImageSpec | ImageFolder | AnnotationSet


@dataclass(frozen=True)
class ValidationImage:
    name: str
    rgb: np.ndarray  # HxWx3 uint8
    masks: tuple[np.ndarray, ...] | None  # ground-truth HxW bool masks (synthetic scenes, annotated images)
    source: str = ""  # the file it was read from, for images of a folder or an annotation file
    # Annotated images only: the GT boxes [n,4] x0 y0 x1 y1 of `masks`; box and point prompts then come from
    # the ground truth (data.coco: the GT box; the mask pixel farthest from the background).
    boxes: np.ndarray | None = None


@dataclass(frozen=True)
class PromptSet:
    """One decoder query in original-image pixels, ready for processing.build_prompt_tokens.

    points [N,2] float32 (x, y) with labels [N] float32 (1 foreground, 0 background), or None for box-only
    prompts; boxes [B,4] float32 (x0, y0, x1, y1), or None. B > 1 is one batch of B prompts. `refine` asks
    the validator to run the query twice, feeding the first low-res mask back as mask_input."""

    kind: str
    points: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray | None
    multimask: bool
    refine: bool


# ---------------------------------------------------------------------------------------------- scenes


def _textured_background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Two-colour gradient plus stripes: texture gives the encoder structure to respond to, unlike a flat
    background, and keeps the objects distinguishable by colour."""
    height, width = yy.shape
    start, end = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1.0) / 2.0
    image = start + (end - start) * ramp[..., None]
    period = rng.uniform(8, 48)
    stripe_angle = rng.uniform(0, np.pi)
    phase = (np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) * (2 * np.pi / period)
    return image + rng.uniform(8, 24) * np.sin(phase)[..., None]


def _ellipse(rng, yy, xx, cy, cx, radius):
    ry, rx = radius * rng.uniform(0.5, 1.0, size=2)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _rectangle(rng, yy, xx, cy, cx, radius):
    half_h, half_w = radius * rng.uniform(0.4, 1.0, size=2)
    theta = rng.uniform(0, np.pi / 2)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)


def _polygon(rng, yy, xx, cy, cx, radius):
    """Star-shaped polygon (sorted angles, random radii) rasterised by even-odd ray casting, which also
    handles the concave ones."""
    count = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.5, 1.0, count)
    vx, vy = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    inside = np.zeros(yy.shape, dtype=bool)
    for x0, y0, x1, y1 in zip(vx, vy, np.roll(vx, -1), np.roll(vy, -1)):
        crosses = (y0 > yy) != (y1 > yy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_y = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_at_y)
    return inside


_SHAPES = (_ellipse, _rectangle, _polygon)


def _distinct_colour(rng: np.random.Generator, taken: list[np.ndarray]) -> np.ndarray:
    """A flat colour at least 60 (of 255) away from the background and earlier shapes when possible, so
    every object has an edge the encoder can see."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(32):
        if all(np.linalg.norm(colour - other) >= 60 for other in taken):
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def synthetic_scene(seed: int, height: int, width: int) -> ValidationImage:
    """Textured background with 2-5 flat-coloured ellipses / rectangles / polygons, plus Gaussian noise.

    Returns the uint8 RGB image and one boolean ground-truth mask per visible object (what is left of
    it after later shapes are painted over it). A candidate shape is redrawn if it would hide more than
    half of an earlier object or lie mostly under earlier ones, so every mask stays a real object."""
    if not (MIN_SCENE_SIDE <= height <= MAX_SCENE_SIDE and MIN_SCENE_SIDE <= width <= MAX_SCENE_SIDE):
        raise ValueError(f"scene size {height}x{width} outside {MIN_SCENE_SIDE}..{MAX_SCENE_SIDE}")
    rng = np.random.default_rng(seed)
    # Pixel centres, as SAM's prompt encoder reads coordinates (it adds 0.5 to the integer pixel index).
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    image = _textured_background(rng, yy, xx)
    colours = [image.reshape(-1, 3).mean(axis=0)]
    short_side = min(height, width)
    min_area = max(16, int(0.002 * height * width))
    visible: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, 6))):
        for _attempt in range(20):
            radius = short_side * rng.uniform(0.12, 0.3)
            cy, cx = rng.uniform(radius * 0.5, height - radius * 0.5), rng.uniform(radius * 0.5, width - radius * 0.5)
            shape = _SHAPES[int(rng.integers(len(_SHAPES)))](rng, yy, xx, cy, cx, radius)
            area = np.count_nonzero(shape)
            if area < min_area:
                continue
            hides_too_much = any(np.count_nonzero(mask & shape) > np.count_nonzero(mask) // 2 for mask in visible)
            mostly_covered = any(np.count_nonzero(mask & shape) > area // 4 for mask in visible)
            if not (hides_too_much or mostly_covered):
                break
        else:
            continue  # this scene has no room left for another object
        visible = [mask & ~shape for mask in visible] + [shape]
        colour = _distinct_colour(rng, colours)
        colours.append(colour)
        image[shape] = colour
    image += rng.normal(0.0, 6.0, image.shape)
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)
    masks = tuple(mask for mask in visible if np.count_nonzero(mask) >= min_area)
    return ValidationImage(name=SyntheticImageSpec(seed, height, width).name, rgb=rgb, masks=masks)


def sample_image(name: str) -> np.ndarray:
    """A scikit-image sample photo as HxWx3 uint8 (grayscale stacked to three channels, alpha dropped)."""
    if name not in SAMPLE_IMAGES:
        raise UsageError(f"unknown sample image {name!r}", hint=f"choose one of {', '.join(SAMPLE_IMAGES)}")
    try:
        import skimage.data
    except ModuleNotFoundError as error:
        raise RuntimeUnavailable(
            f"sample image {name!r} needs scikit-image ({error})", hint="pip install scikit-image"
        ) from error
    return as_rgb_uint8(getattr(skimage.data, name)())


def load_image_spec(spec: ImageSpec) -> ValidationImage:
    """Resolve a suite's image spec to its name, RGB pixels and ground-truth masks (None for photos)."""
    if isinstance(spec, SyntheticImageSpec):
        return synthetic_scene(spec.seed, spec.height, spec.width)
    if isinstance(spec, SampleImageSpec):
        return ValidationImage(name=spec.name, rgb=sample_image(spec.name), masks=None)
    raise TypeError(f"not an image spec: {spec!r}")


def annotated_validation_images(source: AnnotationSet, prefix: str = "") -> Iterator:
    """A ValidationImage per selected image of an annotation file, one at a time, with its GT masks and boxes."""
    from evsam_export.data.coco import box_prompts, iter_images

    dataset = source.load()
    for image, rgb, masks in iter_images(dataset):
        name = prefix + image.path.relative_to(dataset.images_dir).as_posix()
        yield ValidationImage(name=name, rgb=rgb, masks=tuple(masks), source=str(image.path), boxes=box_prompts(image))


# --------------------------------------------------------------------------------------------- prompts


def eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour erosion by `steps` pixels: points away from the edge test the object, not the edge."""
    out = mask.copy()
    for _ in range(steps):
        shrunk = out.copy()
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        if not shrunk.any():
            break
        out = shrunk
    return out


def _points_in(rng: np.random.Generator, region: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct pixels (x, y) drawn from a boolean region (with repeats only if it is tiny)."""
    rows, cols = np.nonzero(region)
    picks = rng.choice(rows.size, size=count, replace=rows.size < count)
    return np.stack([cols[picks], rows[picks]], axis=1).astype(np.float32)


def _box_of(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)


def _jitter_box(rng: np.random.Generator, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Move each edge by up to ±5 % of the box size (docs/design.md "Parity inputs"), then clip inside the image while
    keeping x0 < x1 and y0 < y1."""
    size = np.maximum(np.array([box[2] - box[0], box[3] - box[1]] * 2), 1.0)
    out = box + rng.uniform(-0.05, 0.05, 4) * size
    out[[0, 2]] = np.clip(out[[0, 2]], 0, width - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, height - 1)
    if out[2] - out[0] < 1:
        out[0], out[2] = (out[0], out[0] + 1) if out[0] + 1 <= width - 1 else (out[2] - 1, out[2])
    if out[3] - out[1] < 1:
        out[1], out[3] = (out[1], out[1] + 1) if out[1] + 1 <= height - 1 else (out[3] - 1, out[3])
    return out


def _central_region(height: int, width: int, fraction: float) -> np.ndarray:
    """Boolean mask of the centred box covering `fraction` of each side: the stand-in object for photos
    without ground truth (photographers centre their subject)."""
    region = np.zeros((height, width), dtype=bool)
    top, left = int(height * (1 - fraction) / 2), int(width * (1 - fraction) / 2)
    region[top : max(top + 1, height - top), left : max(left + 1, width - left)] = True
    return region


def _random_box(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    box_h, box_w = rng.uniform(0.1, 0.6) * height, rng.uniform(0.1, 0.6) * width
    y0, x0 = rng.uniform(0, height - box_h), rng.uniform(0, width - box_w)
    return _jitter_box(rng, np.array([x0, y0, x0 + box_w, y0 + box_h]), height, width)


def prompts_for(kind: str, rgb: np.ndarray, gt_masks=None, seed: int = 0, gt_boxes: np.ndarray | None = None) -> PromptSet:
    """The prompt set of one `kind` (PROMPT_KINDS) for an image, in original-image pixels.

    With ground-truth masks the prompt targets one object (foreground points well inside it, boxes its
    jittered bounding box); without, it targets the central half of the image. With annotation boxes
    (`gt_boxes`, one per mask) the `box` prompt is the target's GT box and the `point` prompt its pixel
    farthest from the background, as `evaluate` prompts; other kinds are generated as above. Deterministic
    in (seed, kind); points and boxes always lie inside the image (0..W-1, 0..H-1)."""
    if kind not in PROMPT_KINDS:
        raise UsageError(f"unknown prompt kind {kind!r}", hint=f"choose one of {', '.join(PROMPT_KINDS)}")
    height, width = np.asarray(rgb).shape[:2]
    rng = np.random.default_rng([seed, PROMPT_KINDS.index(kind)])
    objects = [np.asarray(mask, dtype=bool) for mask in (gt_masks or ()) if np.any(mask)]
    if objects:
        target_index = int(rng.integers(len(objects)))
        target = objects[target_index]
        if gt_boxes is not None and kind in ("box", "point"):
            return _ground_truth_prompt(kind, target, np.asarray(gt_boxes)[target_index], height, width)
        background = ~np.logical_or.reduce(objects)
    else:
        target = _central_region(height, width, 0.5)
        background = ~_central_region(height, width, 0.8)
    if not background.any():
        background = ~target if (~target).any() else np.ones_like(target)
    inner = eroded(target, steps=max(1, min(height, width) // 50))

    def foreground(count: int) -> np.ndarray:
        return _points_in(rng, inner, count)

    def target_box() -> np.ndarray:
        return _jitter_box(rng, _box_of(target), height, width)[None]

    one_label = np.ones(1, dtype=np.float32)
    points = labels = boxes = None
    if kind in ("point", "mask_refine", "multimask"):
        points, labels = foreground(1), one_label
    elif kind == "points_neg":
        points = np.concatenate([foreground(2), _points_in(rng, background, 1)])
        labels = np.array([1, 1, 0], dtype=np.float32)
    elif kind == "box":
        boxes = target_box()
    elif kind == "box_point":
        boxes, points, labels = target_box(), foreground(1), one_label
    elif kind == "boxes16":
        # One batch of 16: every ground-truth object once, then random boxes (decoder profile max B=16).
        from_objects = [_jitter_box(rng, _box_of(mask), height, width) for mask in objects[:16]]
        boxes = np.stack(from_objects + [_random_box(rng, height, width) for _ in range(16 - len(from_objects))])
    return PromptSet(
        kind=kind,
        points=points,
        labels=labels,
        boxes=None if boxes is None else boxes.astype(np.float32),
        multimask=kind == "multimask",
        refine=kind == "mask_refine",
    )


def _ground_truth_prompt(kind: str, mask: np.ndarray, box: np.ndarray, height: int, width: int) -> PromptSet:
    """An annotated object's own prompt: its GT box, or one foreground point (data.coco.point_prompt)."""
    from evsam_export.data.coco import point_prompt

    if kind == "box":
        boxes = np.clip(np.asarray(box, dtype=np.float64), 0, [width - 1, height - 1, width - 1, height - 1])
        return PromptSet(kind, None, None, boxes[None].astype(np.float32), multimask=False, refine=False)
    point = point_prompt(mask)[None].astype(np.float32)
    return PromptSet(kind, point, np.ones(1, dtype=np.float32), None, multimask=False, refine=False)
