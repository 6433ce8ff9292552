"""The whole EfficientViT-SAM model and the two export components (encoder, prompt decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evsam_export.model.decoder import ImageSide, MaskDecoder, PromptEncoder
from evsam_export.model.encoder import ImageEncoder
from evsam_export.model.variants import PROMPT_FRAME, Variant


class EfficientViTSam(nn.Module):
    """Same submodule names as upstream (image_encoder / prompt_encoder / mask_decoder), so keys match."""

    def __init__(self, variant: Variant) -> None:
        super().__init__()
        self.variant = variant
        self.image_encoder = ImageEncoder(variant)
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    @torch.inference_mode()
    def predict(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PyTorch SAM's predict_torch without post-processing: prompts already in the 1024 frame.

        Returns low-res logits and IoU predictions for tokens 1..3 (multimask) or token 0 (single),
        exactly like SamPredictor / EfficientViTSamPredictor.
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder.embed_prompts(points, boxes, mask_input)
        masks, iou = self.mask_decoder.predict_masks(image_embeddings, self.prompt_encoder.dense_pe(), sparse, dense)
        selection = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selection], iou[:, selection]


class EncoderGraph(nn.Module):
    """Export wrapper: input_image -> image_embeddings."""

    def __init__(self, model: EfficientViTSam) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(input_image)


DECODER_PROFILES = ("sam", "tensorrt")


class DecoderGraph(nn.Module):
    """Export wrapper with SAM's ONNX decoder contract, branch-free.

    Inputs: image_embeddings [1,256,64,64], point_coords [B,N,2] (1024 frame), point_labels [B,N]
    (1 fg, 0 bg, 2/3 box corners, -1 padding), mask_input [B|1,1,256,256], has_mask_input [B|1], and for
    the `sam` profile orig_im_size [2] (H, W, float). The caller lays tokens out like PyTorch SAM (padding
    point only when there is no box); the graph then equals PyTorch for whatever tokens it is fed. With
    pad_points=True the graph appends SAM's padding point itself when the tokens have neither a box nor a
    padding point, for apps that send bare clicks (X-AnyLabeling); padded or boxed prompts pass unchanged.

    Outputs: all four mask tokens in upstream order (token 0 = PyTorch's multimask_output=False mask,
    tokens 1..3 = multimask_output=True), or with single_mask=True only token 0.
    `sam` profile: masks (upscaled to orig_im_size), iou_predictions, low_res_masks.
    `tensorrt` profile: iou_predictions, low_res_masks (no shape-tensor input, host upsamples).
    """

    def __init__(self, model: EfficientViTSam, profile: str = "sam", single_mask: bool = False,
                 single_mask_rule: str = "token0", token_layout: bool = False, pad_points: bool = False) -> None:
        super().__init__()
        # token_layout: trace MaskDecoder._token_layout_masks (what the export ships: same values, faster
        # on CPU); False keeps upstream's formulation (the PyTorch reference and the plain baseline).
        self.token_layout = token_layout
        if profile not in DECODER_PROFILES:
            raise ValueError(f"unknown decoder profile {profile!r}")
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.profile = profile
        self.single_mask = single_mask
        self.single_mask_rule = single_mask_rule
        self.pad_points = pad_points
        self.prompt_frame = PROMPT_FRAME

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor | None = None,
    ):
        if self.pad_points:
            point_coords, point_labels = pad_points_like_sam(point_coords, point_labels)
        sparse = self.prompt_encoder.embed_point_tokens(point_coords, point_labels)
        dense = self.prompt_encoder.embed_dense(mask_input, has_mask_input)
        low_res, iou = self.mask_decoder.predict_masks(image_embeddings, self.prompt_encoder.dense_pe(), sparse, dense, self.token_layout)
        low_res, iou = select_tokens(low_res, iou, point_coords.shape[1], self.single_mask, self.single_mask_rule)
        if self.profile == "tensorrt":
            return iou, low_res
        return upscale_masks_traceable(low_res, orig_im_size, self.prompt_frame), iou, low_res


def select_tokens(low_res: torch.Tensor, iou: torch.Tensor, num_points, single_mask: bool, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All four tokens, or the single mask the export options choose."""
    if single_mask and rule == "sam-onnx":
        return select_single_mask_sam_onnx(low_res, iou, num_points)
    if single_mask:
        # PyTorch's multimask_output=False returns token 0: a static slice, no argmax.
        return low_res[:, :1], iou[:, :1]
    return low_res, iou


