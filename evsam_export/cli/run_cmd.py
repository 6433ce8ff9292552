"""`evsam-export run RECIPE`: a complete, validated artifact folder from one recipe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import CheckpointOption, DebugOption, command_line, run_guarded
from evsam_export.cli.export_cmd import VariantChoice
from evsam_export.cli.root import app


@app.command("run")
def run_command(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe's name (e.g. cpu-ort-int8; see recipes/) or a .toml path.")],
    variant: Annotated[VariantChoice, typer.Option("--variant", "-v", help="Model variant.")] = VariantChoice.l0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Artifact folder (default out/<recipe>-<variant>).")
    ] = None,
    checkpoint: CheckpointOption = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe field: section.key=value (repeatable).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check every step's settings, print the plan (steps, cache reuse), write nothing."),
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Rebuild every step and store nothing: the step cache is neither read nor written.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    threads: Annotated[int | None, typer.Option(help="Runtime threads for calibration and validation.")] = None,
    record: Annotated[Path | None, typer.Option(
        "--record", metavar="DIR",
        help="Also write the run's wall time, peak memory and outcome as a result row under DIR/recipes/ "
             "(docs/results for docs/benchmarks.md; default $EVSAM_RESULTS_DIR, unset: none).")] = None,
    debug: DebugOption = False,
) -> None:
    """Export -> precision -> target build -> validate, as the recipe says; each step cached by content."""
    started = time.perf_counter()

    def body() -> None:
        from evsam_export import api
        from evsam_export.errors import ParityFailure
        from evsam_export.parity.report import console_table
        from evsam_export.pipeline.auto import is_auto_recipe
        from evsam_export.progress import Reporter

        if is_auto_recipe(recipe):
            _run_auto(recipe, variant.value, output, checkpoint, overrides or [], dry_run, no_cache, force, threads, record, started)
            return
        reporter = Reporter()
        loaded, folder, result = api.run(recipe, variant.value, output, checkpoint, overrides or [], force, dry_run, not no_cache,
                                         threads, reporter, command_line())
        if dry_run:
            typer.echo(f"recipe {loaded.name} ({loaded.path}) for {variant.value} -> {folder} (dry run: nothing written)")
            for step in result.steps:
                key = (step.key or "?")[:16]
                typer.echo(f"  {step.name:<18} {step.status:<6} parent={step.parent or '-'} key={key} settings={step.settings}")
            return
        reporter.print_summary()
        _record_build(record, loaded.name, variant.value, checkpoint, started, result.manifest,
                      10 if result.passed is False else 11 if result.declined else 0)
        if result.report is not None and hasattr(result.report, "stages"):
            typer.echo(console_table(result.report))
        elif result.passed:
            typer.echo(f"parity: pass (reused: no artifact changed since the last validation; {folder / 'parity.md'})")
        if result.passed is False:
            raise ParityFailure("the recipe's artifacts failed their parity gate", hint=f"see {folder / 'parity.md'}")
        if result.declined:
            from evsam_export.errors import NothingGained

            raise NothingGained(f"{loaded.name}: built, but nothing gained ({'; '.join(result.declined)})",
                                hint="the fp32 artifacts ship under fp32 names; see the manifest's facts.lowering")

    run_guarded(debug, body)


def _record_build(record: Path | None, recipe: str, variant: str, checkpoint: str | None, started: float, manifest,
                  exit_code: int) -> None:
    """One row of docs/results/recipes/: the run's wall time, this process's peak RSS, its exit code, what each
    lower-precision artifact holds and how its build gate went (the step cache was used as the run was told;
    the row counts the steps it built and reused)."""
    import resource

    from evsam_export.measurements import record_measurement, results_dir
    from evsam_export.steps.fallback import summary_outcome

    directory = results_dir(record)
    if directory is None:
        return
    history = manifest.history[-1] if manifest is not None and manifest.history else {}
    steps = history.get("steps", [])
    lowered = [a for a in (manifest.artifacts if manifest is not None else [])
               if isinstance(a.facts.get("lowered"), dict) or isinstance(a.facts.get("lowering"), dict)]
    # An auto recipe keeps every candidate's artifacts: say which ones belong to a candidate that was not gated through.
    not_passed = {artifact: c["status"] for c in history.get("candidates", []) if c.get("status") != "passed"
                  for artifact in c.get("artifacts", [])}

    def described(a) -> str:
        text = f"{a.id} ({a.facts['lowered']['text']})" if "lowered" in a.facts else a.id
        return text + (f" [candidate {not_passed[a.id]}]" if a.id in not_passed else "")

    values = {"recipe": recipe, "variant": variant, "checkpoint": checkpoint or "synthetic:0", "exit": exit_code,
              "wall": f"{time.perf_counter() - started:.0f} s",
              "peak_rss": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB",
              "lower_precision_artifact": "; ".join(described(a) for a in lowered),
              "speedup_over_fp32_parent": "; ".join(f"{a.facts['speedup_over_parent']['speedup']:.2f}x" for a in lowered
                                                    if isinstance(a.facts.get("speedup_over_parent"), dict)),
              "build_gate": "; ".join(outcome for a in lowered if (outcome := summary_outcome(a.facts)[1])),
              "steps": f"{sum(1 for s in steps if s.get('status') == 'built')} built, "
                       f"{sum(1 for s in steps if s.get('status') == 'reused')} reused"}
    if "candidates" in history:  # an auto recipe: each candidate's outcome and build time instead of steps
        values["steps"] = ", ".join(f"{c['recipe']} {c['status']} ({c['seconds']:.0f} s)" for c in history["candidates"])
    path = record_measurement(directory, "recipes", f"{variant}-{recipe}" + (f"-{Path(checkpoint).stem}" if checkpoint else ""), values)
    typer.echo(f"recorded the build under {path}")


def _run_auto(recipe: str, variant: str, output: Path | None, checkpoint, overrides: list[str], dry_run: bool, no_cache: bool,
              force: bool, threads: int | None, record: Path | None = None, started: float = 0.0) -> None:
    """An auto recipe (recipes/cpu-auto.toml): every supported candidate built and gated, the fastest gated pair
    recommended; the table it decided from is printed and kept as auto.md."""
    from evsam_export import api
    from evsam_export.errors import ParityFailure
    from evsam_export.pipeline.auto import AUTO_MD, support_of
    from evsam_export.progress import Reporter

    reporter = Reporter()
    auto, folder, result = api.run(recipe, variant, output, checkpoint, overrides, force, dry_run, not no_cache, threads, reporter,
                                   command_line())
    if dry_run:
        typer.echo(f"auto recipe {auto.name} ({auto.path}) for {variant} -> {folder} (dry run: nothing written)")
        for name, candidate in zip(auto.candidates, auto.recipes):
            reason = support_of(candidate)
            typer.echo(f"  {name:<20} {'skip: ' + reason if reason else 'build, gate, time'}")
        return
    reporter.print_summary()
    from evsam_export.manifest import read_manifest

    _record_build(record, auto.name, variant, checkpoint, started, read_manifest(result.output), 0 if result.passed else 10)
    typer.echo((result.output / AUTO_MD).read_text())
    if not result.passed:
        raise ParityFailure(f"{auto.name}: no gated encoder/decoder pair passed end to end", hint=f"see {folder / AUTO_MD}")
