"""Pictures a person reads, all drawn here: masks tinted and outlined over the image, the prompts drawn
(points with their labels, boxes), and a band under the image with a caption and a legend. Used by the
parity report (reference vs artifact), by anything that shows several masks of one prompt (ground truth,
PyTorch, an artifact), by `evsam-export predict` (prompt_overlay) and `segment` (segments_overlay); numpy and
Pillow (OpenCV for segment outlines) only, so the torch-free runtime can use it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Prompt colours, as `evsam-export predict` draws them: green foreground, red background, gold boxes.
POSITIVE = (0, 230, 0)
NEGATIVE = (255, 40, 40)
BOX = (255, 200, 0)
# Mask colours of a comparison, in the order they are usually given.
REFERENCE = (0, 200, 255)
ARTIFACT = (255, 0, 200)
GROUND_TRUTH = (255, 255, 255)
MASK_ALPHA = 0.35
# `evsam-export predict`'s overlay: a tint per prompt set (and its box), clicks as green/red dots, blended in
# row bands of about BAND_BYTES float32 bytes so a large photo never needs a float copy of the whole image.
PALETTE = (
    (30, 144, 255), (255, 165, 0), (186, 85, 211), (0, 206, 209), (255, 215, 0), (255, 105, 180),
    (154, 205, 50), (205, 133, 63),
)
FOREGROUND = (0, 255, 0)
BACKGROUND = (255, 0, 0)
OVERLAY_ALPHA = 0.5
BAND_BYTES = 32 * 2**20
# `evsam-export segment`'s overlay: fill opacity (outlines are opaque), and the seed of the per-mask colours so
# the same masks get the same colours on every run.
SEGMENT_ALPHA = 0.45
COLOUR_SEED = 0
# Report pictures are drawn at most this long on their long side: a 12-megapixel photo would make a page of
# 30 MB PNGs, and the difference between two masks is still visible at 1024.
MAX_SIDE = 1024


@dataclass(frozen=True)
class LabelledMask:
    label: str  # legend text, e.g. "reference (PyTorch)"
    mask: np.ndarray  # HxW bool at the image's size
    colour: tuple[int, int, int]


def tint(canvas: np.ndarray, mask: np.ndarray, colour, alpha: float) -> None:
    """Blend `colour` into the float32 HxWx3 `canvas` where `mask` is set, in place."""
    canvas[mask] = canvas[mask] * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(canvas.round(), 0, 255).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` pixels of its edge inside the image."""
    from evsam_export.data.scenes import eroded

    return mask & ~eroded(mask, width) if mask.any() else mask


