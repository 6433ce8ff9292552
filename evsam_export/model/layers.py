"""EfficientViT building blocks, written for export, with upstream's module names (state-dict keys match).

Numerics follow mit-han-lab/efficientvit: tanh-GELU activations, eps 1e-6 on every norm, and LiteMLA's
linear attention computed in fp32 whatever the surrounding dtype.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from evsam_export.model.variants import NORM_EPS


def make_act(name: str | None) -> nn.Module | None:
    acts = {
        None: None,
        "gelu": partial(nn.GELU, approximate="tanh"),  # upstream registers GELU with the tanh approximation
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
    }
    factory = acts[name]
    return factory() if factory is not None else None


class LayerNorm2d(nn.LayerNorm):
    """EfficientViT's channel LayerNorm for NCHW (subclass of nn.LayerNorm, so keys are weight/bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        normalized = centered / torch.sqrt(centered.square().mean(dim=1, keepdim=True) + self.eps)
        return normalized * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ConvLayer(nn.Module):
    """Conv -> optional BatchNorm -> optional activation, 'same' padding."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: str | None = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_ch, eps=NORM_EPS) if norm else None
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: float, act: str, fewer_norm: bool) -> None:
        super().__init__()
        mid = round(in_ch * expand)
        self.conv1 = ConvLayer(in_ch, mid, 3, stride, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.conv2 = ConvLayer(mid, out_ch, 3, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: float, act: str, fewer_norm: bool) -> None:
        super().__init__()
        mid = round(in_ch * expand)
        self.spatial_conv = ConvLayer(in_ch, mid, 3, stride, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.point_conv = ConvLayer(mid, out_ch, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: float, act: str, fewer_norm: bool) -> None:
        super().__init__()
        mid = round(in_ch * expand)
        self.inverted_conv = ConvLayer(in_ch, mid, 1, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.point_conv = ConvLayer(mid, out_ch, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


LOCAL_BLOCKS = {"res": ResBlock, "fmb": FusedMBConv, "mb": MBConv}


class ResidualBlock(nn.Module):
    """`main(x) + x` when `shortcut` is set, else `main(x)` (upstream keeps an IdentityLayer, no params)."""

    def __init__(self, main: nn.Module, shortcut: bool) -> None:
        super().__init__()
        self.main = main
        self.shortcut = nn.Identity() if shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class OpSequential(nn.Module):
    """Sequential whose children live under `op_list.N` (upstream's key layout)."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (EfficientViT), heads of size `dim`."""

    def __init__(self, channels: int, dim: int, scales: tuple[int, ...], eps: float = 1e-15) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        heads = channels // dim
        total = heads * dim
        self.qkv = ConvLayer(channels, 3 * total, 1, norm=False, act=None)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for s in scales
        )
        self.proj = ConvLayer(total * (1 + len(scales)), channels, 1, act=None)

    def linear_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        # fp32 on purpose: v·kᵀ sums over every token and the final division by the normaliser row
        # (eps 1e-15) underflows in fp16 (upstream disables autocast here for the same reason).
        qkv = qkv.float()
        batch, _, height, width = qkv.shape
        qkv = qkv.reshape(batch, -1, 3 * self.dim, height * width)
        q = F.relu(qkv[:, :, : self.dim])
        k = F.relu(qkv[:, :, self.dim : 2 * self.dim])
        v = qkv[:, :, 2 * self.dim :]
        # The padded row of ones makes the last output row the normaliser Σ_n k_n·q.
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(batch, -1, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        # Upstream switches to quadratic attention only when H*W <= dim (never at SAM resolutions).
        if qkv.shape[-2] * qkv.shape[-1] <= self.dim:
            raise ValueError("EfficientViT-SAM inputs are always large enough for linear attention")
        return self.proj(self.linear_attention(qkv).to(qkv.dtype))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, dim: int, expand: float, scales: tuple[int, ...], act: str) -> None:
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, dim, scales), shortcut=True)
        self.local_module = ResidualBlock(MBConv(channels, channels, 1, expand, act, fewer_norm=True), shortcut=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class UpSample(nn.Module):
    """Bicubic resize to a fixed size, in fp32 (upstream casts half inputs up and does not cast back).

    Upstream's early return compares a tuple with a list and so never fires: a 64x64 input still goes
    through a (numerically identity) 64->64 resize. We skip it when the size already matches; the
    result is bit-identical and the exported graph has one Resize fewer.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return F.interpolate(x.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
