"""EfficientViT-SAM image encoder: the large EfficientViT backbone, the SAM neck and the final LayerNorm2d."""

from __future__ import annotations

import torch
from torch import nn

from evsam_export.model.layers import (
    LOCAL_BLOCKS,
    ConvLayer,
    EfficientViTBlock,
    LayerNorm2d,
    OpSequential,
    ResidualBlock,
    UpSample,
)
from evsam_export.model.variants import EMBEDDING_DIM, EMBEDDING_SIZE, NORM_EPS, Variant

ACT = "gelu"
QKV_DIM = 32


class EfficientViTLargeBackbone(nn.Module):
    def __init__(self, variant: Variant) -> None:
        super().__init__()
        widths, depths, blocks, expands = variant.widths, variant.depths, variant.blocks, variant.expands
        stage0: list[nn.Module] = [ConvLayer(3, widths[0], 3, 2, act=ACT)]
        for _ in range(depths[0]):
            block = LOCAL_BLOCKS[blocks[0]](widths[0], widths[0], 1, expands[0], ACT, variant.fewer_norm[0])
            stage0.append(ResidualBlock(block, shortcut=True))
        stages = [OpSequential(stage0)]
        in_ch = widths[0]
        for sid in range(1, len(widths)):
            width, kind, fewer_norm = widths[sid], blocks[sid], variant.fewer_norm[sid]
            is_attention = kind.startswith("att")
            # Each stage opens with a stride-2 local block; attention stages use an MBConv with 4x expansion.
            down_kind = "mb" if is_attention else kind
            down = LOCAL_BLOCKS[down_kind](in_ch, width, 2, expands[sid] * 4, ACT, fewer_norm)
            ops: list[nn.Module] = [ResidualBlock(down, shortcut=False)]
            for _ in range(depths[sid]):
                if is_attention:
                    scales = (3,) if kind == "att@3" else (5,)
                    ops.append(EfficientViTBlock(width, QKV_DIM, expands[sid], scales, ACT))
                else:
                    block = LOCAL_BLOCKS[kind](width, width, 1, expands[sid], ACT, fewer_norm)
                    ops.append(ResidualBlock(block, shortcut=True))
            stages.append(OpSequential(ops))
            in_ch = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        for sid, stage in enumerate(self.stages):
            x = stage(x)
            features[f"stage{sid}"] = x
        return features


class SamNeck(nn.Module):
    """Projects three backbone stages to 256 channels at 64x64, sums them, refines with fused MBConvs."""

    def __init__(self, variant: Variant, head_width: int = 256) -> None:
        super().__init__()
        self.input_keys = list(variant.neck_stages)
        self.input_ops = nn.ModuleList(
            OpSequential([ConvLayer(ch, head_width, 1, act=None), UpSample(EMBEDDING_SIZE)])
            for ch in variant.neck_in_channels
        )
        middle = [
            ResidualBlock(
                LOCAL_BLOCKS["fmb"](head_width, head_width, 1, variant.neck_expand, ACT, False), shortcut=True
            )
            for _ in range(variant.neck_depth)
        ]
        self.middle = OpSequential(middle)
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(head_width, EMBEDDING_DIM, 1, bias=True, norm=False, act=None)])]
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        merged = None
        for key, op in zip(self.input_keys, self.input_ops):
            projected = op(features[key])
            merged = projected if merged is None else merged + projected
        return self.output_ops[0](self.middle(merged))


class ImageEncoder(nn.Module):
    """input_image [B,3,S,S] (normalized, padded) -> image_embeddings [B,256,64,64]."""

    def __init__(self, variant: Variant) -> None:
        super().__init__()
        self.backbone = EfficientViTLargeBackbone(variant)
        self.neck = SamNeck(variant)
        self.norm = LayerNorm2d(EMBEDDING_DIM, eps=NORM_EPS)

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        return self.norm(self.neck(self.backbone(input_image)))
