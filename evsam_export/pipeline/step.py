"""What every build step (precision and target modules) receives and returns.

A step is a function `build(ctx: StepContext, parent: Artifact, settings) -> list[Artifact]`:
it reads `parent`'s file from `ctx.folder`, writes its own files into `ctx.folder` (named
`<component>.<target>.<precision>.<ext>`), and returns manifest entries whose `parent` is `parent.id`.
`ctx.gate(artifacts)` runs the parity validator on candidate artifacts (used by automatic fallback);
`ctx.calibration` yields deterministic feeds for quantization.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export.manifest import Artifact, Manifest, sha256_file
from evsam_export.model.variants import Variant
from evsam_export.progress import Reporter


def artifact_id(component: str, target: str, precision: str) -> str:
    return f"{component}.{target}.{precision}"


def artifact_filename(component: str, target: str, precision: str, ext: str) -> str:
    """encoder.fp16.onnx (plain ONNX), encoder.ort.int8.onnx, encoder.openvino.fp16.xml, decoder.tensorrt.fp16.engine"""
    if target == "onnx":
        return f"{component}.{precision}.{ext}"
    return f"{component}.{target}.{precision}.{ext}"


_SCRATCH_REFERENCES: list[Path] = []


@atexit.register
def _remove_scratch_references() -> None:
    for folder in _SCRATCH_REFERENCES:
        shutil.rmtree(folder, ignore_errors=True)


def scratch_reference_path() -> Path:
    """Where a gate may keep the PyTorch reference of a suite: a fresh temporary folder removed at exit,
    so callers that gate without the recipe runner (tests, scripts) leave no reference.npz behind."""
    folder = Path(tempfile.mkdtemp(prefix="evsam-gate-"))
    _SCRATCH_REFERENCES.append(folder)
    return folder / "reference.npz"


@dataclass
class StepContext:
    folder: Path  # where artifacts are written (a staging folder during a run)
    manifest: Manifest  # artifacts built so far (parents are looked up here)
    variant: Variant
    reporter: Reporter = field(default_factory=Reporter)
    suite: str = "default"  # parity suite used by gate()
    threads: int | None = None
    reference_cache: Path | None = None  # PyTorch reference of the suite, computed by the first gate()

    def path_of(self, artifact: Artifact) -> Path:
        return self.folder / artifact.path

    def new_artifact(
        self,
        parent: Artifact,
        path: Path,
        target: str,
        precision: str,
        step: str,
        settings: dict,
        facts: dict | None = None,
        started: float | None = None,
        inputs=None,
        outputs=None,
        extra_files: list[str] | None = None,
    ) -> Artifact:
        """A manifest entry for a file this step wrote, derived from its parent's IO contract."""
        return Artifact(
            id=artifact_id(parent.component, target, precision),
            component=parent.component,
            target=target,
            precision=precision,
            path=Path(path).relative_to(self.folder).as_posix(),
            sha256=sha256_file(path),
            size_bytes=Path(path).stat().st_size + sum((self.folder / f).stat().st_size for f in extra_files or []),
            inputs=list(inputs if inputs is not None else parent.inputs),
            outputs=list(outputs if outputs is not None else parent.outputs),
            parent=parent.id,
            step=step,
            settings=dict(settings, **({"single_mask": parent.settings["single_mask"]} if "single_mask" in parent.settings else {})),
            facts=facts or {},
            wall_time_s=round(time.perf_counter() - started, 2) if started is not None else 0.0,
            extra_files=list(extra_files or []),
        )

    def gate(self, candidates: list[Artifact]):
        """Parity report of `candidates` (plus the fp32 ONNX artifacts they pair with), on the suite.

        Writes a scratch manifest that includes the candidates into a temporary copy of the folder's
        manifest; the folder's own manifest.json is left as it was."""
        import json

        from evsam_export.parity.suites import load_suite
        from evsam_export.parity.validate import validate_folder

        scratch = Path(tempfile.mkdtemp(prefix=".gate-", dir=self.folder))
        try:
            for name in {a.path for a in self.manifest.artifacts + candidates} | {f for a in self.manifest.artifacts + candidates for f in a.extra_files}:
                (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                (scratch / name).symlink_to(self.folder / name)
            trial = Manifest(**{**self.manifest.__dict__, "artifacts": list(self.manifest.artifacts)})
            for candidate in candidates:
                trial.add(candidate)
            (scratch / "manifest.json").write_text(json.dumps(trial.to_json()))
            ids = [c.id for c in candidates] + [a.id for a in self.manifest.artifacts if a.target == "onnx" and a.precision == "fp32"]
            cached = self.reference_cache is not None and self.reference_cache.is_file()
            if self.reference_cache is None:
                self.reference_cache = scratch_reference_path()
            return validate_folder(
                scratch,
                load_suite(self.suite),
                artifacts=sorted(set(ids)),
                reporter=Reporter(quiet=True),
                threads=self.threads,
                reference_path=self.reference_cache if cached else None,
                save_reference=None if cached else self.reference_cache,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
