"""Test data: seeded synthetic scenes written as PNG files plus a COCO-format instances JSON whose objects use
all three segmentation encodings (polygons, compressed RLE, uncompressed RLE), and one crowd annotation."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from evsam_export.data.scenes import synthetic_scene

ENCODINGS = ("polygon", "rle", "uncompressed")
# (seed, height, width): small scenes keep the tests quick; the 256x320 one has an object above COCO's 96^2
# "large" area, so all three size buckets are filled.
SCENES = ((10, 96, 128), (11, 120, 90), (16, 256, 320), (13, 100, 100))


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a (maybe empty) run of 0s."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def segmentation(mask: np.ndarray, encoding: str):
    if encoding == "polygon":
        return polygons(mask)
    if encoding == "uncompressed":
        return uncompressed_rle(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco_set(folder: Path, scenes=SCENES) -> Path:
    """PNG scenes under folder/images and folder/instances.json; returns the JSON's path."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "info": {"description": "evsam-export test scenes"},
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "shape"}],
    }
    ann_id = 100
    for index, (seed, height, width) in enumerate(scenes):
        scene = synthetic_scene(seed, height, width)
        image_id = 7 + 3 * index  # ids that are not 0..n-1, and not in file order after sorting
        name = f"scene-{index}.png"
        Image.fromarray(scene.rgb).save(images_dir / name)
        data["images"].append({"id": image_id, "file_name": name, "height": height, "width": width})
        for number, mask in enumerate(scene.masks):
            encoding = ENCODINGS[(index + number) % len(ENCODINGS)]
            seg = segmentation(mask, encoding)
            rle = mask_utils.frPyObjects(seg, height, width) if encoding != "rle" else {**seg, "counts": seg["counts"].encode()}
            rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
            ann_id += 1
            data["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": seg,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                }
            )
        # A crowd region (the whole first object again) that the protocol must leave out.
        ann_id += 1
        first = scene.masks[0]
        rle = mask_utils.encode(np.asfortranarray(first.astype(np.uint8)))
        data["annotations"].append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": uncompressed_rle(first),
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            }
        )
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


def write_model_coco_set(export: Path, folder: Path, scenes=SCENES[:2]) -> Path:
    """Scenes annotated with what the folder's fp32 pipeline segments for each object's box (compressed RLE).

    Synthetic weights segment the prompt, not the object (PyTorch mIoU ~5 % on write_coco_set's masks), so a
    drop against those is noise; against its own box masks PyTorch scores ~70 % box mIoU, and an artifact
    that segments differently loses measurable points."""
    from evsam_export.runtime.predictor import Predictor

    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "shape"}]}
    with Predictor(export) as predictor:
        for index, (seed, height, width) in enumerate(scenes):
            scene = synthetic_scene(seed, height, width)
            Image.fromarray(scene.rgb).save(images_dir / f"scene-{index}.png")
            data["images"].append({"id": index + 1, "file_name": f"scene-{index}.png", "height": height, "width": width})
            predictor.set_image(scene.rgb)
            for mask in scene.masks:
                ys, xs = np.nonzero(mask)
                box = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=np.float32)
                predicted = predictor.predict(boxes=box, multimask_output=False).best_masks()[0]
                if predicted.sum() < 16:  # too small to be an object worth scoring
                    continue
                seg = segmentation(predicted, "rle")
                rle = {**seg, "counts": seg["counts"].encode()}
                data["annotations"].append({
                    "id": len(data["annotations"]) + 1, "image_id": index + 1, "category_id": 1, "iscrowd": 0, "segmentation": seg,
                    "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                })
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


def main() -> None:
    """`PYTHONPATH=. python tests/coco_scenes.py OUT --count N --size HxW`: a larger set for measuring evaluate."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", default="480x640", help="HxW of every scene (COCO val2017 images are mostly 480x640)")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    print(write_coco_set(args.output, tuple((100 + i, height, width) for i in range(args.count))))


if __name__ == "__main__":
    main()
