"""Atomic output folders: build in a hidden temporary folder beside the target, move into place when complete.

A failed or interrupted command leaves the target exactly as it was (absent, or its previous content).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from evsam_export.errors import OutputError


def check_output_folder(output: Path, force: bool) -> Path:
    """Refuse early (before any heavy work) when `output` cannot be written or would be overwritten."""
    output = Path(output).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} is a file", hint="choose a folder path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputError(f"output folder {output} is not empty", hint="pass --force to replace it, or choose another folder")
    parent = output.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {existing}", hint="choose an output folder you can write to")
    return output


@contextmanager
def staged_folder(output: Path, force: bool, keep: bool = False):
    """Yield a temporary folder beside `output`; on success replace `output` with it, on error remove it.

    With keep=True the previous content of `output` is copied into the staging folder first (commands
    that add artifacts to an existing folder, like validate or precision steps)."""
    output = check_output_folder(output, force or keep)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder should be an ordinary one
    try:
        if keep and output.is_dir():
            shutil.copytree(output, staging, dirs_exist_ok=True)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if output.exists():
        previous = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, previous)
    os.replace(staging, output)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
