"""`evsam-export serve DIR`: the web folder's demo app on localhost, with the headers WASM threads need."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app

WEB_RECIPE_HINT = "build one with `evsam-export run web-wasm -v l0 -o DIR`"


def check_web_folder(folder: Path) -> None:
    """Refuse, in one line with the fix, a folder `serve` cannot show: missing, no manifest, no web artifacts."""
    import json

    from evsam_export.errors import ArtifactError, UsageError
    from evsam_export.manifest import MANIFEST_NAME

    if not folder.is_dir():
        raise UsageError(f"no folder {folder}", hint=f"give a web artifact folder; {WEB_RECIPE_HINT}")
    try:
        web = json.loads((folder / MANIFEST_NAME).read_text()).get("model", {}).get("web")
    except FileNotFoundError:
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}, so no web artifacts", hint=WEB_RECIPE_HINT) from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {folder / MANIFEST_NAME}: {exc}", hint="re-run the recipe that made the folder") from None
    if not web:
        raise ArtifactError(f"{folder} has no web artifacts (its manifest has no onnxruntime-web graphs)", hint=WEB_RECIPE_HINT)
    if not (folder / "index.html").is_file():
        raise ArtifactError(f"{folder} has web artifacts but no index.html (built before the demo app existed)",
                            hint=f"rebuild it: {WEB_RECIPE_HINT}")


def start_server(folder: Path, host: str, port: int):
    """A FolderServer for the folder (no tensor POSTs); a port in use is a one-line UsageError."""
    import errno
    import socket

    from evsam_export import api
    from evsam_export.errors import UsageError

    try:
        return api.serve_folder(folder, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use", hint="pick another with --port N, or --port 0 for any free port") from None
        if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            raise UsageError(f"cannot listen on {host}: {exc.strerror or exc}", hint="use --host 127.0.0.1") from None
        raise


def measure_app_command(folder: Path, image: Path, threads: list[int | None], clicks: int, rounds: int, record: Path | None) -> None:
    """`serve --measure`: one line per thread count (load, encoder, median click to overlay), recorded on demand."""
    import sys

    from evsam_export import api
    from evsam_export.bench.app import record_app_bench
    from evsam_export.errors import RuntimeUnavailable, UsageError
    from evsam_export.measurements import results_dir

    if not image.is_file():
        raise UsageError(f"no image {image}", hint="give a PNG or JPEG file to --measure")
    state = api.availability("onnxruntime-web")
    if not state.available:
        raise RuntimeUnavailable(f"cannot time the app: {state.reason}")
    typer.echo(f"timing {folder}: {rounds} rounds of {clicks} clicks on {image.name} per thread count")
    rows = api.measure_app(folder, image, threads, clicks, rounds, progress=typer.echo)
    for row in rows:
        typer.echo(f"{row['threads']} threads: load {row['load_ms'] / 1000:.1f} s, encoder {row['encode_ms'] / 1000:.1f} s, "
                   f"click to overlay {row['click_to_overlay_ms_median']:.0f} ms median of {row['clicks']} "
                   f"(round medians {row['click_to_overlay_ms_round_medians']}; decoder {row['decoder_ms_median']:.0f} ms, "
                   f"native {row['native_decoder_ms_median']:.0f} ms; mask {row['mask_ms_median']:.0f} ms), "
                   f"preview {row['preview_ms_median']} ms; load averages {row['load_averages']}")
    for path in record_app_bench(rows, results_dir(record), " ".join(["evsam-export", *sys.argv[1:]])):
        typer.echo(f"recorded {path}")


@app.command("serve")
def serve_command(
    folder: Annotated[Path, typer.Argument(help="A web artifact folder (from `run web-wasm` or `run web-webgpu`).")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in the default browser.")] = False,
    measure: Annotated[Path | None, typer.Option(help="Instead of serving: time the app in headless Chromium on this "
                                                      "image (page load, encoder, real mouse clicks), then exit.")] = None,
    threads: Annotated[list[int] | None, typer.Option("--threads", min=1, help="With --measure: WASM threads (repeatable; "
                                                                               "default: the app's own choice).")] = None,
    clicks: Annotated[int, typer.Option(min=1, help="With --measure: clicks per thread count and round (the median is reported).")] = 10,
    rounds: Annotated[int, typer.Option(min=1, help="With --measure: rounds, each timing every thread count in turn.")] = 1,
    record: Annotated[Path | None, typer.Option(help="With --measure: write one result file per thread count under "
                                                     "DIR/browser/ (docs/results).")] = None,
    debug: DebugOption = False,
) -> None:
    """Serve the folder's demo app (index.html) with the cross-origin isolation headers multi-threaded WASM
    needs, print its URL and run until Ctrl-C; or, with --measure IMAGE, time the app in headless Chromium."""

    def body() -> None:
        import threading

        check_web_folder(folder)
        if measure is not None:
            return measure_app_command(folder, measure, threads or [None], clicks, rounds, record)
        server = start_server(folder, host, port)
        try:
            typer.echo(f"serving {folder} at {server.origin}/ (Ctrl-C to stop)")
            if open_browser:
                import webbrowser

                webbrowser.open(f"{server.origin}/")
            threading.Event().wait()  # until Ctrl-C or a stop signal
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) is how serving ends: not an error
            typer.echo("stopped")
        finally:
            server.close()

    run_guarded(debug, body)
