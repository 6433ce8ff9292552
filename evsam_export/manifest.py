"""manifest.json: what an artifact folder holds and how to feed it.

One entry per artifact (component, target, precision, relative path, sha256, size, IO contract with named
dynamic axes, parent, build facts), plus the model facts every consumer needs (variant, encoder size,
prompt frame, normalisation, mask-token semantics) and the environment that built it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from evsam_export import __version__
from evsam_export.contract import DECODER, SPLIT_DECODER, TensorSpec  # the contract's tensor spec, which artifacts record
from evsam_export.errors import ArtifactError
from evsam_export.files import sha256_file, write_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "evsam-export/manifest"
FORMAT_VERSION = 1


@dataclass
class Artifact:
    id: str  # <component>.<target>.<precision>, e.g. encoder.onnx.fp32
    component: str  # encoder | decoder | decoder_image | decoder_prompt (contract.SPLIT_DECODER)
    target: str  # onnx | ort | openvino | tensorrt
    precision: str  # fp32 | fp16 | int8 | bf16
    path: str  # relative to the manifest's folder
    sha256: str  # of the file, checked by Predictor and validate before they load it
    size_bytes: int
    inputs: list[TensorSpec]  # the graph's input tensors (contract.TensorSpec)
    outputs: list[TensorSpec]  # the graph's output tensors
    parent: str | None = None  # id of the artifact this one was built from
    step: str = "export"  # the step that wrote it (export, fp16, int8, ort, openvino, tensorrt, web, ...)
    settings: dict = field(default_factory=dict)  # the step's settings, as the recipe gave them
    facts: dict = field(default_factory=dict)  # opset, max abs diff after simplify, kept-fp32 nodes, ...
    wall_time_s: float = 0.0  # how long the step took to build it
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
    variant: str  # l0 | l1 | l2 | xl0 | xl1
    encoder_size: int  # the encoder's input side: 512 (l0-l2) or 1024 (xl0, xl1)
    weights: dict  # {"spec", "sha256", "synthetic_seed"}
    model: dict  # preprocessing / prompt / mask contract for consumers
    artifacts: list[Artifact] = field(default_factory=list)  # every file, one entry each (below)
    environment: dict = field(default_factory=dict)  # Python, package versions, CPU model and flags of the build machine
    command: str = ""  # the command line that created the folder
    tool_version: str = __version__  # evsam-export's version
    history: list[dict] = field(default_factory=list)  # one entry per command that changed this folder
    # {"encoder": id, "decoder": id, "reason": ...}: the pair `run cpu-auto` measured fastest among those that
    # passed their gates; the Predictor runs it unless told otherwise
    recommended: dict = field(default_factory=dict)

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
            **({"recommended": self.recommended} if self.recommended else {}),
        }

    def write(self, folder: Path) -> Path:
        """Write manifest.json atomically (a reader never sees half a manifest)."""
        return write_atomic(Path(folder) / MANIFEST_NAME, json.dumps(self.to_json(), indent=2) + "\n")


def read_manifest(folder: Path) -> Manifest:
    """The manifest of `folder`, every field checked: anything else (hand edits included) is one ArtifactError
    line naming the field."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder not found: {folder}", hint="run `evsam-export export` first")
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}", hint="point at a folder written by `evsam-export export`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.__class__.__name__})", hint="re-run the export") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an evsam-export manifest", hint="point at a folder written by evsam-export")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has manifest format {_describe(version)}, this tool reads {FORMAT_VERSION}",
            hint="re-export with this version",
        )
    return _ManifestReader(path).manifest(data)


