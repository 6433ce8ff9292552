"""`evsam-export evaluate DIR --annotations FILE`: mIoU against COCO-format ground truth for PyTorch and every
artifact pairing; `evaluate --merge SHARD_DIR... --output DIR` joins the shards of a split run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import CheckpointOption, DebugOption, run_guarded
from evsam_export.cli.root import app


@app.command("evaluate")
def evaluate_command(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="DIR", help="Artifact folder (with manifest.json); with --merge, the shards' output folders.", show_default=False
        ),
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option("--annotations", metavar="FILE", help="COCO-format instances JSON (COCO, LVIS, SA-1B).")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", metavar="IMGDIR", help="Folder the annotations' file_name entries are in (default: FILE's folder)."),
    ] = None,
    checkpoint: CheckpointOption = None,
    prompts: Annotated[str, typer.Option("--prompts", help="Prompt kinds: box, point or both.")] = "box,point",
    limit: Annotated[int | None, typer.Option("--limit", min=1, metavar="N", help="Evaluate N images sampled with --seed.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --limit sample.")] = 0,
    shard: Annotated[
        str | None, typer.Option("--shard", metavar="K/N", help="Evaluate only shard K of N (1-based); merge with --merge.")
    ] = None,
    artifact: Annotated[list[str] | None, typer.Option("--artifact", "-a", help="Only these artifact ids (repeatable).")] = None,
    max_drop: Annotated[
        str | None,
        typer.Option("--max-drop", metavar="PTS", help="Exit 10 when an artifact's mIoU is more than PTS points below PyTorch's "
                     "(one number, or per prompt kind: box=1,point=2)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="DIR", help="Where eval.json/.md and eval-junit.xml go (default: DIR).")
    ] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Merge the eval.json of the shard folders given as DIR... into --output.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Runtime threads (default: the runtime's).")] = None,
    record: Annotated[Path | None, typer.Option(
        "--record", metavar="DIR",
        help="Also write one result file per pipeline under DIR/evaluate/ (docs/results for docs/benchmarks.md; "
             "default $EVSAM_RESULTS_DIR, unset: none).")] = None,
    debug: DebugOption = False,
) -> None:
    """mIoU against your ground truth (box and point prompts, the paper's zero-shot protocol), for the PyTorch
    reference and every encoder -> decoder pairing in DIR; eval.json, eval.md and eval-junit.xml."""

    def body() -> None:
        from evsam_export.errors import ParityFailure, UsageError
        from evsam_export.evaluation.protocol import parse_prompt_kinds
        from evsam_export.evaluation.report import EVAL_JSON, drop_failures, merge_evaluations, result_rows, results, write_evaluation
        from evsam_export.measurements import record_measurement, results_dir
        from evsam_export.output import check_writable_parent
        from evsam_export.parity.task_settings import parse_max_drop_text
        from evsam_export.progress import Reporter

        limits = parse_max_drop_text(max_drop) if max_drop is not None else None
        given = folders or []
        if merge:
            if not given or output is None:
                raise UsageError(
                    "--merge needs the shards' output folders and --output DIR", hint="evaluate --merge s1 s2 ... --output merged"
                )
            extra = [name for name, value in (("--annotations", annotations), ("--shard", shard), ("--limit", limit)) if value is not None]
            if extra:
                raise UsageError(f"--merge takes no {extra[0]}", hint="the shards' eval.json files say how they were made")
        elif len(given) != 1 or annotations is None:
            raise UsageError(
                "evaluate takes one artifact folder DIR and --annotations FILE", hint="evaluate DIR --annotations instances.json"
            )
        target = output if output is not None else given[0]
        check_writable_parent(target / EVAL_JSON)  # fail before any model runs, not after
        reporter = Reporter()
        started = time.perf_counter()
        if merge:
            evaluation = merge_evaluations(given)
        else:
            from evsam_export import api
            from evsam_export.data.coco import parse_shard

            evaluation = api.evaluate(
                given[0],
                annotations,
                images,
                checkpoint,
                parse_prompt_kinds(prompts),
                limit,
                seed,
                parse_shard(shard) if shard else None,
                artifact or None,
                threads,
                reporter,
            )
        paths = write_evaluation(evaluation, target, limits)
        entries = results(evaluation)
        for entry in entries:
            drop = entry.get("drop_points")
            typer.echo(
                f"{entry['pipeline']:<48} {entry['prompt']:<6} mIoU {100 * entry['miou']:6.2f}  ({entry['instances']} instances)"
                + ("" if drop is None else f"  drop {drop:+.2f} points")
            )
        for name, reason in evaluation.unavailable.items():
            typer.echo(f"{name:<48} skip   {reason}")
        rate = evaluation.images / evaluation.seconds if evaluation.seconds > 0 else 0.0
        failures = drop_failures(entries, limits)
        reporter.artifact(
            "fail" if failures else "ok",
            time.perf_counter() - started,
            paths["eval.json"],
            note=f"{evaluation.images} images, {len(evaluation.image_ids)} instances, {rate:.2f} images/s",
        )
        reporter.print_summary()
        directory = results_dir(record)
        if directory is not None:
            for key, values in result_rows(evaluation):
                record_measurement(directory, "evaluate", key, values)
        for line in failures:
            typer.echo(f"FAILED {line}", err=True)
        if failures:
            raise ParityFailure(
                f"{len(failures)} result(s) dropped more than --max-drop {max_drop} points", hint=f"see {paths['eval.md']}"
            )

    run_guarded(debug, body)
