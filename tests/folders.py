"""Copies of an exported folder for tests that edit its manifest but never its model files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def linked_copy(source: Path, folder: Path) -> Path:
    """The export's model files in `folder` (hard links where possible: these tests never write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.onnx"):
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy(path, folder / path.name)
    return folder