# Fields an artifact entry may have (those of Artifact), and which of them a manifest must give.
_ARTIFACT_FIELDS = {f.name: f for f in fields(Artifact)}
_REQUIRED_ARTIFACT_FIELDS = [name for name, f in _ARTIFACT_FIELDS.items() if f.default is MISSING and f.default_factory is MISSING]
COMPONENTS = ("encoder", DECODER, *SPLIT_DECODER)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _describe(value) -> str:
    """A short, one-line description of a JSON value for an error message."""
    text = json.dumps(value, allow_nan=True) if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class _ManifestReader:
    """Builds a Manifest from parsed JSON, refusing the first field that is missing or of the wrong type."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field_name: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: field {field_name} {problem}", hint="re-run the export, or undo the hand edit")

    def get(self, data: dict, key: str, where: str, kind, required: bool = True, default=None):
        """data[key] checked to be of `kind` (a JSON type name: str, int, number, dict, list, str|null)."""
        if key not in data:
            if required:
                raise self.fail(where, "is missing")
            return default
        value = data[key]
        ok = {
            "str": isinstance(value, str),
            "str|null": value is None or isinstance(value, str),
            "int": type(value) is int,
            "number": type(value) in (int, float) and math.isfinite(value),
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
        }[kind]
        if not ok:
            wanted = {"str": "a string", "str|null": "a string or null", "int": "an integer", "number": "a finite number",
                      "dict": "an object", "list": "a list"}[kind]
            raise self.fail(where, f"must be {wanted}, got {_describe(value)}")
        return value

    def manifest(self, data: dict) -> Manifest:
        from evsam_export.model.variants import VARIANTS

        variant = self.get(data, "variant", "variant", "str")
        if variant not in VARIANTS:
            raise self.fail("variant", f"is {_describe(variant)}, not one of {', '.join(VARIANTS)}")
        encoder_size = self.get(data, "encoder_size", "encoder_size", "int")
        if encoder_size != VARIANTS[variant].encoder_size:
            raise self.fail("encoder_size", f"is {_describe(encoder_size)}, but variant {variant} has {VARIANTS[variant].encoder_size}")
        weights = self.get(data, "weights", "weights", "dict")
        for key in ("spec", "sha256"):
            self.get(weights, key, f"weights.{key}", "str", required=False)
        model = self.get(data, "model", "model", "dict")
        self.check_model(model)
        entries = self.get(data, "artifacts", "artifacts", "list")
        artifacts = [self.artifact(entry, f"artifacts[{index}]") for index, entry in enumerate(entries)]
        seen: set[str] = set()
        for index, artifact in enumerate(artifacts):
            if artifact.id in seen:
                raise self.fail(f"artifacts[{index}].id", f"{_describe(artifact.id)} appears twice")
            seen.add(artifact.id)
        history = self.get(data, "history", "history", "list", required=False, default=[])
        for index, entry in enumerate(history):
            if not isinstance(entry, dict):
                raise self.fail(f"history[{index}]", f"must be an object, got {_describe(entry)}")
        recommended = self.get(data, "recommended", "recommended", "dict", required=False, default={})
        for component in ("encoder", "decoder"):
            chosen = recommended.get(component)
            if chosen is not None and chosen not in seen:
                raise self.fail(f"recommended.{component}", f"names {_describe(chosen)}, which is not an artifact of this folder")
        return Manifest(
            variant=variant,
            encoder_size=encoder_size,
            weights=weights,
            model=model,
            artifacts=artifacts,
            environment=self.get(data, "environment", "environment", "dict", required=False, default={}),
            command=self.get(data, "command", "command", "str", required=False, default=""),
            tool_version=self.get(data, "tool_version", "tool_version", "str", required=False, default="?"),
            history=history,
            recommended=recommended,
        )

    def check_model(self, model: dict) -> None:
        """The model facts consumers read (mask-token semantics, decoder profile)."""
        from evsam_export.contract import ALL_TOKENS, DECODER_PROFILES, TOKEN0_ONLY

        selection = self.get(model, "mask_selection", "model.mask_selection", "dict", required=False)
        if selection is not None and selection.get("outputs", ALL_TOKENS) not in (ALL_TOKENS, TOKEN0_ONLY):
            raise self.fail("model.mask_selection.outputs", f"is {_describe(selection['outputs'])}, not {ALL_TOKENS} or {TOKEN0_ONLY}")
        profile = model.get("decoder_profile", DECODER_PROFILES[0])
        if profile not in DECODER_PROFILES:
            raise self.fail("model.decoder_profile", f"is {_describe(profile)}, not one of {', '.join(DECODER_PROFILES)}")

    def artifact(self, entry, where: str) -> Artifact:
        if not isinstance(entry, dict):
            raise self.fail(where, f"must be an object, got {_describe(entry)}")
        unknown = sorted(set(entry) - set(_ARTIFACT_FIELDS))
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", "is not a known artifact field")
        for name in _REQUIRED_ARTIFACT_FIELDS:
            if name not in entry:
                raise self.fail(f"{where}.{name}", "is missing")
        values = dict(entry)
        for name in ("id", "target", "precision", "step"):
            value = self.get(entry, name, f"{where}.{name}", "str", required=False)
            if value == "":
                raise self.fail(f"{where}.{name}", "is empty")
        component = self.get(entry, "component", f"{where}.component", "str")
        if component not in COMPONENTS:
            raise self.fail(f"{where}.component", f"is {_describe(component)}, not one of {', '.join(COMPONENTS)}")
        self.check_relative_path(self.get(entry, "path", f"{where}.path", "str"), f"{where}.path")
        sha = self.get(entry, "sha256", f"{where}.sha256", "str")
        if not _SHA256_HEX.fullmatch(sha):
            raise self.fail(f"{where}.sha256", f"must be 64 lowercase hex digits, got {_describe(sha)}")
        size = self.get(entry, "size_bytes", f"{where}.size_bytes", "int")
        if size < 0:
            raise self.fail(f"{where}.size_bytes", f"must not be negative, got {size}")
        self.get(entry, "parent", f"{where}.parent", "str|null", required=False)
        self.get(entry, "settings", f"{where}.settings", "dict", required=False)
        self.get(entry, "facts", f"{where}.facts", "dict", required=False)
        self.get(entry, "wall_time_s", f"{where}.wall_time_s", "number", required=False)
        extra_files = self.get(entry, "extra_files", f"{where}.extra_files", "list", required=False, default=[])
        for index, extra in enumerate(extra_files):
            if not isinstance(extra, str):
                raise self.fail(f"{where}.extra_files[{index}]", f"must be a string, got {_describe(extra)}")
            self.check_relative_path(extra, f"{where}.extra_files[{index}]")
        for side in ("inputs", "outputs"):
            specs = self.get(entry, side, f"{where}.{side}", "list")
            values[side] = [self.tensor_spec(spec, f"{where}.{side}[{index}]") for index, spec in enumerate(specs)]
        return Artifact(**values)

    def tensor_spec(self, entry, where: str) -> TensorSpec:
        import numpy as np

        if not isinstance(entry, dict):
            raise self.fail(where, f"must be an object, got {_describe(entry)}")
        unknown = sorted(set(entry) - {"name", "dtype", "shape"})
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", "is not a known tensor field")
        name = self.get(entry, "name", f"{where}.name", "str")
        dtype = self.get(entry, "dtype", f"{where}.dtype", "str")
        try:
            numeric = np.dtype(dtype).kind in "biuf"
        except (TypeError, ValueError):
            numeric = False
        if not numeric:
            raise self.fail(f"{where}.dtype", f"is {_describe(dtype)}, not a numpy number type such as float32")
        shape = self.get(entry, "shape", f"{where}.shape", "list")
        for axis, dim in enumerate(shape):
            if not ((type(dim) is int and dim >= 0) or (isinstance(dim, str) and dim)):
                raise self.fail(f"{where}.shape[{axis}]", f"must be a size >= 0 or an axis name, got {_describe(dim)}")
        return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))

    def check_relative_path(self, value: str, where: str) -> None:
        problem = unsafe_relative_path(value)
        if problem:
            raise self.fail(where, f"{_describe(value)} {problem}")


def unsafe_relative_path(value: str) -> str | None:
    """Why `value` is not a safe path inside an artifact folder (None when it is): artifact paths are
    relative, never climb out with "..", and name a file."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not value or "\x00" in value:
        return "is empty or contains a NUL character"
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive:
        return "is absolute: artifact paths are relative to the folder"
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if ".." in parts:
        return "leaves the artifact folder (..)"
    if not parts or parts == (".",):
        return "names the folder, not a file"
    return None


def artifact_file(folder: Path, relative: str, label: str) -> Path:
    """folder/relative, refused unless it stays inside `folder` once symlinks are resolved."""
    problem = unsafe_relative_path(relative)
    if problem:
        raise ArtifactError(f"{label}: path {_describe(relative)} {problem}", hint="re-run the export")
    path = Path(folder) / relative
    try:
        inside = path.resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise ArtifactError(f"{label}: {relative} resolves outside {folder} (a symlink?)", hint="artifact files must live in the folder")
    return path


def verify_artifact_file(folder: Path, artifact: Artifact) -> Path:
    """Path of the artifact after checking it lies inside `folder`, exists and still has its recorded sha256."""
    path = artifact_file(folder, artifact.path, artifact.id)
    if not path.is_file():
        raise ArtifactError(f"{artifact.id}: file {artifact.path} is missing", hint="re-run the export")
    if sha256_file(path) != artifact.sha256:
        raise ArtifactError(
            f"{artifact.id}: {artifact.path} changed since export (sha256 mismatch)",
            hint="re-run the export, or restore the original file",
        )
    return path
