"""`evsam-export`: one Typer app; each command group lives in its own module and imports heavy
libraries (torch, onnx, runtimes) only inside the command body, so `--help` stays instant."""

from __future__ import annotations

from evsam_export.cli.root import app


def _register() -> None:
    # importing a command module registers its commands on `app`
    from evsam_export.cli import (  # noqa: F401
        bench_cmd,
        cache_cmd,
        evaluate_cmd,
        export_cmd,
        info_cmd,
        predict_cmd,
        run_cmd,
        segment_cmd,
        sensitivity_cmd,
        serve_cmd,
        unseen_cmd,
        validate_cmd,
    )


def main() -> None:
    _register()
    app()


__all__ = ["app", "main"]
