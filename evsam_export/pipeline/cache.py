"""The step cache: content-addressed entries under `$EVSAM_CACHE_DIR/steps/<key>/`.

A key is the sha256 of the canonical JSON of everything that can change a step's result (see
`pipeline.runner`); the code part of it hashes every evsam_export module the step imports, transitively.
A failure is never stored.

An entry is `<key>/entry.json` (the step's payload plus the size and sha256 of every file, recorded when it
was stored) and `<key>/files/...`, read-only. Nothing is trusted on the way out: a restore copies each file
and checks the copy against its record, and any mismatch, missing file or unreadable entry.json is a miss
that the rebuilt step's store replaces. Outputs are independent copies (reflinks where the filesystem can),
never hard links, so editing an output cannot reach the cache and a damaged cache cannot reach an output.
Entries are built in a temporary folder and renamed into place; an entry that another process placed
meanwhile counts as success.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from evsam_export.cache import cache_root
from evsam_export.errors import OutputError
from evsam_export.files import sha256_file

ENTRY_FORMAT = 2  # entries before 2 recorded file names without sizes and hashes: unverifiable, so a miss
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
# temporary (`.KEY.tmp-PID-...`) and discarded (`.KEY.gone-PID-...`) folders, with the process that made them
SCRATCH_PATTERN = re.compile(r"\.(?P<key>[0-9a-zA-Z]+)\.(?:tmp|gone)-(?P<pid>\d+)-")
FICLONE = 0x40049409  # Linux ioctl: share the source's extents copy-on-write (btrfs, XFS, bcachefs)


def copy_independent(source: Path, target: Path) -> None:
    """Copy `source` to a new file `target` that shares no inode with it: a reflink where the filesystem
    offers one, else an in-kernel copy, else a plain read/write copy."""
    target.unlink(missing_ok=True)  # never write through a previous file (it could be a link to anything)
    with open(source, "rb") as src, open(target, "xb") as dst:
        try:
            import fcntl

            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        except (ImportError, OSError):
            pass
        if hasattr(os, "copy_file_range"):
            try:
                while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
                    pass
                return
            except OSError:  # EXDEV on older kernels, ENOSYS/EINVAL on some filesystems: start over plainly
                src.seek(0)
                dst.seek(0)
                dst.truncate()
        shutil.copyfileobj(src, dst, 1 << 20)


def _safe_name(name: object) -> bool:
    """A recorded file name is a relative path that stays inside the entry (entry.json could be edited)."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = Path(name).parts
    return not Path(name).is_absolute() and ".." not in parts and "." not in parts


def read_entry(folder: Path) -> tuple[dict | None, str | None]:
    """An entry's entry.json, checked for shape (not contents): (entry, None) or (None, what is wrong)."""
    try:
        entry = json.loads((folder / "entry.json").read_text())
    except FileNotFoundError:
        return None, "entry.json is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"entry.json is unreadable ({type(exc).__name__})"
    if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT:
        return None, "entry.json has no file records of this format (written by an older version?)"
    files = entry.get("files")
    if not isinstance(files, dict) or not all(
        _safe_name(name) and isinstance(record, dict) and isinstance(record.get("size"), int)
        and isinstance(record.get("sha256"), str) for name, record in files.items()
    ):
        return None, "entry.json has malformed file records"
    return entry, None


def _file_problem(name: str, path: Path, record: dict) -> str | None:
    try:
        size = path.stat().st_size
    except OSError:
        return f"{name} is missing"
    if size != record["size"]:
        return f"{name} is {size} bytes, recorded {record['size']}"
    if sha256_file(path) != record["sha256"]:
        return f"{name} sha256 differs from its record"
    return None


def verify_entry(folder: Path) -> tuple[dict | None, str | None]:
    """(entry, None) when entry.json is sound and every file matches its recorded size and sha256, else
    (None, the first problem found)."""
    entry, problem = read_entry(folder)
    if entry is None:
        return None, problem
    for name, record in entry["files"].items():
        problem = _file_problem(name, folder / "files" / name, record)
        if problem:
            return None, problem
    return entry, None


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # removed meanwhile by another process
            pass
    return total


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass
class EntryInfo:
    key: str
    path: Path
    size_bytes: int
    last_used: float  # the entry folder's mtime: set when stored and on every restore
    problem: str | None = None  # filled by `StepCache.verify`


@dataclass
class Tally:
    """What a maintenance command found and removed."""

    entries: int = 0
    bytes: int = 0
    removed_entries: int = 0
    removed_bytes: int = 0
    removed_scratch: int = 0  # temporary folders of processes that died


