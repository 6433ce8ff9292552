"""`evsam-export cache verify|prune|clear`: look after the step cache ($EVSAM_CACHE_DIR/steps)."""

from __future__ import annotations

from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app

cache_app = typer.Typer(
    help="Check, shrink or empty the step cache that `run` reuses ($EVSAM_CACHE_DIR/steps, default ~/.cache/evsam-export/steps).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


def _summary(verb: str, tally) -> str:
    from evsam_export.progress import human_size

    text = (f"{verb}: {tally.entries} entries, {human_size(tally.bytes)} ({tally.bytes} bytes); "
            f"removed {tally.removed_entries} entries, {human_size(tally.removed_bytes)} ({tally.removed_bytes} bytes)")
    if tally.removed_scratch:
        text += f", {tally.removed_scratch} temporary folders of finished processes"
    return text


@cache_app.command("verify")
def verify_command(
    fix: Annotated[bool, typer.Option("--fix", help="Remove every bad entry (its step is rebuilt on the next run).")] = False,
    debug: DebugOption = False,
) -> None:
    """Check every entry's files against the size and sha256 recorded when it was stored."""

    def body() -> None:
        from evsam_export import api
        from evsam_export.errors import ArtifactError
        from evsam_export.progress import human_size

        cache = api.step_cache()
        found, tally = cache.verify(fix=fix)
        for info in found:
            state = "ok " if info.problem is None else ("removed" if fix else "BAD")
            detail = f"  {info.problem}" if info.problem else ""
            typer.echo(f"{state:<7} {info.key}  {human_size(info.size_bytes)}{detail}")
        bad = sum(info.problem is not None for info in found)
        typer.echo(_summary(f"verified {cache.root} ({bad} bad)", tally))
        if bad and not fix:
            raise ArtifactError(f"{bad} bad step cache entries in {cache.root}",
                                hint="run `evsam-export cache verify --fix` to remove them; their steps are rebuilt on the next run")

    run_guarded(debug, body)


@cache_app.command("prune")
def prune_command(
    older_than: Annotated[
        float | None, typer.Option("--older-than", min=0, help="Remove entries not used (stored or reused) for DAYS days.", metavar="DAYS")
    ] = None,
    max_gib: Annotated[
        float | None,
        typer.Option("--max-gib", min=0, help="Then remove the least recently used entries until at most this many GiB remain."),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Remove entries by age and/or total size, least recently used first."""

    def body() -> None:
        from evsam_export import api
        from evsam_export.errors import UsageError

        if older_than is None and max_gib is None:
            raise UsageError("nothing to prune by", hint="give --older-than DAYS and/or --max-gib GIB")
        cache = api.step_cache()
        max_bytes = None if max_gib is None else int(max_gib * (1 << 30))
        typer.echo(_summary(f"pruned {cache.root}", cache.prune(older_than_days=older_than, max_bytes=max_bytes)))

    run_guarded(debug, body)


@cache_app.command("clear")
def clear_command(debug: DebugOption = False) -> None:
    """Remove every entry (every step is rebuilt on the next run)."""

    def body() -> None:
        from evsam_export import api

        cache = api.step_cache()
        typer.echo(_summary(f"cleared {cache.root}", cache.clear()))

    run_guarded(debug, body)
