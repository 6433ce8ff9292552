"""Atomic output folders: build in a hidden temporary folder beside the target, move into place when complete.

A failed or interrupted command leaves the target exactly as it was (absent, or its previous content).
Temporary folders are named `.NAME.tmp-PID-XXXX` (staging) and `.NAME.old-PID-XXXX` (the previous content
during the swap), so a later run can tell the leftovers of a dead process from the work of a live one.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from evsam_export import signal_stack
from evsam_export.errors import OutputError
from evsam_export.files import temporary_beside

# The signals a user, a CI runner, `timeout` or a container stop sends to end a command.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
TEMP_FOLDER_NAME = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")
# Without a lock (a filesystem that refuses flock), a concurrent swap can still win a race; retrying settles it.
SWAP_ATTEMPTS = 20


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write one file through a hidden temporary file beside it, moved into place when complete: a reader
    sees the old file or the new one, never half of it (a full disk is OutputError naming the path)."""
    path = Path(path)
    return write_files_atomically(path.parent, {path.name: data})[path.name]


def stat_or_none(path: Path) -> os.stat_result | None:
    """One stat of `path` (None when absent), so a folder another run is swapping is judged on one look."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_output_folder(output: Path, force: bool) -> Path:
    """Refuse early (before any heavy work) when `output` cannot be written or would be overwritten."""
    output = Path(output).expanduser().absolute()
    info = stat_or_none(output)
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise OutputError(f"output {output} is a file", hint="choose a folder path")
    if info is not None and not force and folder_has_entries(output):
        raise OutputError(f"output folder {output} is not empty", hint="pass --force to replace it, or choose another folder")
    check_writable_parent(output, what="folder")
    return output


def folder_has_entries(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # moved away by a concurrent swap: nothing to overwrite
        return False


def check_writable_parent(path: Path, what: str = "file") -> Path:
    """Refuse early when `path` could not be created: its nearest existing ancestor must be a writable folder."""
    path = Path(path).expanduser().absolute()
    existing = path.parent
    while stat_or_none(existing) is None:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {path}: {existing} is not a folder", hint=f"choose an output {what} path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {existing}", hint=f"choose an output {what} you can write to")
    info = stat_or_none(path)
    if info is not None and not stat.S_ISDIR(info.st_mode) and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write to {path}: the file is read-only", hint=f"choose another output {what}")
    return path


def is_disk_full(exc: BaseException) -> OSError | None:
    """The disk-full OSError behind `exc` (itself or anywhere in its cause/context chain), or None.

    Exporters wrap the OSError (torch.onnx.export in an ExportError, C++ writers in a RuntimeError whose
    text is strerror), so the chain and the message are both searched."""
    chain = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    for link in chain:
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return link
    if any(text in str(link) for link in chain for text in DISK_FULL_TEXTS):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would hold it once created)."""
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_error(exc: BaseException, fallback: Path | None = None, staging: Path | None = None) -> OutputError | None:
    """An OutputError (exit 4) naming the file and the filesystem to free, when `exc` is a full disk or quota.

    A path inside `staging` is shown as the same path inside `fallback`, the folder the user asked for."""
    full = is_disk_full(exc)
    if full is None:
        return None
    where = Path(full.filename) if full.filename else fallback
    if where is not None and staging is not None and fallback is not None and where.is_relative_to(staging):
        where = fallback / where.relative_to(staging)
    reason = "disk quota exceeded" if full.errno == getattr(errno, "EDQUOT", None) else "no space left on device"
    if where is None:
        return OutputError(reason, hint="free space on the output disk, or write somewhere else")
    filesystem = mount_point(where)
    free = shutil.disk_usage(filesystem).free
    return OutputError(
        f"{reason} while writing {where}",
        hint=f"free space on {filesystem} ({free / 1e6:.0f} MB free now), or write somewhere else",
    )


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True  # cannot tell: never remove what might still be in use
    return True


