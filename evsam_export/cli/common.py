"""Shared CLI plumbing: one-line errors with exit codes, --debug tracebacks, option types."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
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


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like SIGINT's KeyboardInterrupt so every clean-up that handles one handles all."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


@contextmanager
def stop_signals_raise():
    """While a command runs, SIGTERM and SIGHUP raise Stopped, so staged folders are removed as on Ctrl-C."""
    from evsam_export import signal_stack

    signal_stack.repair()  # a handler on a freed signal stack would end in SIGSEGV instead
    stops = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    with signal_stack.handlers(stops, raise_stopped, keep_ignored=True):  # nohup: the user asked to ignore it
        yield


def run_guarded(debug: bool, body: Callable[[], T]) -> T:
    """Run a command body: EvsamError -> `error: ...` on one line and its exit code; tracebacks only with --debug.

    A full disk is exit 4 naming the path, wherever it happens; a stop signal is exit 128 + its number."""
    from evsam_export.errors import EvsamError
    from evsam_export.output import disk_full_error

    try:
        try:
            with stop_signals_raise():
                return body()
        except Exception as exc:
            already_output = isinstance(exc, EvsamError) and exc.exit_code == 4
            full = None if already_output or isinstance(exc, typer.Exit) else disk_full_error(exc)
            if full is None:
                raise
            raise full from exc
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
                 "nncf": "openvino", "tensorrt": "tensorrt", "skimage": "images", "pycocotools": "data",
                 "cv2": "data"}.get((exc.name or "").split(".")[0])
        hint = f"pip install 'evsam-export[{extra}]'" if extra else "install the missing package"
        typer.echo(f"error: missing dependency {exc.name!r} ({hint})", err=True)
        raise typer.Exit(7) from None
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        typer.echo(f"error: interrupted by {signal.Signals(signum).name} (no partial output is left behind)", err=True)
        raise typer.Exit(128 + signum) from None
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
