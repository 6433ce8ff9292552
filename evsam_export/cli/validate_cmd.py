"""`evsam-export validate DIR`: the parity gate (exit 0 only when every gate passes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import CheckpointOption, DebugOption, run_guarded
from evsam_export.cli.root import app


@app.command("validate")
def validate_command(
    folder: Annotated[Path, typer.Argument(help="Artifact folder (with manifest.json).")],
    suite: Annotated[str, typer.Option("--suite", "-s", help="Parity suite: a name in validators/ or a .toml path.")] = "default",
    checkpoint: CheckpointOption = None,
    reference: Annotated[Path | None, typer.Option(help="Compare against saved reference outputs (.npz) instead of PyTorch.")] = None,
    save_reference: Annotated[Path | None, typer.Option(help="Also save the PyTorch reference outputs to this .npz.")] = None,
    junit: Annotated[Path | None, typer.Option(help="JUnit XML path (default DIR/junit.xml).")] = None,
    artifact: Annotated[list[str] | None, typer.Option("--artifact", "-a", help="Only these artifact ids (repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    images: Annotated[Path | None, typer.Option(
        help="Validate on a folder of your images (PNG/JPEG/TIFF/BMP/WebP, recursive) with the suite's prompt kinds and gates; "
             "with --annotations: the folder its file_names are in (default: the file's folder).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        help="Validate on a COCO-format instances JSON: also measures mIoU against it (the evaluate protocol) for PyTorch "
             "and every lower-precision artifact.")] = None,
    max_drop: Annotated[str | None, typer.Option(
        "--max-drop", metavar="PTS",
        help="With --annotations: lower precisions pass on an mIoU drop vs PyTorch of at most PTS points "
             "(one number or box=1,point=2) instead of agreement with fp32; NaN/Inf and gross-error floors still decide.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="With --images or --annotations: sample this many images.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="With --images or --annotations: seed of the --limit sample.")] = 0,
    debug: DebugOption = False,
) -> None:
    """Prove that every artifact segments like PyTorch: encoder, decoder and end-to-end stages."""

    def body() -> None:
        from evsam_export import api
        from evsam_export.errors import ParityFailure
        from evsam_export.output import check_writable_parent
        from evsam_export.parity.report import console_table
        from evsam_export.progress import Reporter

        # Reports go into the folder and the optional paths: refuse an unwritable one before any model runs.
        written = [folder / "parity.md"] if folder.is_dir() else []
        for path in [*written, junit, save_reference]:
            if path is not None:
                check_writable_parent(path)
        from evsam_export.errors import UsageError
        from evsam_export.parity.task_settings import parse_max_drop_text

        if images is None and annotations is None and (limit is not None or seed):
            raise UsageError("--limit and --seed sample the --images folder or the --annotations set", hint="add --images PATH")
        drop = parse_max_drop_text(max_drop) if max_drop is not None else None
        reporter = Reporter()
        report = api.validate(folder, suite, checkpoint, reference, save_reference, junit, artifact or None, reporter, threads,
                              images, limit, seed, annotations, drop)
        typer.echo(console_table(report))
        for gate in report.failed_gates:
            typer.echo(f"FAILED {gate.line()}", err=True)
        if report.advisory_misses:
            typer.echo(f"note: {len(report.advisory_misses)} agreement gate(s) missed but not deciding: the mIoU drop against "
                       f"ground truth decides (see {folder / 'parity.md'})", err=True)
        if report.skipped_images:
            typer.echo(f"warning: {len(report.skipped_images)} unreadable image(s) skipped, listed in {folder / 'parity.md'}", err=True)
        typer.echo(f"report: {folder / 'parity.md'}, {folder / 'report.html'}")
        if not report.stages:
            raise ParityFailure("no artifact could be validated", hint="install the missing runtimes listed above")
        if not report.passed:
            raise ParityFailure(f"{len(report.failed_gates)} parity gate(s) failed", hint=f"see {folder / 'parity.md'}")

    run_guarded(debug, body)
