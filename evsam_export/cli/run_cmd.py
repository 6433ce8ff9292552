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
        help="Also write the run's wall time, peak memory and outcome as a result file under DIR/recipe-build/ "
             "(docs/results for docs/benchmarks.md; default $EVSAM_RESULTS_DIR, unset: none).")] = None,
    debug: DebugOption = False,
) -> None:
    """Export -> precision -> target build -> validate, as the recipe says; each step cached by content."""
    started = time.perf_counter()

    def body() -> None:
        from evsam_export.errors import ParityFailure
        from evsam_export.parity.report import console_table
        from evsam_export.pipeline.auto import is_auto_recipe
        from evsam_export.pipeline.recipe import load_recipe
        from evsam_export.pipeline.runner import StepCache, run_recipe
        from evsam_export.progress import Reporter

        if is_auto_recipe(recipe):
            _run_auto(recipe, variant.value, output, checkpoint, overrides or [], dry_run, no_cache, force, threads, record, started)
            return
        loaded = load_recipe(recipe, overrides or [])
        folder = output or Path("out") / f"{loaded.name}-{variant.value}"
        reporter = Reporter()
        cache = StepCache(enabled=not no_cache)
        result = run_recipe(loaded, variant.value, folder, checkpoint, force, dry_run, reporter, cache, command_line(), threads)
        if dry_run:
            typer.echo(f"recipe {loaded.name} ({loaded.path}) for {variant.value} -> {folder} (dry run: nothing written)")
            for step in result.steps:
                key = (step.key or "?")[:16]
                typer.echo(f"  {step.name:<18} {step.status:<6} parent={step.parent or '-'} key={key} settings={step.settings}")
            return
        reporter.print_summary()
        _record_build(record, loaded.name, variant.value, checkpoint, started, result.manifest,
                      "release gate failed" if result.passed is False else "nothing gained" if result.declined else "passed")
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
                  outcome: str) -> None:
    """One row of docs/results/recipe-build/: the run's wall time, this process's peak RSS, the outcome and what each
    lower-precision artifact holds (the step cache was used as the run was told; the row says how many steps ran)."""
    import resource

    from evsam_export.measurements import record_measurement, results_dir

    directory = results_dir(record)
    if directory is None:
        return
    history = manifest.history[-1] if manifest is not None and manifest.history else {}
    steps = history.get("steps", [])
    artifacts = manifest.artifacts if manifest is not None else []

    def facts(name: str, field: str) -> dict:
        return {a.id: a.facts[name][field] for a in artifacts if isinstance(a.facts.get(name), dict)}

    values = {"wall_s": round(time.perf_counter() - started, 1),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "outcome": outcome,
              "steps_built": sum(1 for s in steps if s.get("status") == "built"),
              "steps_reused": sum(1 for s in steps if s.get("status") == "reused"),
              "lowered": facts("lowered", "text"), "declined": facts("lowering", "line"),
              "speedup_over_parent": facts("speedup_over_parent", "speedup")}
    named = checkpoint and not checkpoint.startswith(("synthetic", "realistic"))
    checkpoint_label = Path(checkpoint).stem if named else (checkpoint or "synthetic-0")
    path = record_measurement(directory, "recipe-build", f"{recipe}-{variant}-{checkpoint_label}", values)
    typer.echo(f"recorded the build under {path}")


def _run_auto(recipe: str, variant: str, output: Path | None, checkpoint, overrides: list[str], dry_run: bool, no_cache: bool,
              force: bool, threads: int | None, record: Path | None = None, started: float = 0.0) -> None:
    """An auto recipe (recipes/cpu-auto.toml): every supported candidate built and gated, the fastest gated pair
    recommended; the table it decided from is printed and kept as auto.md."""
    from evsam_export.errors import ParityFailure
    from evsam_export.pipeline.auto import AUTO_MD, load_auto_recipe, run_auto, support_of
    from evsam_export.pipeline.runner import StepCache
    from evsam_export.progress import Reporter

    auto = load_auto_recipe(recipe, overrides)
    folder = output or Path("out") / f"{auto.name}-{variant}"
    if dry_run:
        typer.echo(f"auto recipe {auto.name} ({auto.path}) for {variant} -> {folder} (dry run: nothing written)")
        for name, candidate in zip(auto.candidates, auto.recipes):
            reason = support_of(candidate)
            typer.echo(f"  {name:<20} {'skip: ' + reason if reason else 'build, gate, time'}")
        return
    reporter = Reporter()
    result = run_auto(auto, variant, folder, checkpoint, force, reporter, StepCache(enabled=not no_cache), command_line(), threads)
    reporter.print_summary()
    from evsam_export.manifest import read_manifest

    _record_build(record, auto.name, variant, checkpoint, started, read_manifest(result.output),
                  "recommended a pair" if result.passed else "no pair passed")
    typer.echo((result.output / AUTO_MD).read_text())
    if not result.passed:
        raise ParityFailure(f"{auto.name}: no gated encoder/decoder pair passed end to end", hint=f"see {folder / AUTO_MD}")
