"""SAM's prompt encoder and two-way-transformer mask decoder (module names match upstream's keys).

Two ways in: `PromptEncoder.embed_prompts` follows PyTorch SAM (points padded only when no box), and
`embed_point_tokens` is the branch-free form used by the exported decoder, which gives the same result
for whatever tokens it is fed (see evsam_export.model.sam for the equivalence).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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

    def forward(self, x: torch.Tensor, token_layout: bool = False) -> torch.Tensor:
        """x [B,C,H,W]; token_layout: x [..., C] (channels last), one LayerNormalization over the last axis."""
        if token_layout:
            return F.layer_norm(x, (self.weight.shape[0],), self.weight, self.bias, self.eps)
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reassociate: str = "") -> torch.Tensor:
        """reassociate: "tokens_to_image" / "image_to_tokens" compute the same attention as
        attend_tokens_to_image / attend_image_to_tokens (through forward, so graph node names keep this scope)."""
        if reassociate == "tokens_to_image":
            return self.attend_tokens_to_image(q, k, v)
        if reassociate == "image_to_tokens":
            return self.attend_image_to_tokens(q, k, v)
        if reassociate == "project_image":
            return self.project_image(k, v)
        if reassociate == "projected":
            return self.attend_projected(q, k, v)
        if reassociate == "project_image_queries":
            return self.project_image_queries(q)
        if reassociate == "projected_image_queries":
            return self.attend_projected_image_queries(q, k, v)
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        attn = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1]), dim=-1)
        out = attn @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))

    def project_image(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image side of `forward` for image keys/values [B|1, N, C]: keys projected and laid out for q @ k
        ([B|1, H, d, N]) and values projected ([B|1, H, N, d]); they depend on the image only, so a split decoder
        computes them once per image (attend_projected takes them)."""
        return self._split(self.k_proj(keys)).transpose(2, 3), self._split(self.v_proj(values))

    def attend_projected(self, queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`forward` with the keys and values already projected by project_image (broadcast over prompt sets)."""
        q = self._split(self.q_proj(queries))
        attn = torch.softmax((q @ keys_t) / math.sqrt(q.shape[-1]), dim=-1)
        out = attn @ values
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))

    def project_image_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """The image side of attend_image_to_tokens for image queries [B|1, N, C]: q_proj with its bias, scaled by
        1/sqrt(d) (a power of two here, so exact), heads side by side: [B|1, N, H*d]."""
        return self.q_proj(queries) * (1.0 / math.sqrt(self.q_proj.weight.shape[0] // self.heads))

    def attend_projected_image_queries(self, queries_scaled: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """attend_image_to_tokens with the image queries already projected (project_image_queries): the logits are
        q·k over d = C/2/H channels per head instead of x·(W_qᵀ k) over C; the keys go in as one block-diagonal
        [H*d, H*T] matrix (head h's keys in rows h*d.., columns h*T..), so all heads are one plain MatMul with
        [B, N, H*T] logits in the layout the weights need (a per-head batched MatMul with T = 7 columns ran
        several times slower, then needed a Transpose); the values side stays folded into out_proj as there."""
        b, t, _ = keys.shape
        inner, dim = self.q_proj.weight.shape
        depth = inner // self.heads
        k = self._split(self.k_proj(keys))  # [B,H,T,d]
        v = self._split(self.v_proj(values))
        block_diagonal = (k.transpose(2, 3).unsqueeze(3) * torch.eye(self.heads, dtype=k.dtype).reshape(self.heads, 1, self.heads, 1))
        logits = queries_scaled @ block_diagonal.reshape(b, inner, self.heads * t)  # [B,N,HT]
        n = logits.shape[1]
        weights = torch.softmax(logits.reshape(b, n, self.heads, t), dim=-1).reshape(b, n, self.heads * t)
        v_out = (v @ self.out_proj.weight.reshape(dim, self.heads, depth).permute(1, 2, 0)).reshape(b, self.heads * t, dim)
        return weights @ (v_out + self.out_proj.bias / self.heads)

    def attend_tokens_to_image(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`forward` for a few queries (T tokens) over many keys (N image tokens), reassociated so the image
        never goes through k_proj / v_proj: q·(W_k x + b_k) = (W_kᵀ q)·x + a per-row constant that softmax
        ignores, and softmax·(W_v x + b_v) = W_v (softmax·x) + b_v since softmax rows sum to 1. Per prompt set
        2·H·T·N·C multiply-adds instead of 2·N·C·C/2 (H·T = 56 < 128 = C/2 in SAM's decoder)."""
        b, t, _ = queries.shape
        inner, dim = self.k_proj.weight.shape
        depth = inner // self.heads
        q = self._split(self.q_proj(queries))  # [B,H,T,d]
        q_over_image = (q @ self.k_proj.weight.reshape(self.heads, depth, dim)).reshape(b, self.heads * t, dim)
        weights = torch.softmax((q_over_image @ keys.transpose(1, 2)) / math.sqrt(depth), dim=-1)  # [B,HT,N]
        context = (weights @ values).reshape(b, self.heads, t, dim)
        out = context @ self.v_proj.weight.reshape(self.heads, depth, dim).transpose(1, 2) + self.v_proj.bias.reshape(self.heads, 1, depth)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, inner))

    def attend_image_to_tokens(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`forward` for many queries (N image tokens) over a few keys (T tokens), reassociated so the image
        never goes through q_proj / out_proj: per prompt set, W_qᵀ k and v W_out fold into [H·T, C] matrices,
        and each image token takes two C x H·T products instead of two C x C/2 projections."""
        b, t, _ = keys.shape
        inner, dim = self.q_proj.weight.shape
        depth = inner // self.heads
        k = self._split(self.k_proj(keys))  # [B,H,T,d]
        v = self._split(self.v_proj(values))
        k_over_image = (k @ self.q_proj.weight.reshape(self.heads, depth, dim)).reshape(b, self.heads * t, dim)
        k_bias = (k * self.q_proj.bias.reshape(self.heads, 1, depth)).sum(-1).reshape(b, 1, self.heads * t)
        logits = (queries @ k_over_image.transpose(1, 2) + k_bias) / math.sqrt(depth)  # [B,N,HT]
        n = logits.shape[1]
        weights = torch.softmax(logits.reshape(b, n, self.heads, t), dim=-1).reshape(b, n, self.heads * t)
        v_out = (v @ self.out_proj.weight.reshape(dim, self.heads, depth).permute(1, 2, 0)).reshape(b, self.heads * t, dim)
        # Each head's weights sum to 1, so out_proj's bias rides in v_out (1/H per head, a power of two here)
        # instead of costing one more pass over the [B, N, C] result.
        return weights @ (v_out + self.out_proj.bias / self.heads)


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

    def forward(self, queries, keys, query_pe, key_pe, reassociate_token_to_image: bool = False, reassociate_image_to_token: bool = False,
                image_side: ImageSide | None = None):
        """reassociate_*: compute that cross attention as Attention.attend_tokens_to_image / attend_image_to_tokens.
        image_side: the first layer's image-only tensors (TwoWayTransformer.image_side), used instead of recomputing them."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        if image_side is not None:
            attended = self.cross_attn_token_to_image(queries + query_pe, image_side.layer0_keys_t, image_side.layer0_values, "projected")
        else:
            token_to_image = "tokens_to_image" if reassociate_token_to_image else ""
            attended = self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys, token_to_image)
        queries = self.norm2(queries + attended)
        queries = self.norm3(queries + self.mlp(queries))
        if image_side is not None:
            image_queries = image_side.layer0_image_queries
            attended = self.cross_attn_image_to_token(image_queries, queries + query_pe, queries, "projected_image_queries")
        else:
            image_to_token = "image_to_tokens" if reassociate_image_to_token else ""
            attended = self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries, image_to_token)
        keys = self.norm4(keys + attended)
        return queries, keys