def sweep_stale_temp_folders(parent: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` folders in `parent` whose process is gone; return them.

    A process killed with SIGKILL (or by the OOM killer) cannot clean up, so the next run beside it does.
    PIDs are local to this machine: on a folder shared by several machines a live run elsewhere looks dead."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_FOLDER_NAME.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


@contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then deliver the first one to the previous handler.

    The swap is two renames; a signal between them would leave neither the old nor the new folder in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict = {}
    try:
        with signal_stack.handlers(STOP_SIGNALS, lambda number, frame: received.append(number)) as installed:
            previous.update(installed)
            yield
    finally:
        if received:
            handler = previous.get(received[0])
            if callable(handler):
                handler(received[0], None)
            elif handler in (signal.SIG_DFL, None):
                os.kill(os.getpid(), received[0])


@contextmanager
def folder_lock(folder: Path):
    """An exclusive flock on `folder` itself, so concurrent swaps beside each other take turns and no lock
    file is left behind. Where flock is unavailable the swap's retries settle the race instead."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def restore_or_discard(previous: Path, output: Path) -> None:
    """Put the moved-aside folder back; if another writer's complete folder took the place meanwhile, the old
    content is obsolete and is removed instead of being left as a `.old-` folder."""
    try:
        os.replace(previous, output)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise  # nothing took its place: keep the old content where the user can find it
        shutil.rmtree(previous, ignore_errors=True)


def swap_into_place(staging: Path, output: Path) -> Path | None:
    """Move `output` aside and `staging` into its place; return the moved-aside folder (None if there was none).

    On failure `output` is restored and `staging` is left for the caller to remove."""
    attempt = 0
    while True:
        attempt += 1
        previous = None
        try:
            if output.exists() or output.is_symlink():
                previous = output.parent / f".{output.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(output, previous)
            try:
                os.replace(staging, output)
            except BaseException:
                if previous is not None:
                    restore_or_discard(previous, output)
                raise
            return previous
        except OSError as exc:
            # Another writer moved `output` away or put its own in place between our two renames: go again.
            racing = isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOTEMPTY, errno.EEXIST)
            if not racing or attempt >= SWAP_ATTEMPTS:
                raise


@contextmanager
def staged_folder(output: Path, force: bool, keep: bool = False):
    """Yield a temporary folder beside `output`; on success replace `output` with it, on error remove it.

    With keep=True the previous content of `output` is copied into the staging folder first (commands
    that add artifacts to an existing folder, like validate or precision steps)."""
    output = check_output_folder(output, force or keep)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_folders(output.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    previous = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder should be an ordinary one
        if keep and output.is_dir():
            shutil.copytree(output, staging, dirs_exist_ok=True)
        yield staging
        with folder_lock(output.parent), signals_deferred():
            if not (force or keep) and folder_has_entries(output):  # another run filled it since the early check
                raise OutputError(f"output folder {output} is not empty", hint="another run wrote it meanwhile; pass --force to replace it")
            previous = swap_into_place(staging, output)
    except BaseException as exc:
        full = disk_full_error(exc, fallback=output, staging=staging) if isinstance(exc, Exception) else None
        if full is not None:
            raise full from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone when the swap succeeded
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def write_files_atomically(folder: Path, texts: dict[str, str | bytes]) -> dict[str, Path]:
    """Write `texts` (file name, or a path relative to `folder` -> text or bytes) into `folder`: every file is
    complete in a temporary beside its target before the first one replaces its target, and the replacements
    run with stop signals held, so a reader sees all the old files or all the new ones and never half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = {}
    try:
        for name, text in texts.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_beside(target)
            staged[name] = temporary
            if isinstance(text, bytes):
                temporary.write_bytes(text)
            else:
                temporary.write_text(text)
        with signals_deferred():
            for name, temporary in staged.items():
                os.replace(temporary, folder / name)
    except BaseException as exc:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)
        full = disk_full_error(exc, fallback=folder) if isinstance(exc, Exception) else None
        if full is not None:
            raise full from exc
        raise
    return {name: folder / name for name in texts}
