"""The export stage: a checkpoint's encoder and decoder traced to fp32 ONNX, simplified, rewritten and checked
against PyTorch (the split decoder pair against the single graph), with manifest.json; and the decoder-only
re-export of an existing folder. `api.export` and the recipe runner's export step both run it."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export import contract
from evsam_export.environment import environment
from evsam_export.errors import UsageError
from evsam_export.export.graph_passes import EXPORT_PASSES, check_pass_names
from evsam_export.files import sha256_file
from evsam_export.manifest import Artifact, Manifest
from evsam_export.model.variants import LOW_RES_MASK_SIZE, PROMPT_FRAME, Variant, get_variant
from evsam_export.progress import Reporter

# The export settings that take one of a few values: checked when the options are built, so a recipe's
# [export] table is refused when it loads.
EXPORT_CHOICES = {
    "decoder_profile": contract.DECODER_PROFILES,
    "encoder_profile": contract.ENCODER_PROFILES,
    "single_mask_rule": contract.SINGLE_MASK_RULES,
    "simplify": ("auto", "onnxsim", "onnxslim", "none"),
}


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    dynamic_batch: bool = True
    dynamic_prompts: bool = True
    decoder_profile: str = "sam"  # sam | tensorrt
    encoder_profile: str = "host"  # host | app (preprocessing in the graph, raw uint8 HWC input)
    single_mask: bool = False
    single_mask_rule: str = "token0"  # token0 | sam-onnx (contract.SINGLE_MASK_RULES), only with single_mask
    # The decoder appends SAM's padding point to bare clicks (apps that never add it: X-AnyLabeling).
    pad_points_in_graph: bool = False
    simplify: str = "auto"  # auto | onnxsim | onnxslim | none
    # Portable graph passes run after simplification (evsam_export.export.graph_passes; [] for none).
    graph_passes: tuple[str, ...] = EXPORT_PASSES
    # Also export the split decoder (decoder_image + decoder_prompt, checked against the single graph), which
    # our runtime runs instead of the single graph: the image-only part once per image, not once per call.
    split_decoder: bool = True

    def __post_init__(self) -> None:  # recipes give lists; keep the frozen object hashable
        object.__setattr__(self, "graph_passes", check_pass_names(self.graph_passes, ("portable",)))
        for name, allowed in EXPORT_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.single_mask_rule != "token0" and not self.single_mask:
            raise UsageError(f"single_mask_rule: {self.single_mask_rule!r} chooses the token of a single-mask decoder",
                             hint="add --single-mask (or single_mask = true in the recipe)")
        if self.pad_points_in_graph and self.decoder_profile != "sam":
            raise UsageError("pad_points_in_graph: the padding point changes the token count, which the "
                             f"{self.decoder_profile!r} decoder profile keeps static", hint='use decoder_profile = "sam"')


@dataclass
class ExportResult:
    output: Path
    manifest: Manifest
    artifacts: list[Artifact] = field(default_factory=list)


PADDING_BY_CALLER = "append (0, 0) with label -1 when there is no box (PyTorch SAM); never after a box"
PADDING_IN_GRAPH = ("the decoder graph appends (0, 0) with label -1 when no label is 2, 3 or -1, so bare clicks "
                    "get PyTorch SAM's padding; prompts padded by the caller or with a box pass unchanged")


def model_contract(variant: Variant, options: ExportOptions) -> dict:
    """What a consumer must know to feed the graphs (recorded in manifest.json)."""
    return {
        "encoder_profile": options.encoder_profile,
        "encoder_input": contract.encoder_input_contract(options.encoder_profile, variant.encoder_size),
        "prompt_frame": PROMPT_FRAME,
        "prompt_rules": {
            "coords": f"pixel (x, y) scaled so the image's longest side is {PROMPT_FRAME}",
            "labels": {f"{label:g}": meaning for label, meaning in contract.POINT_LABEL_MEANINGS.items()},
            "padding_point": PADDING_IN_GRAPH if options.pad_points_in_graph else PADDING_BY_CALLER,
            "boxes": "one prompt set per box: point_coords [B,2,2] (+ points) with labels [2,3]",
        },
        "decoder_profile": options.decoder_profile,
        "mask_selection": contract.mask_selection(options.single_mask, options.single_mask_rule),
        "low_res_mask_size": LOW_RES_MASK_SIZE,
        "mask_threshold": 0.0,
        "postprocess": "bilinear to 1024x1024, crop to the resized image, bilinear to the original size, > 0",
    }


def _artifact_from_file(
    folder: Path, path: Path, artifact_id: str, component: str, target: str, precision: str, spec, **extra
) -> Artifact:
    return Artifact(
        id=artifact_id,
        component=component,
        target=target,
        precision=precision,
        path=path.relative_to(folder).as_posix(),
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        **extra,
    )


def _torch_reference(module, spec) -> tuple[dict, list]:
    """PyTorch outputs on the graph's own example feeds, kept so the model can be freed before simplifying."""
    import torch

    feeds = contract.trace_feeds(spec, seed=3)
    with torch.inference_mode():
        expected = module(*[torch.from_numpy(feeds[name]) for name in spec.input_names])
    expected = expected if isinstance(expected, tuple) else (expected,)
    return feeds, [e.numpy().copy() for e in expected]


