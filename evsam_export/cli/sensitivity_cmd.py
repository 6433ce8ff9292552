"""`evsam-export sensitivity DIR`: which INT8 fallback group carries the encoder's quantization error (ONNX Runtime
QDQ: one group INT8 at a time, embedding SNR; OpenVINO NNCF: one group fp32 at a time, scored end to end)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app
from evsam_export.precision.nncf_int8 import ACTIVATION_RANGES, PRESETS


class Backend(str, Enum):
    ort = "ort"
    openvino = "openvino"


Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)
ActivationsRange = Enum("ActivationsRange", {name: name for name in ACTIVATION_RANGES}, type=str)


class CalibrateMethod(str, Enum):
    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"


@app.command("sensitivity")
def sensitivity_command(
    folder: Annotated[Path, typer.Argument(help="Artifact folder with encoder.onnx.fp32 (a cpu-ort-int8 / cpu-openvino-int8 "
                                            "output lends its INT8 settings).")],
    backend: Annotated[
        Backend, typer.Option(help="ort: ONNX Runtime QDQ, each group alone INT8, embedding SNR. openvino: NNCF, each "
                              "group alone fp32 (the rest INT8), SNR + mask IoU and mIoU drop per prompt kind + speed.")
    ] = Backend.ort,
    groups: Annotated[
        str,
        typer.Option(
            help="Comma list of rows. ort: fallback groups, 'ungrouped' or 'all' (default: every encoder group, ungrouped "
            "and all; 'all' alone: only the every-node row), or 'regions' alone: each block of quantized ops alone INT8, "
            "most harmful first (the ranked fallback's ranking). openvino: 'none' or encoder regions joined by '+' "
            "(default: none and every NNCF fallback group)."
        ),
    ] = "",
    calibrate_method: Annotated[
        CalibrateMethod | None, typer.Option(help="Override the activation ranges (a new calibration, then cached).")
    ] = None,
    percentile: Annotated[float | None, typer.Option(help="Override the percentile of percentile ranges.")] = None,
    calibration_images: Annotated[int | None, typer.Option(help="Override the number of calibration images.")] = None,
    preset: Annotated[Preset | None, typer.Option(help="openvino: override the NNCF preset.")] = None,
    fast_bias_correction: Annotated[
        bool | None, typer.Option("--fast-bias-correction/--full-bias-correction", help="openvino: override NNCF's bias correction.")
    ] = None,
    activations_range: Annotated[
        ActivationsRange | None, typer.Option(help="openvino: override NNCF's activation range estimator.")
    ] = None,
    scenes: Annotated[int, typer.Option(help="openvino: held-out synthetic scenes scored end to end.")] = 4,
    bench_runs: Annotated[int, typer.Option(help="openvino: alternated encoder runs (each IR against ORT fp32) per row.")] = 3,
    suite: Annotated[
        str, typer.Option("--suite", "-s", help="ort: parity suite whose images are measured (name or .toml path).")
    ] = "calibration-gate",
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads.")] = 2,
    report: Annotated[Path | None, typer.Option(help="JSON report path (default DIR/sensitivity.json).")] = None,
    record: Annotated[Path | None, typer.Option(
        "--record", metavar="DIR",
        help="Also write one result file per row under DIR/int8-sensitivity-<backend>/ (docs/results for "
             "docs/benchmarks.md; default $EVSAM_RESULTS_DIR, unset: none).")] = None,
    debug: DebugOption = False,
) -> None:
    """Measure which INT8 fallback group carries the encoder's error, one group at a time (see --backend)."""

    def body() -> None:
        import dataclasses

        from evsam_export import api
        from evsam_export.errors import UsageError
        from evsam_export.measurements import record_measurement, results_dir
        from evsam_export.pipeline.sensitivity import REPORT_NAME, write_report
        from evsam_export.progress import Reporter

        if threads < 1:
            raise UsageError("--threads must be at least 1")
        wanted = [name.strip() for name in groups.split(",") if name.strip()]
        reporter = Reporter()
        # Rows take minutes on the large variants: each shows on the progress stream as soon as it is measured.
        show = lambda row: reporter.line(row.line())  # noqa: E731
        if backend is Backend.openvino:
            if calibrate_method or percentile is not None:
                raise UsageError("--calibrate-method and --percentile are ONNX Runtime settings", hint="use them with --backend ort")
            overrides = {"calibration_images": calibration_images, "preset": preset.value if preset else None,
                         "fast_bias_correction": fast_bias_correction,
                         "activations_range": activations_range.value if activations_range else None}
            result = api.sensitivity(folder, "openvino", wanted, overrides, threads, scenes=scenes, bench_runs=bench_runs,
                                     reporter=reporter, on_result=show)
        else:
            if preset or fast_bias_correction is not None or activations_range:
                raise UsageError("--preset and --fast/--full-bias-correction are NNCF settings", hint="use them with --backend openvino")
            overrides = {"calibrate_method": calibrate_method.value if calibrate_method else None, "percentile": percentile,
                         "calibration_images": calibration_images}
            result = api.sensitivity(folder, "ort", wanted, overrides, threads, suite=suite, reporter=reporter, on_result=show)
        typer.echo(result.header())
        for row in result.results:
            typer.echo(f"  {row.line()}")
        if getattr(result, "skipped", None):
            typer.echo(f"no quantizable node in: {', '.join(result.skipped)}")
        path = write_report(result, report or folder / REPORT_NAME)
        typer.echo(f"wrote {path}")
        directory = results_dir(record)
        if directory is not None:
            table = f"int8-sensitivity-{backend.value}"
            for row in result.results:
                values = {"variant": result.variant, "group": row.group,
                          **{k: v for k, v in dataclasses.asdict(row).items() if k not in ("group", "seconds")}}
                record_measurement(directory, table, f"{result.variant}-{folder.name}-{row.group}", values, note=f"folder {folder.name}")
            typer.echo(f"recorded {len(result.results)} result rows under {directory / table}")

    run_guarded(debug, body)
