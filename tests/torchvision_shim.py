"""Test shim: the few torchvision functions upstream's automatic mask generator and predictor call, in plain
torch / Pillow, so upstream's `EfficientViTSamAutomaticMaskGenerator` runs as the reference where torchvision
cannot be installed (PyPI's torchvision does not import beside torch 2.13 here).

Each one follows torchvision's documented semantics for the inputs upstream gives it:
- ops.boxes.nms / batched_nms: greedy NMS, candidates in descending score order (a stable sort, as
  torchvision's CPU kernel), IoU in the boxes' dtype with areas (x1 - x0) * (y1 - y0), a box suppressed when
  its IoU with a kept box is > iou_threshold; batched_nms offsets each category's boxes apart (torchvision's
  "coordinate trick"), so categories never suppress each other. box_area: (x1 - x0) * (y1 - y0).
- transforms.ToTensor (HWC uint8 -> CHW float32 / 255), Normalize ((x - mean) / std per channel), Compose;
  transforms.functional.resize of a PIL image (PIL bilinear, which torchvision calls for PIL input) and
  to_pil_image of an HWC uint8 array.
Used only by tests (tests/export/test_segment.py); never by the package.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = box_area(boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for index in order.tolist():
        if suppressed[index]:
            continue
        keep.append(index)
        width = (torch.minimum(x1[index], x1) - torch.maximum(x0[index], x0)).clamp(min=0)
        height = (torch.minimum(y1[index], y1) - torch.maximum(y0[index], y0)).clamp(min=0)
        inter = width * height
        iou = inter / (areas[index] + areas - inter)
        suppressed |= iou.double() > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class ToTensor:
    def __call__(self, image) -> torch.Tensor:
        array = np.asarray(image)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div(255)


class Normalize:
    def __init__(self, mean, std) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


def resize(image: Image.Image, size) -> Image.Image:
    height, width = size
    return image.resize((width, height), Image.BILINEAR)


def to_pil_image(array) -> Image.Image:
    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def patch_upstream(monkeypatch) -> None:
    """Point upstream's module-level torchvision names at this shim (whatever stand-ins they were imported with)."""
    import types

    from upstream import load_upstream_zoo

    load_upstream_zoo()
    import efficientsam.models.efficientvit.sam as upstream_sam
    import efficientsam.segment_anything.automatic_mask_generator as upstream_amg

    transforms = types.SimpleNamespace(Compose=Compose, ToTensor=ToTensor, Normalize=Normalize)
    monkeypatch.setattr(upstream_sam, "transforms", transforms)
    monkeypatch.setattr(upstream_sam, "resize", resize)
    monkeypatch.setattr(upstream_sam, "to_pil_image", to_pil_image)
    monkeypatch.setattr(upstream_amg, "batched_nms", batched_nms)
    monkeypatch.setattr(upstream_amg, "box_area", box_area)
