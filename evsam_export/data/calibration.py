"""Deterministic calibration feeds for post-training quantization, and thin adapters to the two PTQ tools.

Calibration data is just a list of feed dicts per component (docs/precision.md
"Calibration data"): `encoder_calibration_feeds` gives `{"input_image": [1,3,S,S]}` made by the shared preprocessing from
seeded synthetic scenes and the offline scikit-image photos; `decoder_calibration_feeds` gives decoder feeds
whose `image_embeddings` are what the fp32 encoder *really* produces for those images (optimum-intel records
the decoder's inputs by running the encoder; random embeddings would calibrate the wrong ranges) and whose
prompts are the parity prompts (points and boxes) in PyTorch SAM's token layout.

The images are disjoint from the parity suites' (validators/*.toml use synthetic seeds 0-5 and seven named
photos), so a gate never scores an artifact on the images it was calibrated on. Everything derives
from (count, seed), so the same call gives the same bytes on every machine; `calibration_fingerprint`
hashes the feeds for the manifest and for cache keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.data.coco import AnnotationSet
from evsam_export.data.images import FolderImage, ImageFolder, SkippedImage, files_sha256, read_folder
from evsam_export.data.scenes import ValidationImage, annotated_validation_images, prompts_for, sample_image, synthetic_scene
from evsam_export.errors import RuntimeUnavailable, UsageError
from evsam_export.files import sha256_file
from evsam_export.model import processing
from evsam_export.model.variants import Variant, get_variant

# Offline scikit-image photos used for calibration (docs/design.md "Offline sample photos"), in the order they are taken: varied
# content (microscopy, coins, astronomy, objects, texture, a logo with alpha) and aspect ratios. Every photo a
# parity suite scores on (validators/*.toml: astronaut, camera, chelsea = cat, coffee, page, rocket, text)
# is left out on purpose.
CALIBRATION_PHOTOS = (
    "immunohistochemistry", "coins", "hubble_deep_field", "clock", "colorwheel", "moon", "cell", "brick",
    "retina", "gravel", "logo", "grass",
)
# Synthetic scene seeds start here, far from the suites' seeds (0, 1, ...).
SCENE_SEED_BASE = 10_000
# Scene sizes (H, W), picked per scene from the seed: landscape, portrait, square, very wide and very tall,
# so both padding directions are seen by the calibrator.
SCENE_SIZES = ((480, 640), (768, 320), (512, 512), (384, 768), (640, 480), (300, 900))
# Prompt kinds each calibration image contributes to the decoder feeds: one click and one box per image
# (the two ways apps prompt SAM). boxes16 would triple the work for ranges the single box already covers.
DECODER_PROMPT_KINDS = ("point", "box")


@dataclass(frozen=True)
class CalibrationImage:
    name: str  # "synthetic-10003-480x640", a scikit-image loader name, or a file's path in the folder
    source: str  # synthetic | skimage | folder
    image: ValidationImage


def is_annotation_file(source: str | Path) -> bool:
    """calibration_data names a COCO-format annotation file (its images beside it) rather than a folder."""
    return Path(source).expanduser().is_file()


def annotation_calibration_images(file: str | Path, count: int, seed: int = 0) -> list[CalibrationImage]:
    """Up to `count` annotated images of a COCO-format file (data.coco.load_coco, `file_name`s relative to the
    file's folder; sampled with `seed`), with their GT masks and boxes for the decoder's prompts."""
    source = AnnotationSet(Path(file).expanduser(), limit=count, seed=seed)
    return [CalibrationImage(image.name, "annotations", image) for image in annotated_validation_images(source)]


def folder_calibration_images(folder: str | Path, count: int, seed: int = 0) -> tuple[list[CalibrationImage], list[SkippedImage]]:
    """Up to `count` images of the user's folder (a deterministic sample drawn with `seed` when it holds
    more), and the files skipped as unreadable. UsageError when the folder is missing, empty, or has no
    readable image among the sample. A COCO-format annotation file instead of a folder gives its annotated
    images (annotation_calibration_images; an unreadable one is an error there, as in `evaluate`)."""
    if is_annotation_file(folder):
        return annotation_calibration_images(folder, count, seed), []
    images, skipped = [], []
    spec = ImageFolder(Path(folder), limit=count, seed=seed)
    for item in read_folder(spec):
        if isinstance(item, FolderImage):
            images.append(CalibrationImage(item.name, "folder", ValidationImage(item.name, item.rgb, None, str(item.path))))
        else:
            skipped.append(item)
    if not images:
        raise UsageError(f"no readable image among the {len(skipped)} calibration files sampled from {spec.folder}",
                         hint="check the files, or point calibration_data at another folder")
    return images, skipped


def calibration_images(count: int, seed: int = 0, photos: bool = True, folder: str | Path | None = None) -> list[CalibrationImage]:
    """`count` images alternating synthetic scene / photo (synthetic only if `photos` is False or
    scikit-image is missing). The seed rotates the photo list and picks the scene seeds and sizes.
    With `folder`, the user's images instead (folder_calibration_images; `photos` is ignored)."""
    if count < 1:
        raise ValueError(f"calibration needs at least one image, got count={count}")
    if folder is not None:
        return folder_calibration_images(folder, count, seed)[0]
    rng = np.random.default_rng([seed, 0xCA1])
    if photos:
        try:
            import skimage.data  # noqa: F401
        except ModuleNotFoundError:
            photos = False
    images: list[CalibrationImage] = []
    scene_index = photo_index = 0
    for index in range(count):
        if photos and index % 2 == 1:
            name = CALIBRATION_PHOTOS[(seed + photo_index) % len(CALIBRATION_PHOTOS)]
            photo_index += 1
            try:
                rgb = sample_image(name)
            except RuntimeUnavailable:
                photos = False
            else:
                images.append(CalibrationImage(name, "skimage", ValidationImage(name=name, rgb=rgb, masks=None)))
                continue
        height, width = SCENE_SIZES[int(rng.integers(len(SCENE_SIZES)))]
        scene = synthetic_scene(SCENE_SEED_BASE + seed * 1000 + scene_index, height, width)
        scene_index += 1
        images.append(CalibrationImage(scene.name, "synthetic", scene))
    return images


