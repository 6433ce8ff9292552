"""The Python API; the CLI is a thin layer over these functions.

    from evsam_export import api
    result = api.export("l0", output="out/l0")              # synthetic:0 weights
    report = api.validate("out/l0")                          # parity gate
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export import contract
from evsam_export.export.graph_passes import EXPORT_PASSES, check_pass_names
from evsam_export.manifest import Artifact, Manifest, environment, sha256_file
from evsam_export.model.variants import LOW_RES_MASK_SIZE, PIXEL_MEAN, PIXEL_STD, PROMPT_FRAME, Variant, get_variant
from evsam_export.progress import Reporter


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    dynamic_batch: bool = True
    dynamic_prompts: bool = True
    decoder_profile: str = "sam"  # sam | tensorrt
    single_mask: bool = False
    simplify: str = "auto"  # auto | onnxsim | onnxslim | none
    # Portable graph passes run after simplification (evsam_export.export.graph_passes; [] for none).
    graph_passes: tuple[str, ...] = EXPORT_PASSES

    def __post_init__(self) -> None:  # recipes give lists; keep the frozen object hashable
        object.__setattr__(self, "graph_passes", check_pass_names(self.graph_passes, ("portable",)))


@dataclass
class ExportResult:
    output: Path
    manifest: Manifest
    artifacts: list[Artifact] = field(default_factory=list)


def model_contract(variant: Variant, options: ExportOptions) -> dict:
    """What a consumer must know to feed the graphs (recorded in manifest.json)."""
    return {
        "encoder_input": {
            "layout": "NCHW RGB",
            "resize": f"Pillow bilinear, longest side to {variant.encoder_size}",
            "normalize": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "scale": "0..255"},
            "pad": f"zeros at bottom/right to {variant.encoder_size}x{variant.encoder_size}",
        },
        "prompt_frame": PROMPT_FRAME,
        "prompt_rules": {
            "coords": f"pixel (x, y) scaled so the image's longest side is {PROMPT_FRAME}",
            "labels": {f"{label:g}": meaning for label, meaning in contract.POINT_LABEL_MEANINGS.items()},
            "padding_point": "append (0, 0) with label -1 when there is no box (PyTorch SAM); never after a box",
            "boxes": "one prompt set per box: point_coords [B,2,2] (+ points) with labels [2,3]",
        },
        "decoder_profile": options.decoder_profile,
        "mask_selection": contract.mask_selection(options.single_mask),
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

    feeds = contract.sample_feeds(spec, batch=2 if spec.component == "decoder" else 1, num_points=3, seed=3)
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

    options = options or ExportOptions()
    reporter = reporter or Reporter()
    spec_variant = get_variant(variant)
    output = check_output_folder(Path(output), force)
    with reporter.step(f"load EfficientViT-SAM-{spec_variant.name} weights ({checkpoint or 'synthetic:0'})"):
        model, weights = load_model(spec_variant, checkpoint)
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


def export_components(model, variant: Variant, folder: Path, options: ExportOptions, reporter: Reporter) -> list[Artifact]:
    """Trace both components, then simplify, rewrite and check them with the PyTorch model freed.

    The model is released once both graphs and their PyTorch reference outputs exist, so a caller that
    passes its only reference lets simplification and the ORT checks run without it (docs/benchmarks.md,
    "Export memory")."""
    import gc

    from evsam_export.export.onnx_export import export_onnx, op_histogram
    from evsam_export.export.simplify import simplify_graph
    from evsam_export.model.sam import DecoderGraph, EncoderGraph

    jobs = [
        ("encoder", EncoderGraph(model), contract.encoder_spec(variant, options.dynamic_batch)),
        (
            "decoder",
            DecoderGraph(model, options.decoder_profile, options.single_mask),
            contract.decoder_spec(options.decoder_profile, options.single_mask, options.dynamic_prompts),
        ),
    ]
    del model
    traced = []
    while jobs:
        component, module, spec = jobs.pop(0)
        started = time.perf_counter()
        path = folder / f"{component}.fp32.onnx"
        with reporter.step(f"trace {component} to ONNX (opset {options.opset})"):
            export_onnx(module, spec, path, options.opset)
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
        import onnx

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
                settings={
                    "opset": options.opset,
                    "exporter": "torchscript",
                    "dynamic_axes": spec.dynamic_axes(),
                    **({"decoder_profile": spec.profile, "single_mask": spec.single_mask} if component == "decoder" else {}),
                },
                facts={
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


def validate(
    folder: str | Path,
    suite: str | Path = "default",
    checkpoint: str | None = None,
    reference: str | Path | None = None,
    save_reference: str | Path | None = None,
    junit: str | Path | None = None,
    artifacts: list[str] | None = None,
    reporter: Reporter | None = None,
    threads: int | None = None,
):
    """Run the parity gate on an artifact folder; writes parity.json, parity.md, junit.xml and overlays.

    Returns the ParityReport; `report.passed` is the gate (the CLI exits non-zero when it is False)."""
    from evsam_export.parity.report import write_reports
    from evsam_export.parity.suites import load_suite
    from evsam_export.parity.validate import validate_folder

    folder = Path(folder)
    loaded = load_suite(suite)
    report = validate_folder(
        folder,
        loaded,
        checkpoint=checkpoint,
        reference_path=Path(reference) if reference else None,
        save_reference=Path(save_reference) if save_reference else None,
        artifacts=artifacts,
        reporter=reporter,
        threads=threads,
    )
    write_reports(report, folder, Path(junit) if junit else None)
    record_validation(folder, report)
    return report


def record_validation(folder: Path, report) -> None:
    """Append the gate's verdict to manifest.json's history (the artifacts themselves are unchanged)."""
    from evsam_export.manifest import read_manifest

    manifest = read_manifest(folder)
    manifest.history.append({
        "step": "validate",
        "command": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "suite": report.suite,
        "reference": report.reference_source,
        "passed": report.passed,
        "stages": {f"{s.pairing or s.artifact}/{s.stage}": s.passed for s in report.stages},
        "failed_gates": [g.line() for g in report.failed_gates],
        "unavailable": report.unavailable,
    })
    manifest.write(folder)


__all__ = ["ExportOptions", "ExportResult", "export", "validate"]
