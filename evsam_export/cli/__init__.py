"""`evsam-export`: one Typer app; each command group lives in its own module and imports heavy
libraries (torch, onnx, runtimes) only inside the command body, so `--help` stays instant."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="evsam-export",
    help="Export EfficientViT-SAM (l0, l1, l2, xl0, xl1) to ONNX Runtime, OpenVINO and TensorRT artifacts, "
    "and prove with a parity gate that they segment like PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Root options (keeps `evsam-export` a command group even with one command registered)."""
    if version:
        from evsam_export import __version__

        typer.echo(f"evsam-export {__version__}")
        raise typer.Exit(0)


def _register() -> None:
    # importing a command module registers its commands on `app`
    from evsam_export.cli import bench_cmd, export_cmd, info_cmd, predict_cmd, run_cmd, sensitivity_cmd, validate_cmd  # noqa: F401


def main() -> None:
    _register()
    app()