def _torch_parity(reference: tuple[dict, list], path: Path) -> float:
    """Max abs difference between the PyTorch reference outputs and ONNX Runtime on the same feeds."""
    import numpy as np

    from evsam_export.export.simplify import ort_outputs

    feeds, expected = reference
    got = ort_outputs(path, feeds)
    return max(float(np.max(np.abs(e - g))) for e, g in zip(expected, got))


def export(
    variant: str,
    output: str | Path,
    checkpoint: str | None = None,
    options: ExportOptions | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    command: str | None = None,
) -> ExportResult:
    """Trace the encoder and decoder of `variant` to ONNX in `output` (atomic), with manifest.json."""
    from evsam_export.model.checkpoint import load_model
    from evsam_export.output import check_output_folder, staged_folder
    from evsam_export.realistic import resolve_realistic

    options = options or ExportOptions()
    reporter = reporter or Reporter()
    spec_variant = get_variant(variant)
    output = check_output_folder(Path(output), force)
    with reporter.step(f"load EfficientViT-SAM-{spec_variant.name} weights ({checkpoint or 'synthetic:0'})"):
        model, weights = load_model(spec_variant, resolve_realistic(str(checkpoint), spec_variant) if checkpoint else None)
    manifest = Manifest(
        variant=spec_variant.name,
        encoder_size=spec_variant.encoder_size,
        weights={"spec": weights.spec, "sha256": weights.sha256, "synthetic_seed": weights.synthetic_seed},
        model=model_contract(spec_variant, options),
        environment=environment(),
        command=command or shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
    )
    # export_components frees the model after tracing, which it can only do if this frame holds no reference.
    handover = [model]
    del model
    with staged_folder(output, force) as staging:
        artifacts = export_components(handover.pop(), spec_variant, staging, options, reporter)
        for artifact in artifacts:
            manifest.add(artifact)
        manifest.history.append({"command": manifest.command, "step": "export", "artifacts": [a.id for a in artifacts]})
        manifest.write(staging)
    for artifact in artifacts:
        reporter.artifact("ok", artifact.wall_time_s, output / artifact.path, note=artifact.id)
    return ExportResult(output=output, manifest=manifest, artifacts=artifacts)


def component_opset(component: str, options: ExportOptions) -> int:
    """The opset a component is traced at: the app encoder needs at least APP_ENCODER_MIN_OPSET."""
    if component == "encoder" and options.encoder_profile == "app":
        return max(options.opset, contract.APP_ENCODER_MIN_OPSET)
    return options.opset


