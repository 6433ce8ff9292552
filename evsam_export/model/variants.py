"""The five EfficientViT-SAM variants as data (no torch import: the CLI and the runtime read this)."""

from __future__ import annotations

from dataclasses import dataclass

# Prompts, low-res masks and mask upscaling always live in SAM's 1024-long-side frame, even for the
# 512-px encoders (upstream: EfficientViTSam.image_size = (1024, encoder_size)).
PROMPT_FRAME = 1024
EMBEDDING_SIZE = 64
EMBEDDING_DIM = 256
LOW_RES_MASK_SIZE = 256
NUM_MASK_TOKENS = 4
# PyTorch SAM's point labels: a click's foreground/background, a box's two corners, padding.
LABEL_FOREGROUND = 1.0
LABEL_BACKGROUND = 0.0
LABEL_BOX_TOP_LEFT = 2.0
LABEL_BOX_BOTTOM_RIGHT = 3.0
LABEL_PADDING = -1.0
# Upstream's model zoo sets eps=1e-6 on every BatchNorm/LayerNorm after construction.
NORM_EPS = 1e-6
# ImageNet statistics on the 0..255 scale, as upstream's Normalize(mean/255, std/255) after ToTensor.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Variant:
    name: str
    encoder_size: int  # square encoder input after resize-longest-side + pad
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    blocks: tuple[str, ...]  # per stage: "res", "fmb", "mb", "att@5", "att@3"
    expands: tuple[float, ...]
    fewer_norm: tuple[bool, ...]
    neck_stages: tuple[str, ...]  # backbone stages fed to the neck, deepest first
    neck_in_channels: tuple[int, ...]
    neck_depth: int
    neck_expand: float

    @property
    def checkpoint_name(self) -> str:
        return f"efficientvit_sam_{self.name}.pt"


_L_BLOCKS = ("res", "fmb", "fmb", "mb", "att")
_L_EXPANDS = (1, 4, 4, 4, 6)
_L_FEWER_NORM = (False, False, False, True, True)
_XL_BLOCKS = ("res", "fmb", "fmb", "fmb", "att@3", "att@3")
_XL_EXPANDS = (1, 4, 4, 4, 4, 6)
_XL_FEWER_NORM = (False, False, False, False, True, True)


def _l_variant(name: str, depths: tuple[int, ...], neck_depth: int) -> Variant:
    return Variant(
        name=name,
        encoder_size=512,
        widths=(32, 64, 128, 256, 512),
        depths=depths,
        blocks=_L_BLOCKS,
        expands=_L_EXPANDS,
        fewer_norm=_L_FEWER_NORM,
        neck_stages=("stage4", "stage3", "stage2"),
        neck_in_channels=(512, 256, 128),
        neck_depth=neck_depth,
        neck_expand=1,
    )


def _xl_variant(name: str, depths: tuple[int, ...], neck_depth: int) -> Variant:
    return Variant(
        name=name,
        encoder_size=1024,
        widths=(32, 64, 128, 256, 512, 1024),
        depths=depths,
        blocks=_XL_BLOCKS,
        expands=_XL_EXPANDS,
        fewer_norm=_XL_FEWER_NORM,
        neck_stages=("stage5", "stage4", "stage3"),
        neck_in_channels=(1024, 512, 256),
        neck_depth=neck_depth,
        neck_expand=4,
    )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _l_variant("l0", (1, 1, 1, 4, 4), 4),
        _l_variant("l1", (1, 1, 1, 6, 6), 8),
        _l_variant("l2", (1, 2, 2, 8, 8), 12),
        _xl_variant("xl0", (0, 1, 1, 2, 3, 3), 6),
        _xl_variant("xl1", (1, 2, 2, 4, 6, 6), 12),
    )
}
VARIANT_NAMES = tuple(VARIANTS)


def get_variant(name: str) -> Variant:
    from evsam_export.errors import UsageError

    key = name.strip().lower().removeprefix("efficientvit-sam-").removeprefix("efficientvit_sam_")
    if key not in VARIANTS:
        raise UsageError(
            f"unknown variant {name!r}",
            hint=f"choose one of {', '.join(VARIANT_NAMES)}",
        )
    return VARIANTS[key]
