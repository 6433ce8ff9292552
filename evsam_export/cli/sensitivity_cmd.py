"""`evsam-export sensitivity DIR`: which INT8 fallback group carries the encoder's quantization error."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app


class CalibrateMethod(str, Enum):
    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"


@app.command("sensitivity")
def sensitivity_command(
    folder: Annotated[Path, typer.Argument(help="Artifact folder with encoder.onnx.fp32 (a cpu-ort-int8 output lends its INT8 settings).")],
    groups: Annotated[
        str,
        typer.Option(
            help="Comma list of fallback groups, 'ungrouped' or 'all' (default: every encoder "
            "group, ungrouped and all; 'all' alone: only the every-node row)."
        ),
    ] = "",
    calibrate_method: Annotated[
        CalibrateMethod | None, typer.Option(help="Override the activation ranges (a new calibration, then cached).")
    ] = None,
    percentile: Annotated[float | None, typer.Option(help="Override the percentile of percentile ranges.")] = None,
    calibration_images: Annotated[int | None, typer.Option(help="Override the number of calibration images.")] = None,
    suite: Annotated[
        str, typer.Option("--suite", "-s", help="Parity suite whose images are measured (name or .toml path).")
    ] = "calibration-gate",
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads.")] = 2,
    report: Annotated[Path | None, typer.Option(help="JSON report path (default DIR/sensitivity.json).")] = None,
    debug: DebugOption = False,
) -> None:
    """Quantize one fallback group at a time (the rest fp32) and measure the embedding SNR against fp32."""

    def body() -> None:
        from evsam_export.errors import UsageError
        from evsam_export.precision.sensitivity import REPORT_NAME, measure_sensitivity, write_report
        from evsam_export.progress import Reporter

        if threads < 1:
            raise UsageError("--threads must be at least 1")
        overrides = {"calibrate_method": calibrate_method.value if calibrate_method else None, "percentile": percentile,
                     "calibration_images": calibration_images}
        wanted = [name.strip() for name in groups.split(",") if name.strip()]
        reporter = Reporter()
        # Rows take minutes on the large variants: each shows on the progress stream as soon as it is measured.
        result = measure_sensitivity(folder, wanted, overrides, suite, threads, reporter, on_result=lambda row: reporter.line(row.line()))
        typer.echo(result.header())
        for row in result.results:
            typer.echo(f"  {row.line()}")
        if result.skipped:
            typer.echo(f"no quantizable node in: {', '.join(result.skipped)}")
        path = write_report(result, report or folder / REPORT_NAME)
        typer.echo(f"wrote {path}")

    run_guarded(debug, body)
