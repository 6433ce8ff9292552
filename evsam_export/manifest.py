"""manifest.json: what an artifact folder holds and how to feed it.

One entry per artifact (component, target, precision, relative path, sha256, size, IO contract with named
dynamic axes, parent, build facts), plus the model facts every consumer needs (variant, encoder size,
prompt frame, normalisation, mask-token semantics) and the environment that built it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evsam_export import __version__
from evsam_export.contract import TensorSpec  # the contract's tensor spec, which artifacts record
from evsam_export.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
FORMAT = "evsam-export/manifest"
FORMAT_VERSION = 1


@dataclass
class Artifact:
    id: str  # <component>.<target>.<precision>, e.g. encoder.onnx.fp32
    component: str  # encoder | decoder
    target: str  # onnx | ort | openvino | tensorrt
    precision: str  # fp32 | fp16 | int8 | bf16
    path: str  # relative to the manifest's folder
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parent: str | None = None
    step: str = "export"
    settings: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)  # opset, max abs diff after simplify, kept-fp32 nodes, ...
    wall_time_s: float = 0.0
    extra_files: list[str] = field(default_factory=list)  # e.g. OpenVINO .bin, external data

    def to_json(self) -> dict:
        data = asdict(self)
        data["inputs"] = [t.to_json() for t in self.inputs]
        data["outputs"] = [t.to_json() for t in self.outputs]
        return data

    @classmethod
    def from_json(cls, data: dict) -> Artifact:
        data = dict(data)
        data["inputs"] = [TensorSpec.from_json(t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec.from_json(t) for t in data["outputs"]]
        return cls(**data)


@dataclass
class Manifest:
    variant: str
    encoder_size: int
    weights: dict  # {"spec", "sha256", "synthetic_seed"}
    model: dict  # preprocessing / prompt / mask contract for consumers
    artifacts: list[Artifact] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    command: str = ""
    tool_version: str = __version__
    history: list[dict] = field(default_factory=list)  # one entry per command that changed this folder

    def artifact(self, artifact_id: str) -> Artifact:
        for artifact in self.artifacts:
            if artifact.id == artifact_id:
                return artifact
        raise ArtifactError(
            f"no artifact {artifact_id!r} in the manifest",
            hint="known: " + ", ".join(a.id for a in self.artifacts),
        )

    def add(self, artifact: Artifact) -> None:
        self.artifacts = [a for a in self.artifacts if a.id != artifact.id] + [artifact]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool_version": self.tool_version,
            "variant": self.variant,
            "encoder_size": self.encoder_size,
            "weights": self.weights,
            "model": self.model,
            "artifacts": [a.to_json() for a in self.artifacts],
            "environment": self.environment,
            "command": self.command,
            "history": self.history,
        }

    def write(self, folder: Path) -> Path:
        """Write manifest.json atomically (a reader never sees half a manifest)."""
        import os

        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def read_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder not found: {folder}", hint="run `evsam-export export` first")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}", hint="point at a folder written by `evsam-export export`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.__class__.__name__})", hint="re-run the export") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an evsam-export manifest", hint="point at a folder written by evsam-export")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has manifest format {data.get('format_version')}, this tool reads {FORMAT_VERSION}",
            hint="re-export with this version",
        )
    try:
        return Manifest(
            variant=data["variant"],
            encoder_size=data["encoder_size"],
            weights=data["weights"],
            model=data["model"],
            artifacts=[Artifact.from_json(a) for a in data["artifacts"]],
            environment=data.get("environment", {}),
            command=data.get("command", ""),
            tool_version=data.get("tool_version", "?"),
            history=data.get("history", []),
        )
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is missing field {exc}", hint="re-run the export") from exc


def verify_artifact_file(folder: Path, artifact: Artifact) -> Path:
    """Path of the artifact after checking it exists and still has its recorded sha256."""
    path = Path(folder) / artifact.path
    if not path.is_file():
        raise ArtifactError(f"{artifact.id}: file {artifact.path} is missing", hint="re-run the export")
    if sha256_file(path) != artifact.sha256:
        raise ArtifactError(
            f"{artifact.id}: {artifact.path} changed since export (sha256 mismatch)",
            hint="re-run the export, or restore the original file",
        )
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions(
    names: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "openvino", "nncf", "tensorrt", "numpy"),
) -> dict:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_flags() -> list[str]:
    """The SIMD flags that decide INT8/bf16 speed and numerics (from /proc/cpuinfo on Linux)."""
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "f16c", "fma")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in interesting if flag in present]
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import os

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
    }
