"""The caches' common ground: one root (`$EVSAM_CACHE_DIR`, default ~/.cache/evsam-export) with a folder per
kind of cache, one key function (sha256 of canonical JSON), and the hash of the code a cached result depends on
(a module and every evsam_export module it imports, transitively)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path


def cache_root(kind: str = "steps") -> Path:
    """`$EVSAM_CACHE_DIR/<kind>` (default ~/.cache/evsam-export/<kind>): the folder of one kind of cache."""
    return Path(os.environ.get("EVSAM_CACHE_DIR", Path.home() / ".cache" / "evsam-export")) / kind


def _local_imports(source: bytes) -> set[str]:
    """evsam_export modules a source file imports, at top level or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("evsam_export"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("evsam_export"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _module_file(name: str) -> Path | None:
    """Source file of an evsam_export module, found on disk (find_spec would import parent packages)."""
    import evsam_export

    parts = name.split(".")
    if parts[0] != "evsam_export":
        return None
    base = Path(evsam_export.__file__).parent.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # `from module import function` names


def module_code_files(module_name: str) -> dict[str, Path]:
    """The module's source file and those of every evsam_export module it imports, transitively."""
    files: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        path = _module_file(name)
        if name in files or path is None:
            continue
        files[name] = path
        pending.extend(sorted(_local_imports(path.read_bytes())))
    return files


def module_code_hash(module_name: str) -> str:
    """Hash of `module_code_files`: a change in a helper (the model code, a graph pass, the calibration
    data) invalidates the cached results it shaped, not only a change in the step module itself."""
    files = module_code_files(module_name)
    if not files:  # not our module (or not on disk): the name is all we can key on
        return hashlib.sha256(module_name.encode()).hexdigest()
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(payload: dict) -> str:
    """sha256 of the canonical JSON of `payload`: the key of an entry in any of the caches."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class RecentlyUsed:
    """An in-process cache of the `kept` most recently used entries, for results too large to keep them all (a
    None key is never kept)."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._entries: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str | None):
        if key is None or key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: str | None, value) -> None:
        if key is None:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.kept:
            self._entries.popitem(last=False)
