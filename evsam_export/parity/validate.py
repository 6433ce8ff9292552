"""The parity gate of an artifact folder (`evsam-export validate DIR`): read its manifest, check every
chosen file's hash, make the runners from the folder, and hand them to the in-memory comparison
(`parity.compare`) with the suite's cases and the PyTorch reference (rebuilt from the exported weights,
or loaded from a saved .npz).
"""

from __future__ import annotations

from pathlib import Path

from evsam_export.errors import ArtifactError
from evsam_export.manifest import read_manifest, verify_artifact_file
from evsam_export.parity.compare import ParityReport, compare, open_runners
from evsam_export.parity.reference import build_cases, pytorch_reference, saved_reference
from evsam_export.parity.suites import Suite
from evsam_export.parity.task import measure_task, task_reference
from evsam_export.progress import Reporter


def validate_folder(
    folder: Path,
    suite: Suite,
    checkpoint: str | None = None,
    reference_path: Path | None = None,
    save_reference: Path | None = None,
    artifacts: list[str] | None = None,
    reporter: Reporter | None = None,
    threads: int | None = None,
) -> ParityReport:
    reporter = reporter or Reporter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    chosen = [a for a in manifest.artifacts if artifacts is None or a.id in artifacts]
    if artifacts:
        unknown = sorted(set(artifacts) - {a.id for a in manifest.artifacts})
        if unknown:
            raise ArtifactError(f"no artifact {unknown[0]!r} in {folder}", hint="known: " + ", ".join(a.id for a in manifest.artifacts))
    for artifact in chosen:
        verify_artifact_file(folder, artifact)
    cases = build_cases(suite, manifest.encoder_size, reporter)
    if reference_path is not None:
        reference = saved_reference(reference_path, manifest, folder, suite, cases)
    else:
        reference = pytorch_reference(manifest, folder, cases, reporter, checkpoint, task_reference(manifest, suite, reporter))
    if save_reference is not None:
        reference.save(save_reference, suite)
    with open_runners(folder, chosen, threads) as (runners, unavailable):
        report = compare(runners, cases, reference, suite, manifest.variant, unavailable, reporter)
        measure_task(report, runners, manifest, suite, reference.task, reporter)
    report.folder = folder
    return report
