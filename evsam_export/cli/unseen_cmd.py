"""`evsam-export unseen DIR`: a lower-precision pair scored on synthetic scenes no gate, calibration or training
saw, against the folder's fp32 pair (exit 1 when it misses a floor)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app


@app.command("unseen")
def unseen_command(
    folder: Annotated[Path, typer.Argument(help="Artifact folder (with manifest.json and its fp32 ONNX pair).")],
    encoder: Annotated[str | None, typer.Option(help="Encoder artifact id (default: the folder's lowest-precision one).")] = None,
    decoder: Annotated[str | None, typer.Option(help="Decoder artifact id (default: the folder's lowest-precision one).")] = None,
    scenes: Annotated[int, typer.Option(min=1, help="Unseen scenes to score.")] = 8,
    threads: Annotated[int, typer.Option(min=1, help="Runtime threads.")] = 2,
    bench_runs: Annotated[int, typer.Option(min=1, help="Alternated encoder runs for the speed ratio.")] = 6,
    record: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Also write the result as DIR/unseen-check/<variant>-<pair>.json (docs/results for "
                            "docs/benchmarks.md; default $EVSAM_RESULTS_DIR, unset: none).")] = None,
    debug: DebugOption = False,
) -> None:
    """Score an artifact pair on unseen scenes: embedding SNR, mask IoU vs fp32, mIoU drop, encoder speed ratio."""

    def body() -> dict:
        from evsam_export import api
        from evsam_export.cli.common import command_line

        return api.check_unseen(folder, encoder, decoder, scenes, threads, bench_runs, record=record, command=command_line())

    import json

    result = run_guarded(debug, body)
    typer.echo(json.dumps(result, indent=2))
    if result["failures"]:
        raise typer.Exit(1)