class StepCache:
    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else cache_root()
        self.enabled = enabled

    # --- the runner's side -------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail before any model work when results could not be stored; sweep scratch of dead processes."""
        if not self.enabled:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.mkdtemp(prefix=f".probe.tmp-{os.getpid()}-", dir=self.root)
            os.rmdir(probe)
        except OSError as exc:
            raise OutputError(
                f"step cache {self.root} is not writable: {exc.strerror or exc}",
                hint="set EVSAM_CACHE_DIR to a folder you can write to, or pass --no-cache",
            ) from None
        self.sweep_scratch()

    def lookup(self, key: str) -> dict | None:
        """The entry's record if entry.json looks sound (files unchecked: `restore` checks them)."""
        if not self.enabled:
            return None
        entry, _problem = read_entry(self.root / key)
        return entry

    def restore(self, key: str, folder: Path) -> tuple[dict | None, str | None]:
        """Copy an entry's files into `folder`, each checked against its record after copying.

        (entry, None) on a hit; (None, None) when there is no entry; (None, problem) when the entry is
        bad, in which case nothing is left in `folder` and the caller rebuilds (its store replaces the entry)."""
        if not self.enabled:
            return None, None
        source = self.root / key
        if not source.exists():
            return None, None
        entry, problem = read_entry(source)
        copied: list[Path] = []
        if entry is not None:
            for name, record in entry["files"].items():
                target = folder / name
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    copy_independent(source / "files" / name, target)
                except OSError as exc:  # removed by a prune or a concurrent replacement meanwhile
                    problem = f"{name} could not be read ({exc.strerror or exc})"
                    break
                copied.append(target)
                problem = _file_problem(name, target, record)
                if problem:
                    break
        if problem:
            for path in copied:
                path.unlink(missing_ok=True)
            return None, problem
        try:
            os.utime(source)  # least recently used entries are pruned first
        except OSError:
            pass
        return entry, None

    def store(self, key: str, folder: Path, files: list[str], payload: dict) -> None:
        """Copy `files` (relative to `folder`) into a new entry and place it atomically.

        An entry that another process placed meanwhile is success when it verifies; a bad one is replaced.
        A full or read-only cache raises OutputError, with nothing of the entry left behind."""
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=self.root))
        try:
            records = {}
            for name in files:
                target = scratch / "files" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                copy_independent(folder / name, target)
                records[name] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
                target.chmod(0o444)
            entry = {**payload, "format": ENTRY_FORMAT, "key": key, "stored": time.time(), "files": records}
            (scratch / "entry.json").write_text(json.dumps(entry, indent=1))
            (scratch / "entry.json").chmod(0o444)
            scratch.chmod(0o755)  # mkdtemp makes it 0700
            self._place(scratch, self.root / key)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise OutputError(f"could not store a step in the cache {self.root}: {exc.strerror}",
                              hint="free space there, set EVSAM_CACHE_DIR elsewhere, or pass --no-cache") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # gone already when it was placed

    def _place(self, scratch: Path, final: Path) -> None:
        for _attempt in range(3):
            try:
                os.rename(scratch, final)  # atomic; fails when `final` is a non-empty folder
                os.utime(final)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            _entry, problem = verify_entry(final)
            if problem is None:
                return  # the same step stored meanwhile (or earlier) by another process
            self._discard(final)  # a bad entry: moved aside atomically, then replaced by ours

    def discard(self, key: str, folder: Path | None = None) -> None:
        """Drop an entry its user found wrong beyond its file records, and the copies restored into `folder`."""
        entry, _problem = read_entry(self.root / key)
        if folder is not None and entry is not None:
            for name in entry["files"]:
                (folder / name).unlink(missing_ok=True)
        self._discard(self.root / key)

    def _discard(self, path: Path) -> int:
        """Remove an entry without a half-deleted state being visible under its key; returns its bytes."""
        grave = self.root / f".{path.name}.gone-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return 0
        size = _folder_bytes(grave)
        shutil.rmtree(grave, ignore_errors=True)
        return size

    # --- maintenance (`evsam-export cache ...`) --------------------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if not KEY_PATTERN.fullmatch(path.name) or not path.is_dir():
                continue
            try:
                last_used = path.stat().st_mtime
            except OSError:
                continue
            found.append(EntryInfo(path.name, path, _folder_bytes(path), last_used))
        return found

    def sweep_scratch(self) -> int:
        """Remove temporary and discarded folders whose process is gone; returns how many."""
        removed = 0
        if not self.root.is_dir():
            return removed
        for path in self.root.iterdir():
            match = SCRATCH_PATTERN.match(path.name)
            if match and int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed

    def verify(self, fix: bool = False) -> tuple[list[EntryInfo], Tally]:
        """Every entry checked against its records; with fix, bad ones (and dead scratch) are removed."""
        found = self.entries()
        tally = Tally(entries=len(found), bytes=sum(e.size_bytes for e in found))
        for info in found:
            _entry, info.problem = verify_entry(info.path)
            if info.problem and fix:
                tally.removed_bytes += self._discard(info.path)
                tally.removed_entries += 1
        if fix:
            tally.removed_scratch = self.sweep_scratch()
        return found, tally

    def prune(self, older_than_days: float | None = None, max_bytes: int | None = None, now: float | None = None) -> Tally:
        """Remove entries unused for `older_than_days`, then the least recently used until at most `max_bytes` remain."""
        now = time.time() if now is None else now
        found = sorted(self.entries(), key=lambda e: e.last_used)
        tally = Tally(entries=len(found), bytes=sum(e.size_bytes for e in found))
        kept_bytes = tally.bytes
        for info in found:
            too_old = older_than_days is not None and now - info.last_used > older_than_days * 86400
            too_big = max_bytes is not None and kept_bytes > max_bytes
            if too_old or too_big:
                tally.removed_bytes += self._discard(info.path)
                tally.removed_entries += 1
                kept_bytes -= info.size_bytes
        tally.removed_scratch = self.sweep_scratch()
        return tally

    def clear(self) -> Tally:
        found = self.entries()
        tally = Tally(entries=len(found), bytes=sum(e.size_bytes for e in found))
        for info in found:
            tally.removed_bytes += self._discard(info.path)
            tally.removed_entries += 1
        tally.removed_scratch = self.sweep_scratch()
        return tally