class DecoderImageGraph(nn.Module):
    """The image half of the split decoder (contract.decoder_image_spec): everything of the token-layout decoder
    that depends on the image and the mask prompt only, run once per image (or per mask prompt) instead of
    once per decoder call. Outputs MaskDecoder.image_side's tensors."""

    def __init__(self, model: EfficientViTSam) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder

    def forward(self, image_embeddings: torch.Tensor, mask_input: torch.Tensor, has_mask_input: torch.Tensor):
        dense = self.prompt_encoder.embed_dense(mask_input, has_mask_input)
        return tuple(self.mask_decoder.image_side(image_embeddings + dense, self.prompt_encoder.dense_pe()))


class DecoderPromptGraph(nn.Module):
    """The prompt half of the split decoder (contract.decoder_prompt_spec): the image half's tensors and the point
    tokens in, iou_predictions and low_res_masks out (the tokens `DecoderGraph` with the same single-mask options
    returns). Together the halves compute DecoderGraph(token_layout=True)'s low-res outputs with the same ops."""

    def __init__(self, model: EfficientViTSam, single_mask: bool = False, single_mask_rule: str = "token0") -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.single_mask = single_mask
        self.single_mask_rule = single_mask_rule

    def forward(self, image_tokens, layer0_image_queries, layer0_keys_t, layer0_values, point_coords, point_labels):
        sparse = self.prompt_encoder.embed_point_tokens(point_coords, point_labels)
        side = ImageSide(image_tokens, layer0_image_queries, layer0_keys_t, layer0_values)
        low_res, iou = self.mask_decoder.prompt_side(side, self.prompt_encoder.dense_pe(), self.mask_decoder._tokens(sparse))
        low_res, iou = select_tokens(low_res, iou, point_coords.shape[1], self.single_mask, self.single_mask_rule)
        return iou, low_res
def pad_points_like_sam(point_coords: torch.Tensor, point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SamPredictor's padding point, (0, 0) with label -1, appended when no token is a box corner (2, 3) or
    already padding (-1); branch-free: always concatenated, then sliced to N + 1 or N with a tensor length."""
    special = ((point_labels < 0) | (point_labels > 1)).any()
    keep = point_labels.shape[1] + 1 - special.to(torch.int64)
    coords = torch.cat([point_coords, torch.zeros_like(point_coords[:, :1])], dim=1)
    labels = torch.cat([point_labels, torch.full_like(point_labels[:, :1], -1.0)], dim=1)
    return coords[:, :keep], labels[:, :keep]


def select_single_mask_sam_onnx(low_res: torch.Tensor, iou: torch.Tensor, num_points) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ONNX wrapper rule (contract.SAM_ONNX_RULE), branch-free as SAM writes it: token 0's score is
    raised by 1000 * (num_points - 2.5), so it wins with 3+ points and loses to tokens 1-3 otherwise."""
    reweight = torch.zeros_like(iou[:1])
    reweight[:, 0] = 1000.0
    best = torch.argmax(iou + (torch.as_tensor(num_points, dtype=iou.dtype) - 2.5) * reweight, dim=1, keepdim=True)
    masks = torch.gather(low_res, 1, best[:, :, None, None].expand(-1, -1, low_res.shape[2], low_res.shape[3]))
    return masks, torch.gather(iou, 1, best)


def upscale_masks_traceable(low_res: torch.Tensor, orig_im_size: torch.Tensor, frame: int) -> torch.Tensor:
    """SAM's mask post-processing with a tensor image size: bilinear to the frame, crop the padding,
    bilinear to the original size. Mirrors evsam_export.model.processing.postprocess_masks."""
    masks = F.interpolate(low_res, size=(frame, frame), mode="bilinear", align_corners=False)
    size = orig_im_size.to(torch.float32)
    scale = frame / torch.max(size)
    prepadded = torch.floor(size * scale + 0.5).to(torch.int64)
    masks = masks[..., : prepadded[0], : prepadded[1]]
    orig = orig_im_size.to(torch.int64)
    return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