def _scaled(rgb: np.ndarray, masks: Sequence[LabelledMask], max_side: int):
    """Image and masks shrunk so the long side is at most `max_side` (nearest for masks), and the scale."""
    from PIL import Image

    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return rgb, [m.mask.astype(bool) for m in masks], 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    shrunk = [np.asarray(Image.fromarray(m.mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127 for m in masks]
    return small, shrunk, scale


def draw_prompts(draw, points, labels, boxes, scale: float = 1.0, line: int = 2, radius: int = 5) -> None:
    """Boxes as gold rectangles; points as filled dots with a '+' (label 1, green) or '-' (label 0, red)."""
    for x0, y0, x1, y1 in np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.float64) * scale:
        draw.rectangle([x0, y0, x1, y1], outline=BOX, width=line)
    coords = np.asarray(points if points is not None else np.zeros((0, 2)), dtype=np.float64) * scale
    for (x, y), label in zip(coords, labels if labels is not None else []):
        fill = POSITIVE if label == 1 else NEGATIVE
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(0, 0, 0), width=max(1, line // 2))
        arm = max(2, radius - 2)
        draw.line([x - arm, y, x + arm, y], fill=(0, 0, 0), width=max(1, line // 2))
        if label == 1:
            draw.line([x, y - arm, x, y + arm], fill=(0, 0, 0), width=max(1, line // 2))


def comparison_picture(
    rgb: np.ndarray,
    masks: Sequence[LabelledMask],
    caption: str,
    points=None,
    labels=None,
    boxes=None,
    max_side: int = MAX_SIDE,
):
    """A PIL image: `rgb` with every mask tinted and outlined in its colour (overlaps mix), the prompts in
    original-image pixels drawn on top, and under it the caption and a legend of masks and prompt symbols."""
    from PIL import Image, ImageDraw

    small, shrunk, scale = _scaled(np.asarray(rgb, dtype=np.uint8), masks, max_side)
    height, width = small.shape[:2]
    canvas = small.astype(np.float32) * 0.75
    line = max(1, round(min(height, width) / 250))
    for item, mask in zip(masks, shrunk):
        tint(canvas, mask, item.colour, MASK_ALPHA)
    # Outlines widest first, so where two masks share an edge both colours show (the later one outermost).
    for rank, (item, mask) in enumerate(zip(masks, shrunk)):
        canvas[_outline(mask, (len(masks) - rank) * (line + 1))] = item.colour
    picture = Image.fromarray(to_uint8(canvas))
    draw_prompts(ImageDraw.Draw(picture), points, labels, boxes, scale, line=line + 1,
                 radius=max(4, round(min(height, width) / 60)))

    font = _font(13)
    legend = [(m.label, "mask", m.colour) for m in masks]
    if labels is not None and np.any(np.asarray(labels) == 1):
        legend.append(("positive point", "point", POSITIVE))
    if labels is not None and np.any(np.asarray(labels) == 0):
        legend.append(("negative point", "point", NEGATIVE))
    if boxes is not None and len(boxes):
        legend.append(("box prompt", "box", BOX))
    row, pad = 18, 6
    caption_lines = _wrap(caption, font, max(width, 480) - 2 * pad)
    band = pad + row * len(caption_lines) + row + pad
    sheet = Image.new("RGB", (max(width, 480), height + band), (255, 255, 255))
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    y = height + pad
    for text in caption_lines:
        draw.text((pad, y), text, fill=(0, 0, 0), font=font)
        y += row
    x = pad
    for text, symbol, colour in legend:
        if x + 16 + draw.textlength(text, font=font) > sheet.width - pad:
            break  # the legend never wraps over the caption; masks come first, so they always show
        if symbol == "mask":
            draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline=(0, 0, 0))
        elif symbol == "box":
            draw.rectangle([x, y + 2, x + 12, y + 14], outline=colour, width=2)
        else:
            draw.ellipse([x, y + 2, x + 12, y + 14], fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, y), text, fill=(0, 0, 0), font=font)
        x += 16 + int(draw.textlength(text, font=font)) + 14
    return sheet


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of `text` to lines no wider than `width` pixels."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and measure.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current] if current else lines or [""]


def prompt_overlay(rgb: np.ndarray, masks, points, boxes):
    """`evsam-export predict`'s picture: masks [B,H,W] bool tinted over `rgb` (one PALETTE colour per prompt set),
    points (x, y, label) as dots (green foreground, red background), boxes as rectangles in their set's colour."""
    from PIL import Image, ImageDraw

    height, width = rgb.shape[:2]
    image = Image.new("RGB", (width, height))
    band = max(1, BAND_BYTES // (4 * 3 * width))
    for start in range(0, height, band):
        rows = slice(start, start + band)
        canvas = rgb[rows].astype(np.float32)
        for index, mask in enumerate(masks):
            tint(canvas, mask[rows], PALETTE[index % len(PALETTE)], OVERLAY_ALPHA)
        image.paste(Image.fromarray(to_uint8(canvas)), (0, start))
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(height, width) / 200))
    radius = max(2, round(min(height, width) / 80))
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        draw.rectangle([x0, y0, x1, y1], outline=PALETTE[index % len(PALETTE)], width=line)
    for x, y, label in points:
        fill = FOREGROUND if label == 1 else BACKGROUND
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(0, 0, 0), width=max(1, line // 2))
    return image


def segments_overlay(rgb: np.ndarray, areas: Sequence[int], mask_of):
    """`evsam-export segment`'s picture: every mask (`mask_of(i)`, HxW bool; `areas[i]` its pixel count) tinted
    in its own seeded colour over `rgb`, largest first so small masks stay visible, and outlined."""
    import cv2
    from PIL import Image

    canvas = rgb.astype(np.float32)
    colours = np.random.default_rng(COLOUR_SEED).integers(40, 256, size=(len(areas), 3))
    order = sorted(range(len(areas)), key=lambda i: -areas[i])
    outlines = []
    for index in order:
        mask = mask_of(index)
        tint(canvas, mask, colours[index].astype(np.float32), SEGMENT_ALPHA)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outlines.append((contours, tuple(int(c) for c in colours[index])))
    image = np.ascontiguousarray(to_uint8(canvas))
    thickness = max(1, round(min(rgb.shape[:2]) / 300))
    for contours, colour in outlines:
        cv2.drawContours(image, contours, -1, colour, thickness)
    return Image.fromarray(image)
