"""The step cache: content-addressed entries under `$EVSAM_CACHE_DIR/steps/<key>/`.

A key is the sha256 of the canonical JSON of everything that can change a step's result (see
`pipeline.runner`); the code part of it hashes every evsam_export module the step imports, transitively.
A failure is never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("EVSAM_CACHE_DIR", Path.home() / ".cache" / "evsam-export")) / "steps"


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


def step_key(payload: dict) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class StepCache:
    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = root or cache_root()
        self.enabled = enabled

    def lookup(self, key: str) -> dict | None:
        entry = self.root / key / "entry.json"
        if not self.enabled or not entry.is_file():
            return None
        try:
            return json.loads(entry.read_text())
        except json.JSONDecodeError:
            return None

    def restore(self, key: str, entry: dict, folder: Path) -> None:
        for name in entry["files"]:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.root / key / "files" / name
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)

    def store(self, key: str, folder: Path, files: list[str], payload: dict) -> None:
        if not self.enabled:
            return
        tmp = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # a step may produce no file (e.g. the ORT target on an ORT INT8 graph)
        for name in files:
            (tmp / "files" / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(folder / name, tmp / "files" / name)
            except OSError:
                shutil.copy2(folder / name, tmp / "files" / name)
        (tmp / "entry.json").write_text(json.dumps({**payload, "files": files}, indent=1))
        final = self.root / key
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.replace(tmp, final)