class ImageSide(NamedTuple):
    """What the decoder computes from the image alone (embeddings + dense prompt), [mask batch | 1, ...] each: the
    image tokens, the first image-to-token attention's projected and scaled image queries, and the first
    token-to-image attention's projected keys (transposed for q @ k) and values. A split decoder's image graph
    returns these once per image."""

    image_tokens: torch.Tensor  # [mb, HW, C]
    layer0_image_queries: torch.Tensor  # [mb, HW, C / 2] (heads side by side, scaled)
    layer0_keys_t: torch.Tensor  # [mb, heads, C / 2 / heads, HW]
    layer0_values: torch.Tensor  # [mb, heads, HW, C / 2 / heads]


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = EMBEDDING_DIM, heads: int = 8, mlp_dim: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample=2)
        self.norm_final_attn = nn.LayerNorm(dim, eps=NORM_EPS)

    def image_side(self, image_tokens: torch.Tensor, key_pe: torch.Tensor) -> ImageSide:
        """The image-only part of the first layer (token layout: image_tokens [mb, HW, C], key_pe [1, HW, C])."""
        with_pe = image_tokens + key_pe
        first = self.layers[0]
        image_queries = first.cross_attn_image_to_token(with_pe, None, None, "project_image_queries")
        keys_t, values = first.cross_attn_token_to_image(None, with_pe, image_tokens, "project_image")
        return ImageSide(image_tokens, image_queries, keys_t, values)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor, token_layout: bool = False,
                image_side: ImageSide | None = None):
        """image, image_pe [B|1, C, H, W]; token_layout: both already image tokens [1|B, HW, C]. Keys of batch 1
        broadcast over the B prompt sets, so the first layer's image-side projections run once per call; and
        every cross attention whose image side is per prompt set runs reassociated (Attention.attend_*), which
        skips the image-sized projections (the first token-to-image attention keeps them: its image side is
        shared by the whole call and projected once, or given precomputed as `image_side`)."""
        keys, key_pe = (image, image_pe) if token_layout else (image.flatten(2).permute(0, 2, 1), image_pe.flatten(2).permute(0, 2, 1))
        if token_layout and image_side is None:
            image_side = self.image_side(keys, key_pe)
        queries = tokens
        for index, layer in enumerate(self.layers):
            first_image_side = image_side if token_layout and index == 0 else None
            queries, keys = layer(queries, keys, tokens, key_pe, token_layout and index > 0, token_layout, first_image_side)
        final = "tokens_to_image" if token_layout else ""
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys, final)
        return self.norm_final_attn(queries), keys


