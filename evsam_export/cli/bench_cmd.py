"""`evsam-export bench DIR`: latency, throughput, memory and load time against PyTorch and a plain export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app


@app.command("bench")
def bench_command(
    folder: Annotated[Path, typer.Argument(help="Artifact folder (with manifest.json).")],
    threads: Annotated[int, typer.Option(help="Intra-op threads for every runtime.")] = 2,
    runs: Annotated[int, typer.Option(help="Timed runs per subject (alternated across subjects).")] = 10,
    warmup: Annotated[int, typer.Option(help="Discarded warm-up runs per subject.")] = 2,
    batch: Annotated[list[int] | None, typer.Option("--batch", help="Encoder batch sizes (repeatable).")] = None,
    compare: Annotated[str, typer.Option(help="Baselines: comma list of pytorch, plain-onnx; empty for none.")] = "pytorch,plain-onnx",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak RSS per artifact in a subprocess.")] = True,
    record: Annotated[Path | None, typer.Option(
        "--record", metavar="DIR",
        help="Also write one result file per timing under DIR/<table>/ (docs/results for docs/benchmarks.md; "
             "default $EVSAM_RESULTS_DIR, unset: none).")] = None,
    debug: DebugOption = False,
) -> None:
    """Alternated timing of every artifact; writes bench.json and bench.png into DIR."""

    def body() -> None:
        from evsam_export import api
        from evsam_export.bench.run import prompt_ratios
        from evsam_export.bench.tables import table
        from evsam_export.errors import UsageError
        from evsam_export.measurements import record_measurement, results_dir
        from evsam_export.progress import Reporter

        baselines = tuple(x for x in compare.split(",") if x)
        unknown = set(baselines) - {"pytorch", "plain-onnx"}
        if unknown:
            raise UsageError(f"unknown baseline {sorted(unknown)[0]!r}", hint="use pytorch, plain-onnx or an empty string")
        if runs < 1 or threads < 1:
            raise UsageError("--runs and --threads must be at least 1")
        result = api.bench(folder, threads, runs, warmup, tuple(batch or [1]), baselines, memory, Reporter())
        typer.echo(f"cpu: {result.machine['cpu']}  flags: {' '.join(result.machine['cpu_flags'])}  threads: {threads}")
        typer.echo(table(result))
        for workload, ratio in prompt_ratios(result.timings).items():
            typer.echo(f"{workload}: Predictor.predict {ratio['predictor_vs_plain']:.2f}x as fast as the plain upstream decoder "
                       f"graph alone; host post-processing {100 * ratio['host_share']:.0f}% of it")
        typer.echo(f"wrote {folder / 'bench.json'} and {folder / 'bench.png'}")
        directory = results_dir(record)
        if directory is not None:
            from evsam_export.bench.tables import result_rows

            written = [record_measurement(directory, table, key, values, note=f"folder {folder.name}")
                       for table, key, values in result_rows(result)]
            typer.echo(f"recorded {len(written)} result rows under {directory}")

    run_guarded(debug, body)