def _variant(variant: Variant | str) -> Variant:
    return get_variant(variant) if isinstance(variant, str) else variant


def encoder_calibration_feeds(variant: Variant | str, count: int, seed: int = 0, photos: bool = True,
                              folder: str | Path | None = None) -> list[dict[str, np.ndarray]]:
    """[{"input_image": [1,3,S,S] float32}] through the shared preprocessing (what every runner is fed)."""
    size = _variant(variant).encoder_size
    return [{"input_image": processing.preprocess_image(item.image.rgb, size)[0]}
            for item in calibration_images(count, seed, photos, folder)]


def _embed(encoder) -> Callable[[np.ndarray], np.ndarray]:
    """A runner (evsam_export.runners: `.infer(feeds)`) or a plain callable input_image -> embeddings."""
    if hasattr(encoder, "infer"):
        return lambda image: encoder.infer({"input_image": image})["image_embeddings"]
    return encoder


def decoder_calibration_feeds(
    encoder,
    variant: Variant | str,
    count: int,
    seed: int = 0,
    decoder_inputs: Sequence | None = None,
    kinds: Sequence[str] = DECODER_PROMPT_KINDS,
    photos: bool = True,
    folder: str | Path | None = None,
) -> list[dict[str, np.ndarray]]:
    """Decoder feeds for `count` images x `kinds` prompt kinds (count * len(kinds) feeds).

    `encoder` is the fp32 encoder (an OrtRunner over encoder.fp32.onnx, or any callable image -> embeddings):
    the embeddings are the encoder's real output for each calibration image. `decoder_inputs` (the decoder
    artifact's TensorSpecs or names) decides the profile: `orig_im_size` is fed only if the graph has it
    (the tensorrt profile has none). Prompts come from data.scenes.prompts_for through
    processing.build_prompt_tokens, so the padding-point rule is PyTorch SAM's."""
    size = _variant(variant).encoder_size
    embed = _embed(encoder)
    inputs = contract.decoder_spec("sam") if decoder_inputs is None else decoder_inputs
    feeds = []
    for index, item in enumerate(calibration_images(count, seed, photos, folder)):
        input_image, geometry = processing.preprocess_image(item.image.rgb, size)
        embeddings = np.asarray(embed(input_image), dtype=np.float32)
        for kind_index, kind in enumerate(kinds):
            prompts = prompts_for(kind, item.image.rgb, item.image.masks, seed=seed * 7919 + index * len(kinds) + kind_index,
                                  gt_boxes=item.image.boxes)
            tokens = processing.build_prompt_tokens(geometry, prompts.points, prompts.labels, prompts.boxes)
            feeds.append(contract.decoder_feeds(
                inputs,
                image_embeddings=embeddings,
                point_coords=tokens.point_coords,
                point_labels=tokens.point_labels,
                original_size=geometry.original_size,
            ))
    return feeds


