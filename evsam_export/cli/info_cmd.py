"""`evsam-export targets` and `evsam-export doctor`: what can be built here, and why not."""

from __future__ import annotations

from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app


@app.command("targets")
def targets_command(debug: DebugOption = False) -> None:
    """Every target with its availability here (and the reason when it is missing)."""

    def body() -> None:
        from evsam_export import api

        availability = api.availability()
        for target in api.targets():
            state = availability[target.runtime]
            status = f"available ({target.runtime} {state.version})" if state.available else f"missing: {state.reason}"
            if target.name == "tensorrt" and not state.available:
                status += " -> `run` leaves a trtexec build kit instead"
            typer.echo(f"{target.name:<9} {target.device:<4} {'/'.join(target.precisions):<15} {status}")
            typer.echo(f"{'':<9} {target.description}")
        from evsam_export.export.graph_passes import PASSES

        typer.echo("\ngraph passes (portable: run at export; onnxruntime: run by the ort and ort-int8 steps)")
        for graph_pass in PASSES.values():
            typer.echo(f"{graph_pass.name:<26} {graph_pass.runtime:<11} {graph_pass.measured}")
            typer.echo(f"{'':<26} {graph_pass.reason}")
        from evsam_export.runners.split_decoder import SPLIT_DECODER_SUMMARY

        typer.echo("\nsplit decoder (every export unless --no-split-decoder; our Predictor runs it in the decoder's place)")
        for line in SPLIT_DECODER_SUMMARY:
            typer.echo(line)

    run_guarded(debug, body)


@app.command("doctor")
def doctor_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: DebugOption = False,
) -> None:
    """Versions, CPU model and SIMD flags (AVX2/AVX-512/VNNI/AMX), GPU, and what each target needs."""

    def body() -> None:
        import json

        from evsam_export import api
        from evsam_export.environment import environment
        from evsam_export.runners.tensorrt_runner import cuda_device_count

        env = environment()
        gpus, gpu_reason = cuda_device_count()
        availability = api.availability()
        flags = set(env["cpu_flags"])
        notes = []
        if not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags):
            notes.append(
                "no VNNI: INT8 runs without dot-product instructions (smaller speed-up, possible saturation; NNCF overflow_fix matters)"
            )
        if {"avx512_bf16", "amx_bf16"} & flags:
            notes.append("bf16-capable CPU: OpenVINO would silently run bf16 without a precision hint (evsam-export always sets one)")
        recipes = api.recipe_readiness(flags, availability)
        data = {
            **env,
            "recipes": recipes,
            "gpus": gpus,
            "gpu_note": gpu_reason,
            "runtimes": {k: {"available": v.available, "version": v.version, "reason": v.reason} for k, v in availability.items()},
            "targets": {
                t.name: {"needs": t.runtime, "device": t.device, "ready": availability[t.runtime].available} for t in api.targets()
            },
            "notes": notes,
        }
        if json_output:
            typer.echo(json.dumps(data, indent=2))
            return
        typer.echo(f"evsam-export  python {env['python']}  {env['platform']}")
        typer.echo(f"cpu           {env['cpu']} ({env['cpu_count']} logical)  flags: {' '.join(env['cpu_flags']) or '-'}")
        typer.echo(f"gpu           {gpus} CUDA device(s){'' if gpus else ' (' + gpu_reason + ')'}")
        for name, version in env["packages"].items():
            typer.echo(f"{name:<13} {version or 'not installed'}")
        for target in api.targets():
            state = availability[target.runtime]
            typer.echo(f"target {target.name:<9} {'ready' if state.available else 'missing: ' + state.reason}")
        for name, entry in recipes.items():
            needs = f"needs {entry['cpu_needs']}" if entry["cpu_needs"] else "no CPU flag needed"
            typer.echo(f"recipe {name:<18} {'ready' if entry['ready'] else 'not here: ' + entry['why_not']}  ({needs})")
        for note in notes:
            typer.echo(f"note: {note}")

    run_guarded(debug, body)


@app.command("register-engines")
def register_engines_command(
    folder: Annotated[str, typer.Argument(help="Artifact folder whose tensorrt-kit/build_engines.sh was run on the GPU.")],
    debug: DebugOption = False,
) -> None:
    """Replace TensorRT build-kit entries with the engines built by tensorrt-kit/build_engines.sh."""

    def body() -> None:
        from evsam_export import api

        for artifact in api.register_engines(folder):
            typer.echo(f"registered {artifact.id}: {artifact.path} ({artifact.facts.get('runs_on')})")

    run_guarded(debug, body)