class StrideTwoConvTranspose(nn.ConvTranspose2d):
    """nn.ConvTranspose2d(kernel 2, stride 2) (same parameters and keys) with a token-layout form."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, token_layout: bool = False) -> torch.Tensor:
        """token_layout: x is channels-last with the prompt sets' rows merged, [B*H, W, Cin]; returns [B*2H, 2W,
        Cout], also in image order. Each input pixel feeds exactly its own 2x2 output block, so output row 2y + i
        is row y times the weight's slice i laid out as [Cin, (j, Cout)]: one MatMul broadcast over i writes
        [B*H, i, W, (j, Cout)], which is already the image-order layout, so no Transpose (nor col2im scatter)
        runs. Only the row axis is left to -1: the graph computes any number of rows (a window of them) even
        after a simplifier folds the other dims to constants."""
        if not token_layout:
            return super().forward(x)
        w, cin = x.shape[-2:]
        cout = self.weight.shape[1]
        weight = self.weight.permute(2, 0, 3, 1).reshape(2, cin, 2 * cout)
        out = x.reshape(-1, 1, w, cin) @ weight + self.bias.repeat(2)
        return out.reshape(-1, 2 * w, cout)


class OutputUpscaling(nn.Sequential):
    """SAM's output_upscaling (same children and keys); forward(x, token_layout=True) takes the image channels-last
    with the prompt sets' rows merged, [B*H, W, C], and returns the features [B*4H, 4W, C/8] in image order,
    never NCHW."""

    def forward(self, x: torch.Tensor, token_layout: bool = False) -> torch.Tensor:
        for layer in self:
            x = layer(x, token_layout) if isinstance(layer, (StrideTwoConvTranspose, ChannelLayerNorm)) else layer(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dim = EMBEDDING_DIM
        self.transformer = TwoWayTransformer()
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        self.output_upscaling = OutputUpscaling(
            StrideTwoConvTranspose(dim, dim // 4),
            ChannelLayerNorm(dim // 4),
            nn.GELU(),
            StrideTwoConvTranspose(dim // 4, dim // 8),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(NUM_MASK_TOKENS))
        self.iou_prediction_head = MLP(dim, 256, NUM_MASK_TOKENS, 3)

    def _tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """[iou token, 4 mask tokens, prompt tokens] per prompt set: [B, 5 + N, C]."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        return torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)

    def _hypernetworks(self, mask_tokens_out: torch.Tensor) -> torch.Tensor:
        """Each mask token's MLP: [B, 4, C // 8] weights over the upscaled feature channels."""
        return torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        token_layout: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All four mask tokens: low-res logits [B,4,256,256] and IoU predictions [B,4].

        `image_embeddings` is one image ([1,256,64,64]) shared by B prompt sets, or [B,...] one per prompt set.
        token_layout: compute them as `_token_layout_masks` does (what the export traces), else as upstream.
        """
        batch = sparse.shape[0]
        tokens = self._tokens(sparse)
        if token_layout:
            return self._token_layout_masks(image_embeddings + dense, image_pe, tokens)
        # expand instead of SAM's repeat_interleave: same values, but it exports to Expand, not the
        # OneHot+Tile pattern that TensorRT rejects as a shape tensor (efficientvit issues #70, #78).
        src = image_embeddings.expand(batch, -1, -1, -1) + dense
        pos = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + NUM_MASK_TOKENS, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = self._hypernetworks(mask_tokens_out)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)

    def _token_layout_masks(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict_masks` in token layout (image = embeddings + dense prompt, [1|B,C,H,W]): same parameters,
        same values up to float summation order (tests/unit/test_decoder_layout.py), faster on CPU.

        Measured on ONNX Runtime CPU (docs/benchmarks.md, "Prompt latency after set_image"): the image stays [1|mask batch, HW, C]
        until the first layer's image-to-token update, so its projections run once per call, not per prompt
        set; each stride-2 ConvTranspose is a per-pixel MatMul to (j, channel) columns per i, so LayerNorm2d
        becomes a LayerNormalization over the last axis and no NCHW transpose, col2im scatter or ReduceMean
        runs; each ConvTranspose writes its output rows in image order (StrideTwoConvTranspose), so neither the
        features nor the masks are transposed."""
        return self.prompt_side(self.image_side(image, image_pe), image_pe, tokens)

    def image_side(self, image: torch.Tensor, image_pe: torch.Tensor) -> ImageSide:
        """The image-only tensors of `_token_layout_masks` (image = embeddings + dense prompt, [1|B,C,H,W])."""
        return self.transformer.image_side(image.flatten(2).permute(0, 2, 1), image_pe.flatten(2).permute(0, 2, 1))

    def prompt_side(self, image_side: ImageSide, image_pe: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of `_token_layout_masks`, per prompt set, from the image side (computed once per image)."""
        batch = tokens.shape[0]
        h, w = image_pe.shape[-2:]
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        hs, keys = self.transformer(image_side.image_tokens, key_pe, tokens, True, image_side)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + NUM_MASK_TOKENS, :]
        # The image grid [B, h, w, C], rows then merged: [B*4h, 4w, C/8] in image order. Past the grid no shape
        # names h, so a graph cut there can upscale a window of rows (ort_runner.windowed_subgraph).
        # Widths are read from the tensors (traced as shapes), so an unsimplified graph windows columns too.
        grid = keys.reshape(batch, h, w, -1)
        x = self.output_upscaling(grid.reshape(-1, grid.shape[2], grid.shape[3]), True)
        hyper_in = self._hypernetworks(mask_tokens_out)
        masks = hyper_in @ x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)
        return masks.reshape(batch, hyper_in.shape[1], -1, x.shape[1]), self.iou_prediction_head(iou_token_out)
