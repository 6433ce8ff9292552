"""SAM's prompt encoder and two-way-transformer mask decoder (module names match upstream's keys).

Two ways in: `PromptEncoder.embed_prompts` follows PyTorch SAM (points padded only when no box), and
`embed_point_tokens` is the branch-free form used by the exported decoder, which gives the same result
for whatever tokens it is fed (see evsam_export.model.sam for the equivalence).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evsam_export.model.variants import (
    EMBEDDING_DIM,
    EMBEDDING_SIZE,
    NORM_EPS,
    NUM_MASK_TOKENS,
    PROMPT_FRAME,
)


class ChannelLayerNorm(nn.Module):
    """segment-anything's LayerNorm2d (a plain Module with weight/bias, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    def __init__(self, num_feats: int = EMBEDDING_DIM // 2) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_feats)))

    def encode(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """Fourier features of coordinates already normalized to [0, 1]."""
        coords = (2 * unit_coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, size: int = EMBEDDING_SIZE) -> torch.Tensor:
        """[1, C, size, size] encoding of every embedding-grid cell centre."""
        grid = torch.ones((size, size), dtype=torch.float32, device=self.positional_encoding_gaussian_matrix.device)
        y = (grid.cumsum(dim=0) - 0.5) / size
        x = (grid.cumsum(dim=1) - 0.5) / size
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)


class PromptEncoder(nn.Module):
    def __init__(self, mask_in_chans: int = 16) -> None:
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom()
        # label 0 = background point, 1 = foreground point, 2/3 = box top-left/bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, EMBEDDING_DIM) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, EMBEDDING_DIM)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            ChannelLayerNorm(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, EMBEDDING_DIM, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, EMBEDDING_DIM)

    def dense_pe(self) -> torch.Tensor:
        return self.pe_layer.dense()

    def embed_point_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Branch-free token embedding: coords [B,N,2] in the 1024 frame, labels [B,N] float in {-1,0,1,2,3}.

        Masks by label instead of boolean indexing, so it traces to plain arithmetic (no If/NonZero).
        """
        pe = self.pe_layer.encode((coords + 0.5) / PROMPT_FRAME)
        labels = labels.unsqueeze(-1)
        embedding = pe * (labels != -1) + self.not_a_point_embed.weight * (labels == -1)
        for index, point_embedding in enumerate(self.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == index)
        return embedding

    def embed_dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Mask prompt [B|1,1,256,256] where has_mask_input ([B] or [1]) is 1, else the no-mask embedding."""
        has_mask = has_mask_input.reshape(-1, 1, 1, 1)
        return has_mask * self.mask_downscaling(mask_input) + (1 - has_mask) * self.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        )

    def embed_prompts(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PyTorch SAM semantics: [points (+ padding point when no box), box corners], dense mask embedding."""
        coords, labels = build_prompt_tokens(points, boxes)
        batch = coords.shape[0] if coords is not None else (masks.shape[0] if masks is not None else 1)
        if coords is None:
            sparse = torch.empty((batch, 0, EMBEDDING_DIM), device=self.no_mask_embed.weight.device)
        else:
            sparse = self.embed_point_tokens(coords, labels)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, EMBEDDING_SIZE, EMBEDDING_SIZE)
        return sparse, dense


def build_prompt_tokens(
    points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PyTorch SAM's token layout: points, then SAM's padding point (0,0,label -1) only when there is no box,
    then the two box corners with labels 2 and 3."""
    coords, labels = [], []
    if points is not None:
        point_coords, point_labels = points
        coords.append(point_coords.float())
        labels.append(point_labels.float())
        if boxes is None:
            batch = point_coords.shape[0]
            coords.append(torch.zeros((batch, 1, 2), device=point_coords.device))
            labels.append(-torch.ones((batch, 1), device=point_coords.device))
    if boxes is not None:
        batch = boxes.shape[0]
        coords.append(boxes.float().reshape(batch, 2, 2))
        labels.append(torch.tensor([[2.0, 3.0]], device=boxes.device).expand(batch, 2))
    if not coords:
        return None, None
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        attn = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1]), dim=-1)
        out = attn @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))  # SAM's TwoWayTransformer passes ReLU here


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.norm4 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = EMBEDDING_DIM, heads: int = 8, mlp_dim: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm_final_attn = nn.LayerNorm(dim, eps=NORM_EPS)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


class MaskDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dim = EMBEDDING_DIM
        self.transformer = TwoWayTransformer()
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            ChannelLayerNorm(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(NUM_MASK_TOKENS))
        self.iou_prediction_head = MLP(dim, 256, NUM_MASK_TOKENS, 3)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All four mask tokens: low-res logits [B,4,256,256] and IoU predictions [B,4].

        `image_embeddings` is one image ([1,256,64,64]) shared by B prompt sets, or [B,...] one per prompt set.
        """
        batch = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        # expand instead of SAM's repeat_interleave: same values, but it exports to Expand, not the
        # OneHot+Tile pattern that TensorRT rejects as a shape tensor (efficientvit issues #70, #78).
        src = image_embeddings.expand(batch, -1, -1, -1) + dense
        pos = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + NUM_MASK_TOKENS, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
