"""The one Typer app every command module registers on; a leaf module, so that the command modules and
the package that imports them (evsam_export.cli) do not import each other."""

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
