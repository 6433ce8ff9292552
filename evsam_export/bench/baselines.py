"""The baselines every bench run times beside the artifacts: a plain export (torch.onnx.export at opset 17, no
graph work) of the encoder and of upstream's decoder."""

from __future__ import annotations

from pathlib import Path

from evsam_export import contract


def plain_export(model, variant, folder: Path) -> Path:
    """The official export script's encoder: torch.onnx.export, opset 17, no simplification or rewrites."""
    import torch

    from evsam_export.model.sam import EncoderGraph

    path = folder / "encoder.plain.onnx"
    module = EncoderGraph(model).eval()
    example = torch.zeros(1, 3, variant.encoder_size, variant.encoder_size)
    torch.onnx.export(module, (example,), str(path), input_names=["input_image"], output_names=["image_embeddings"],
                      dynamic_axes={"input_image": {0: "batch"}, "image_embeddings": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def plain_decoder_export(model, folder: Path) -> Path:
    """The decoder a user gets from upstream code with torch.onnx.export, the baseline of prompt latency:
    prompt encoder and mask decoder traced as they are (branch-free point embedding, the official
    deployment's IO: low-res logits and IoU of all four tokens, no image-size input), opset 17, no
    simplification and no graph passes."""
    import torch

    from evsam_export.model.sam import DecoderGraph

    spec = contract.decoder_spec("tensorrt")
    path = folder / "decoder.plain.onnx"
    module = DecoderGraph(model, "tensorrt").eval()
    example = contract.sample_feeds(spec, batch=2, num_points=3)
    with torch.no_grad():
        torch.onnx.export(module, tuple(torch.from_numpy(example[n]) for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=17, dynamo=False)
    return path