def export_components(model, variant: Variant, folder: Path, options: ExportOptions, reporter: Reporter,
                      components: tuple[str, ...] = ("encoder", "decoder")) -> list[Artifact]:
    """Trace both components, then simplify, rewrite and check them with the PyTorch model freed.

    The model is released once both graphs and their PyTorch reference outputs exist, so a caller that
    passes its only reference lets simplification and the ORT checks run without it (docs/reliability.md,
    "Export memory")."""
    import gc

    from evsam_export.export.onnx_export import export_onnx, op_histogram
    from evsam_export.export.simplify import simplify_graph
    from evsam_export.model.sam import DecoderGraph, DecoderImageGraph, DecoderPromptGraph, EncoderGraph

    app_encoder = options.encoder_profile == "app"
    # The app profile traces the host encoder with batch 1, then prepends the preprocessing graph to it.
    jobs = [
        ("encoder", EncoderGraph(model), contract.encoder_spec(variant, options.dynamic_batch and not app_encoder)),
        (
            "decoder",
            DecoderGraph(model, options.decoder_profile, options.single_mask, options.single_mask_rule, token_layout=True,
                         pad_points=options.pad_points_in_graph),
            contract.decoder_spec(options.decoder_profile, options.single_mask, options.dynamic_prompts),
        ),
    ]
    if options.split_decoder:
        jobs += [
            (contract.DECODER_IMAGE, DecoderImageGraph(model), contract.decoder_image_spec(options.dynamic_prompts)),
            (contract.DECODER_PROMPT, DecoderPromptGraph(model, options.single_mask, options.single_mask_rule),
             contract.decoder_prompt_spec(options.single_mask, options.dynamic_prompts)),
        ]
    # The split decoder's halves come with the decoder (they are checked against it).
    jobs = [job for job in jobs if job[0] in components or (job[0] in contract.SPLIT_DECODER and "decoder" in components)]
    del model
    traced = []
    while jobs:
        component, module, spec = jobs.pop(0)
        started = time.perf_counter()
        path = folder / f"{component}.fp32.onnx"
        opset = component_opset(component, options)
        with reporter.step(f"trace {component} to ONNX (opset {opset})"):
            export_onnx(module, spec, path, opset)
            reference = _torch_reference(module, spec)
        del module
        gc.collect()
        traced.append((component, spec, path, reference, time.perf_counter() - started))

    artifacts = []
    for component, spec, path, reference, trace_s in traced:
        started = time.perf_counter()
        simplify_facts = {"tool": "none"}
        if options.simplify != "none":
            with reporter.step(f"simplify {component}"):
                result = simplify_graph(path, spec, options.simplify)
            simplify_facts = {
                "tool": result.tool,
                "nodes_before": result.nodes_before,
                "nodes_after": result.nodes_after,
                "max_abs_diff": result.max_abs_diff,
            }
            if result.note:
                simplify_facts["note"] = result.note
        pass_facts = {"passes": {}}
        if options.graph_passes:
            import onnx

            from evsam_export.export.graph_passes import apply_checked

            with reporter.step(f"graph passes on {component} ({', '.join(options.graph_passes)})"):
                rewritten, pass_facts = apply_checked(onnx.load(str(path)), options.graph_passes, spec)
                if any(pass_facts["passes"].values()):
                    onnx.save(rewritten, str(path))
                del rewritten
                gc.collect()
        with reporter.step(f"check {component} against PyTorch"):
            torch_diff = _torch_parity(reference, path)
        app_facts = {}
        if component == "encoder" and app_encoder:
            from evsam_export.export.app_encoder import prepend_preprocessing

            with reporter.step("put the preprocessing into the encoder graph (app profile)"):
                spec, app_facts = prepend_preprocessing(path, variant.encoder_size)
        import onnx

        split_facts, parent = {}, None
        if component in contract.SPLIT_DECODER:
            parent = "decoder.onnx.fp32"
            if component == contract.DECODER_PROMPT:
                from evsam_export.pipeline.split_check import check_split_pair

                with reporter.step("check the split decoder against the single graph"):
                    single = next(a for a in artifacts if a.id == parent)
                    split_facts = {"split_check": check_split_pair(
                        folder / "decoder.fp32.onnx", contract.artifact_spec(single), folder / "decoder_image.fp32.onnx",
                        contract.decoder_image_spec(options.dynamic_prompts), path, spec)}
        graph = onnx.load(str(path), load_external_data=False)
        artifacts.append(
            _artifact_from_file(
                folder,
                path,
                f"{component}.onnx.fp32",
                component,
                "onnx",
                "fp32",
                spec,
                step="export",
                parent=parent,
                settings={
                    "opset": component_opset(component, options),
                    "exporter": "torchscript",
                    "dynamic_axes": spec.dynamic_axes(),
                    **({"decoder_profile": spec.profile, "single_mask": spec.single_mask,
                        "single_mask_rule": options.single_mask_rule,
                        **({"pad_points_in_graph": options.pad_points_in_graph} if component == "decoder" else {}),
                        } if component in ("decoder", contract.DECODER_PROMPT) else {}),
                    **({"encoder_profile": spec.profile} if component == "encoder" else {}),
                },
                facts={
                    **app_facts,
                    **split_facts,
                    "simplify": simplify_facts,
                    "graph_passes": pass_facts,
                    "max_abs_diff_vs_torch": torch_diff,
                    "nodes": len(graph.graph.node),
                    "op_types": op_histogram(graph),
                },
                wall_time_s=round(trace_s + time.perf_counter() - started, 2),
            )
        )
        del graph
        gc.collect()
    return artifacts


