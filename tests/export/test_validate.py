"""`evsam-export validate`: passes a clean export, and is not a rubber stamp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from evsam_export import api
from evsam_export.files import sha256_file
from evsam_export.manifest import read_manifest
from evsam_export.parity.compare import compare
from evsam_export.parity.reference import build_cases, pytorch_reference
from evsam_export.parity.report import report_json
from evsam_export.parity.suites import load_suite
from evsam_export.parity.validate import validate_folder
from evsam_export.progress import Reporter
from evsam_export.runners import runner_for_artifact
from evsam_export.runners.base import Runner


@pytest.fixture()
def l0_copy(copy_export) -> Path:
    return copy_export("validate")


def run_validate(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1"}
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", "validate", str(folder), *extra],
                          capture_output=True, text=True, env=env)


def scale_initializer(folder: Path, artifact_id: str, pick, factor: float) -> str:
    """Scale one weight tensor of an artifact's ONNX file and re-record its hash (a bad export, not a
    tampered file), so only the parity gate can catch it."""
    manifest = read_manifest(folder)
    artifact = manifest.artifact(artifact_id)
    path = folder / artifact.path
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if pick(i))
    array = numpy_helper.to_array(init) * np.float32(factor)
    init.CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))
    onnx.save(model, str(path))
    data = json.loads((folder / "manifest.json").read_text())
    for entry in data["artifacts"]:
        if entry["id"] == artifact_id:
            entry["sha256"] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(data))
    return init.name


def test_clean_export_passes_and_writes_reports(l0_copy, quick_suite):
    proc = run_validate(l0_copy, "--suite", str(quick_suite))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((l0_copy / "parity.json").read_text())
    assert report["passed"] is True
    stages = {(s["artifact"], s["stage"], s["pairing"]) for s in report["stages"]}
    split = "decoder_image+decoder_prompt.onnx.fp32"  # the split decoder, gated as one decoder
    assert stages == {("encoder.onnx.fp32", "encoder", ""), ("decoder.onnx.fp32", "decoder", ""), (split, "decoder", ""),
                      ("encoder.onnx.fp32", "end_to_end", "encoder.onnx.fp32 -> decoder.onnx.fp32"),
                      ("encoder.onnx.fp32", "end_to_end", f"encoder.onnx.fp32 -> {split}")}
    for decoder in (s for s in report["stages"] if s["stage"] == "decoder"):
        for kind in ("point", "box", "boxes16"):
            assert decoder["metrics"][kind]["mask_iou"]["min"] >= 0.9999  # a few |logit| < 1e-5 pixels may flip
    junit = (l0_copy / "junit.xml").read_text()
    assert junit.count("<testcase") == 1 + 2 * 3 + 2 * 3 and "<failure" not in junit
    assert "| encoder.onnx.fp32 | encoder | fp32 | pass |" in (l0_copy / "parity.md").read_text()
    assert list((l0_copy / "parity").glob("*.png"))


def test_scaled_encoder_weight_fails_the_encoder_stage(l0_copy, quick_suite):
    scale_initializer(l0_copy, "encoder.onnx.fp32", lambda i: len(i.dims) == 4 and i.dims[0] >= 64, 1.5)
    proc = run_validate(l0_copy, "--suite", str(quick_suite))
    assert proc.returncode == 10, proc.stdout + proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    assert any("encoder.onnx.fp32 [encoder/all] embedding_snr_db" in line for line in failed), failed
    assert not any("[decoder/" in line for line in failed), failed  # the decoder alone is still exact
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr


def test_perturbed_decoder_weight_fails_the_decoder_stage(l0_copy, quick_suite):
    # the hypernetwork MLP's output layer decides every mask logit of token 0
    name = scale_initializer(l0_copy, "decoder.onnx.fp32", lambda i: list(i.dims) == [32, 256] or list(i.dims) == [256, 32], -1.0)
    # and the split decoder's image half: the gate runs the halves chained, so a bad image half fails the pair
    scale_initializer(l0_copy, "decoder_image.onnx.fp32", lambda i: len(i.dims) == 2 and i.dims[0] == i.dims[1] * 2, 1.5)
    proc = run_validate(l0_copy, "--suite", str(quick_suite))
    assert proc.returncode == 10, (name, proc.stdout + proc.stderr)
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    assert any("decoder.onnx.fp32 [decoder/" in line for line in failed), failed
    assert any("decoder_image+decoder_prompt.onnx.fp32 [decoder/" in line for line in failed), failed
    assert not any("[encoder/all]" in line for line in failed), failed
    assert "FAIL" in (l0_copy / "parity.md").read_text()


def test_changed_file_missing_runtime_and_foreign_manifest(l0_copy, quick_suite, tmp_path):
    (l0_copy / "decoder.fp32.onnx").write_bytes(b"not the exported graph")
    proc = run_validate(l0_copy, "--suite", str(quick_suite))
    assert proc.returncode == 6 and "changed since export" in proc.stderr and "Traceback" not in proc.stderr

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"name": "something else"}))
    proc = run_validate(foreign)
    assert proc.returncode == 6 and "not an evsam-export manifest" in proc.stderr

    proc = run_validate(tmp_path / "nowhere")
    assert proc.returncode == 6 and "not found" in proc.stderr


def test_missing_runtime_is_reported_not_raised(l0_export, quick_suite, tmp_path, monkeypatch):
    """An artifact whose runtime is absent is listed as unavailable (skipped in JUnit), never a traceback."""
    from evsam_export.runners import base

    folder = tmp_path / "l0"
    shutil.copytree(l0_export, folder)
    data = json.loads((folder / "manifest.json").read_text())
    fake = dict(next(a for a in data["artifacts"] if a["id"] == "encoder.onnx.fp32"))
    fake.update(id="encoder.tensorrt.fp16", target="tensorrt", precision="fp16")
    data["artifacts"].append(fake)
    (folder / "manifest.json").write_text(json.dumps(data))
    import evsam_export.runners as runners

    monkeypatch.setattr(
        runners, "availability_of",
        lambda runtime: base.Availability(False, "No module named 'tensorrt'") if runtime == "tensorrt" else base.Availability(True),
    )
    report = api.validate(folder, quick_suite, artifacts=["encoder.tensorrt.fp16", "decoder.onnx.fp32"])
    assert report.unavailable == {"encoder.tensorrt.fp16": "encoder.tensorrt.fp16: tensorrt unavailable: No module named 'tensorrt'"}
    assert report.passed
    assert "<skipped" in (folder / "junit.xml").read_text()


def test_saved_reference_validates_without_rebuilding_the_model(l0_copy, quick_suite, tmp_path, monkeypatch):
    reference = tmp_path / "ref.npz"
    first = api.validate(l0_copy, quick_suite, save_reference=reference)
    assert first.passed and reference.is_file()
    import evsam_export.model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("reference should come from the file"))
    second = api.validate(l0_copy, quick_suite, reference=reference)
    assert second.passed and second.reference_source.startswith("file")


class NegatedMasks(Runner):
    """A runner no file describes: the fp32 decoder with its mask logits negated."""

    runtime = "test"

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner.inputs, inner.outputs, "negated-masks")
        self.inner = inner

    def _load(self) -> None:
        self.inner.load()

    def _infer(self, feeds):
        outputs = self.inner.infer(feeds)
        return {name: -value if name in ("low_res_masks", "masks") else value for name, value in outputs.items()}

    def _close(self) -> None:
        self.inner.close()


def test_a_stage_measured_on_the_same_bytes_and_cases_is_taken_as_it_was(l0_export, quick_suite, monkeypatch):
    """A second gate of the same files, cases and thread count runs no inference and reports the same stages;
    another thread count (other kernels, maybe other sums) measures again."""
    calls = []
    infer = Runner.infer
    monkeypatch.setattr(Runner, "infer", lambda self, feeds, outputs=None: calls.append(self.label) or infer(self, feeds, outputs))
    quiet = Reporter(quiet=True)
    suite = load_suite(quick_suite)
    ids = ["encoder.onnx.fp32", "decoder.onnx.fp32"]
    first = validate_folder(l0_export, suite, reporter=quiet, artifacts=ids, threads=1)
    measured = len(calls)
    again = validate_folder(l0_export, suite, reporter=quiet, artifacts=ids, threads=1)
    assert measured > 0 and len(calls) == measured, calls
    assert report_json(again) == report_json(first) and first.passed
    validate_folder(l0_export, suite, reporter=quiet, artifacts=ids, threads=2)
    assert len(calls) == 2 * measured


def test_compare_gates_runners_in_memory_and_validate_folder_wraps_it(l0_export, quick_suite):
    """compare() needs runners, cases, a reference and a suite, nothing on disk: a decoder runner that no
    file describes fails its own stage and the end-to-end one, the encoder passes; with the folder's own
    runners it gives exactly the report validate_folder gives."""
    quiet = Reporter(quiet=True)
    manifest = read_manifest(l0_export)
    suite = load_suite(quick_suite)
    cases = build_cases(suite, manifest.encoder_size)
    reference = pytorch_reference(manifest, l0_export, cases, quiet)
    encoder, decoder = manifest.artifact("encoder.onnx.fp32"), manifest.artifact("decoder.onnx.fp32")
    files_before = {path.name: path.stat().st_mtime_ns for path in l0_export.iterdir()}
    with runner_for_artifact(l0_export, encoder) as encoder_runner, \
            NegatedMasks(runner_for_artifact(l0_export, decoder)) as negated:
        broken = compare([(encoder, encoder_runner), (decoder, negated)], cases, reference, suite, "l0",
                         {"encoder.tensorrt.fp16": "no GPU"}, quiet)
        honest_decoder = runner_for_artifact(l0_export, decoder)
        with honest_decoder:
            honest = compare([(encoder, encoder_runner), (decoder, honest_decoder)], cases, reference, suite, "l0", None, quiet)
    assert {(s.artifact, s.stage): s.passed for s in broken.stages} == {
        ("encoder.onnx.fp32", "encoder"): True, ("decoder.onnx.fp32", "decoder"): False,
        ("encoder.onnx.fp32", "end_to_end"): False}
    assert "mask_iou.mean" in {g.metric for g in broken.failed_gates} and not broken.passed
    assert broken.unavailable == {"encoder.tensorrt.fp16": "no GPU"} and broken.folder is None
    assert broken.reference_source == "PyTorch (synthetic:0)"
    assert {path.name: path.stat().st_mtime_ns for path in l0_export.iterdir()} == files_before

    from_folder = validate_folder(l0_export, suite, reporter=quiet, artifacts=[encoder.id, decoder.id])
    assert honest.passed and report_json(honest) == report_json(from_folder)
    assert from_folder.folder == l0_export


def test_hand_edited_manifest_exits_6_with_one_line_naming_the_field(l0_export, tmp_path):
    edits = {
        "artifacts-list": (lambda data: data.update(artifacts=["x"]), "artifacts[0] must be an object"),
        "encoder-size": (lambda data: data.update(encoder_size="abc"), "encoder_size must be an integer"),
        "absolute-path": (lambda data: data["artifacts"][0].update(path=str(l0_export / "encoder.fp32.onnx")), "is absolute"),
    }
    for name, (edit, needle) in edits.items():
        folder = tmp_path / name
        folder.mkdir()
        data = json.loads((l0_export / "manifest.json").read_text())
        edit(data)
        (folder / "manifest.json").write_text(json.dumps(data))
        proc = run_validate(folder)
        assert proc.returncode == 6, proc.stderr
        assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