def describe_calibration(count: int, seed: int = 0, photos: bool = True, folder: str | Path | None = None) -> dict:
    """What a manifest records about the images behind a calibration set (names and sources). For a folder:
    the files used, their count and the sha256 of their sorted list (path and content sha256 of each), and
    the unreadable files skipped."""
    if folder is not None:
        images, skipped = folder_calibration_images(folder, count, seed)
        names = [item.name for item in images]
        annotated = is_annotation_file(folder)
        described = {
            "source": "annotations" if annotated else "folder",
            "folder": str(Path(folder).expanduser().parent if annotated else folder),
            "count": len(images),
            "seed": seed,
            "files_sha256": files_sha256(Path(folder).expanduser().parent if annotated else Path(folder), names),
            "images": names,
            "skipped": [item.to_json() for item in skipped],
        }
        if annotated:
            described.update(annotations=str(folder), annotations_sha256=sha256_file(Path(folder).expanduser()))
        return described
    images = calibration_images(count, seed, photos)
    return {
        "source": "built-in",
        "count": len(images),
        "seed": seed,
        "synthetic": sum(1 for i in images if i.source == "synthetic"),
        "photos": sum(1 for i in images if i.source == "skimage"),
        "images": [i.name for i in images],
    }


def warn_skipped(described: dict, reporter) -> None:
    """One `warning:` line per unreadable calibration file (describe_calibration lists them in the manifest)."""
    for item in described.get("skipped", []):
        reporter.line(f"warning: {item['reason']} (skipped for calibration; listed in the manifest)")


def calibration_fingerprint(feeds: Iterable[dict[str, np.ndarray]]) -> str:
    """sha256 (all 64 hex digits) of the feeds: names, dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256(b"evsam-calibration-v1")
    for feed in feeds:
        digest.update(b"|feed")
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ adapters


def as_ort_reader(feeds: Sequence[dict[str, np.ndarray]]):
    """An onnxruntime.quantization.CalibrationDataReader over `feeds` (rewindable; supports set_range, so
    the CalibStridedMinMax option works)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self, items: Sequence[dict[str, np.ndarray]]) -> None:
            self.items = list(items)
            self.start, self.end = 0, len(self.items)
            self.position = 0

        def get_next(self) -> dict | None:
            if self.start + self.position >= self.end:
                return None
            item = self.items[self.start + self.position]
            self.position += 1
            return item

        def rewind(self) -> None:
            self.position = 0

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end, self.position = start_index, min(end_index, len(self.items)), 0

        def __len__(self) -> int:
            return len(self.items)

    return FeedReader(feeds)


def as_nncf_dataset(feeds: Sequence[dict[str, np.ndarray]]):
    """An nncf.Dataset whose items are the feed dicts (OpenVINO models take dicts keyed by input name)."""
    try:
        import nncf
    except ModuleNotFoundError as exc:
        raise RuntimeUnavailable(f"NNCF calibration needs nncf ({exc})", hint="pip install evsam-export[openvino]") from exc
    return nncf.Dataset(list(feeds))