def export_decoder(
    folder: str | Path,
    checkpoint: str | None = None,
    options: ExportOptions | None = None,
    reporter: Reporter | None = None,
    command: str | None = None,
) -> ExportResult:
    """Re-export only the decoder of an existing folder (`export --components decoder`): the encoder and its
    artifacts are kept untouched; every decoder artifact (and file) is replaced by the new fp32 decoder, and the
    manifest's decoder contract is updated, all in one atomic swap of the folder. Later decoder steps (a target
    build, fp16...) and the parity gate are to be re-run on the new decoder."""
    from evsam_export.apps import refresh_app_configs
    from evsam_export.folder_report import write_folder_report
    from evsam_export.manifest import read_manifest
    from evsam_export.model.checkpoint import load_model
    from evsam_export.output import staged_folder
    from evsam_export.realistic import resolve_realistic

    options = options or ExportOptions()
    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    variant = get_variant(manifest.variant)
    spec = checkpoint or manifest.weights.get("spec") or "synthetic:0"
    with reporter.step(f"load EfficientViT-SAM-{variant.name} weights ({spec})"):
        model, weights = load_model(variant, resolve_realistic(spec, variant))
    if weights.sha256 != manifest.weights.get("sha256"):
        raise UsageError(f"{spec} are not the weights {folder} was exported from",
                         hint="pass the checkpoint of the folder's encoder with --checkpoint, or export a new folder")
    handover = [model]
    del model
    with staged_folder(folder, force=False, keep=True) as staging:
        decoder_components = ("decoder", *contract.SPLIT_DECODER)
        old = [a for a in manifest.artifacts if a.component in decoder_components]
        for artifact in old:
            for name in [artifact.path, *artifact.extra_files]:
                (staging / name).unlink(missing_ok=True)
        manifest.artifacts = [a for a in manifest.artifacts if a.component not in decoder_components]
        artifacts = export_components(handover.pop(), variant, staging, options, reporter, components=("decoder",))
        for artifact in artifacts:
            manifest.add(artifact)
        manifest.model.update({key: value for key, value in model_contract(variant, options).items()
                               if key in ("decoder_profile", "mask_selection", "prompt_rules")})
        stale = _remove_decoder_results(staging)
        # built from the old decoder and not re-exported with it (the split halves are exported again)
        derived = [a.id for a in old if a.parent and a.id not in {new.id for new in artifacts}]
        app_configs = refresh_app_configs(staging, manifest, artifacts[0].id)
        manifest.history.append({"command": command or shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
                                 "step": "export", "components": ["decoder"], "replaced": [a.id for a in old],
                                 "removed_derived": derived, "stale_results_removed": stale,
                                 "app_configs": app_configs, "artifacts": [a.id for a in artifacts]})
        manifest.write(staging)
        if stale:
            write_folder_report(staging)
    for artifact in artifacts:
        reporter.artifact("ok", artifact.wall_time_s, folder / artifact.path, note=artifact.id)
    if derived:
        reporter.line(f"removed the decoders built from the old one ({', '.join(derived)}): re-run the recipe "
                      "or the precision/build step to rebuild them from the new decoder")
    if stale:
        reporter.line(f"removed results measured on the old decoder ({', '.join(stale)}): run validate again")
    for name, action in app_configs.items():
        reporter.line(f"{name}: {action}")
    return ExportResult(output=folder, manifest=manifest, artifacts=artifacts)


# Files (and picture folders) whose numbers were measured on a folder's decoders: after a decoder re-export
# they describe graphs that are gone, so they leave with them (validate / evaluate / bench write them anew).
DECODER_RESULT_FILES = ("parity.json", "parity.md", "junit.xml", "parity", "eval.json", "eval.md", "eval-junit.xml",
                        "eval", "bench.json", "bench.png")


def _remove_decoder_results(folder: Path) -> list[str]:
    import shutil

    removed = []
    for name in DECODER_RESULT_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
