"""File helpers every layer uses: the sha256 of a file, and writes that a reader sees whole or not at all (a
temporary file beside the target, moved over it once complete)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_beside(target: Path, suffix: str = "") -> Path:
    """A hidden, unique temporary path in `target`'s folder (so the final rename never crosses filesystems)."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


@contextmanager
def replacing(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends without error it replaces `target` in one rename,
    else it is removed. A path hardlinked elsewhere (the step cache) is replaced, never edited in place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(target, suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file beside it: a reader sees the old file or the new one."""
    with replacing(path) as temporary:
        if isinstance(data, bytes):
            temporary.write_bytes(data)
        else:
            temporary.write_text(data)
    return Path(path)
