"""Shared CLI plumbing: one-line errors with exit codes, --debug tracebacks, option types."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

T = TypeVar("T")

DebugOption = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]
CheckpointOption = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="Official .pt checkpoint, or synthetic:SEED for deterministic synthetic weights (default synthetic:0).",
    ),
]


def run_guarded(debug: bool, body: Callable[[], T]) -> T:
    """Run a command body: EvsamError -> `error: ...` on one line and its exit code; tracebacks only with --debug."""
    from evsam_export.errors import EvsamError

    try:
        return body()
    except typer.Exit:
        raise
    except EvsamError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc.one_line()}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except ModuleNotFoundError as exc:
        if debug:
            raise
        extra = {"torch": "export", "onnx": "export", "onnxsim": "export", "onnxslim": "export", "openvino": "openvino",
                 "nncf": "openvino", "tensorrt": "tensorrt", "skimage": "images"}.get((exc.name or "").split(".")[0])
        hint = f"pip install 'evsam-export[{extra}]'" if extra else "install the missing package"
        typer.echo(f"error: missing dependency {exc.name!r} ({hint})", err=True)
        raise typer.Exit(7) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted (nothing was moved into place)", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # anything unexpected still gets one line, never a bare traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: unexpected {type(exc).__name__}: {first[:300]} (re-run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None


def command_line() -> str:
    import shlex
    from pathlib import Path

    return shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])
