"""`evsam-export export`: encoder + decoder ONNX graphs and manifest.json."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import CheckpointOption, DebugOption, command_line, run_guarded
from evsam_export.cli.root import app
from evsam_export.model.variants import VARIANT_NAMES

VariantChoice = Enum("VariantChoice", {name: name for name in VARIANT_NAMES}, type=str)


class DecoderProfile(str, Enum):
    sam = "sam"
    tensorrt = "tensorrt"


class EncoderProfile(str, Enum):
    host = "host"
    app = "app"


class SingleMaskRule(str, Enum):
    token0 = "token0"
    sam_onnx = "sam-onnx"


class Components(str, Enum):
    all = "all"
    decoder = "decoder"


class Simplifier(str, Enum):
    auto = "auto"
    onnxsim = "onnxsim"
    onnxslim = "onnxslim"


@app.command("export")
def export_command(
    variant: Annotated[VariantChoice, typer.Option("--variant", "-v", help="Model variant.")] = VariantChoice.l0,
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to create.")] = Path("evsam-l0"),
    checkpoint: CheckpointOption = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch", help="Encoder batch axis.")] = True,
    dynamic_prompts: Annotated[bool, typer.Option("--dynamic-prompts/--static-prompts", help="Decoder prompt-set and point axes.")] = True,
    decoder_profile: Annotated[
        DecoderProfile,
        typer.Option(help="sam: SAM's ONNX contract with orig_im_size and upscaled masks; tensorrt: no orig_im_size, low-res masks."),
    ] = DecoderProfile.sam,
    encoder_profile: Annotated[
        EncoderProfile,
        typer.Option(help="host: float32 NCHW input, preprocessed by the caller; app: raw uint8 RGB [H, W, 3], "
                          "resize/normalise/pad inside the graph (annotation apps; opset >= 18)."),
    ] = EncoderProfile.host,
    single_mask: Annotated[
        bool, typer.Option("--single-mask", help="Return only token 0 (PyTorch multimask_output=False) instead of all 4.")
    ] = False,
    single_mask_rule: Annotated[
        SingleMaskRule,
        typer.Option(help="Which token --single-mask returns. token0: PyTorch multimask_output=False; sam-onnx: SAM's ONNX "
                          "wrapper (token 0 with more than 2 points incl. padding, else the best of tokens 1-3 by IoU), "
                          "what apps built on SAM's ONNX export show."),
    ] = SingleMaskRule.token0,
    pad_points_in_graph: Annotated[
        bool,
        typer.Option("--pad-points-in-graph", help="The decoder appends SAM's padding point (0,0,-1) to prompts without a box "
                                                   "or padding point, so apps that send bare clicks (X-AnyLabeling) get "
                                                   "PyTorch SAM's masks (sam decoder profile)."),
    ] = False,
    simplify: Annotated[Simplifier, typer.Option(help="Graph simplifier.")] = Simplifier.auto,
    no_simplify: Annotated[bool, typer.Option("--no-simplify", help="Skip graph simplification.")] = False,
    no_graph_passes: Annotated[
        bool,
        typer.Option("--no-graph-passes", help="Skip the portable graph passes (bicubic Resize as MatMul; see `evsam-export targets`)."),
    ] = False,
    no_split_decoder: Annotated[
        bool,
        typer.Option("--no-split-decoder", help="Leave out the split decoder (decoder_image + decoder_prompt: the image-only "
                                                "part once per image), which our runtime uses instead of the single graph."),
    ] = False,
    components: Annotated[
        Components,
        typer.Option(help="all: a new folder; decoder: re-export only the decoder into the existing --output folder "
                          "(its encoder is kept, the manifest updated atomically)."),
    ] = Components.all,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    debug: DebugOption = False,
) -> None:
    """Trace the image encoder and the prompt decoder to ONNX, simplify, check, and write manifest.json."""

    def body() -> None:
        from evsam_export import api
        from evsam_export.progress import Reporter

        options = api.ExportOptions(
            opset=opset,
            dynamic_batch=dynamic_batch,
            dynamic_prompts=dynamic_prompts,
            decoder_profile=decoder_profile.value,
            encoder_profile=encoder_profile.value,
            single_mask=single_mask,
            single_mask_rule=single_mask_rule.value,
            pad_points_in_graph=pad_points_in_graph,
            simplify="none" if no_simplify else simplify.value,
            graph_passes=() if no_graph_passes else api.EXPORT_PASSES,
            split_decoder=not no_split_decoder,
        )
        reporter = Reporter()
        if components == Components.decoder:
            api.export_decoder(output, checkpoint, options, reporter=reporter, command=command_line())
        else:
            api.export(variant.value, output, checkpoint, options, force=force, reporter=reporter, command=command_line())
        reporter.print_summary()

    run_guarded(debug, body)
