"""`evsam-export export`: bad input gets one line, a non-zero exit, no traceback, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evsam_export.model.checkpoint import load_model
from evsam_export.model.variants import VARIANTS


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1"}
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def l1_state_dict():
    model, _ = load_model(VARIANTS["l1"], "synthetic:0")
    return model.state_dict()


def garbage_bytes(seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).bytes(4096)


# torch.load on these seeds' bytes raises UnpicklingError (0), IndexError (17), UnicodeDecodeError (54) and
# KeyError (62): the unpickler fails on whatever it meets first, and each must read as a corrupt checkpoint.
@pytest.mark.parametrize("seed", [0, 17, 54, 62])
def test_random_bytes_read_as_a_corrupt_checkpoint(tmp_path, seed):
    from evsam_export.errors import CheckpointError
    from evsam_export.model.checkpoint import read_state_dict

    path = tmp_path / "garbage.pt"
    path.write_bytes(garbage_bytes(seed))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "make_checkpoint, needles",
    [
        (lambda d, sd: d / "missing.pt", ["checkpoint not found"]),
        (lambda d, sd: (d / "garbage.pt").write_bytes(garbage_bytes(17)) and d / "garbage.pt", ["corrupt or truncated"]),
        (lambda d, sd: (d / "empty.pt").write_bytes(b"") or d / "empty.pt", ["empty"]),
    ],
    ids=["missing", "garbage", "empty"],
)
def test_bad_checkpoint_refused_cleanly(tmp_path, make_checkpoint, needles, l1_state_dict):
    checkpoint = make_checkpoint(tmp_path, l1_state_dict)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    proc = run_cli("export", "--variant", "l0", "--checkpoint", str(checkpoint), "--output", str(out_parent / "o"))
    assert_one_line_error(proc, *needles)
    assert leftovers(out_parent) == []


def test_truncated_and_wrong_variant_checkpoints(tmp_path, l1_state_dict):
    good = tmp_path / "l1.pt"
    torch.save({"state_dict": l1_state_dict}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    proc = run_cli("export", "--variant", "l0", "--checkpoint", str(truncated), "--output", str(out_parent / "o"))
    assert_one_line_error(proc, "corrupt or truncated")
    proc = run_cli("export", "--variant", "l0", "--checkpoint", str(good), "--output", str(out_parent / "o"))
    assert_one_line_error(proc, "this checkpoint is l1, not l0", "--variant l1")
    assert leftovers(out_parent) == []


def test_unknown_variant_and_opset(tmp_path):
    proc = run_cli("export", "--variant", "l9", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "l9" in proc.stderr
    proc = run_cli("export", "--opset", "11", "--output", str(tmp_path / "o"))
    assert_one_line_error(proc, "opset 11")
    assert leftovers(tmp_path) == []


def test_output_not_empty_without_force_and_unwritable(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    proc = run_cli("export", "--output", str(occupied))
    assert_one_line_error(proc, "not empty", "--force")
    assert leftovers(occupied) == ["keep.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = run_cli("export", "--output", str(a_file / "sub"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    if os.geteuid() != 0:  # root can write anywhere; the check still runs for everyone else
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        proc = run_cli("export", "--output", str(locked / "o"))
        assert_one_line_error(proc, "cannot write")


def test_failure_midway_leaves_previous_output_untouched(tmp_path, monkeypatch):
    """An error after tracing started (here: the decoder export) must not leave partial files."""
    from evsam_export import api
    from evsam_export.errors import ExportError
    from evsam_export.export import onnx_export

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous export")
    real_export = onnx_export.export_onnx

    def failing(module, spec, path, opset=17):
        if spec.component == "decoder":
            raise ExportError("simulated failure")
        return real_export(module, spec, path, opset)

    monkeypatch.setattr(onnx_export, "export_onnx", failing)
    with pytest.raises(ExportError):
        api.export("l0", target, force=True)
    assert leftovers(target) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_help_is_fast_and_lists_commands():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "evsam_export.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "export" in proc.stdout and "validate" in proc.stdout
    imported = proc.stderr
    for heavy in ("torch", "onnx", "onnxruntime", "openvino"):
        assert f"| {heavy}\n" not in imported and f" {heavy}\n" not in imported.replace("|", " "), heavy


def test_sigterm_during_an_export_exits_143_and_leaves_no_temp_folder(tmp_path):
    """What CI runners, `timeout` and container stops send must clean up like Ctrl-C does."""
    import signal

    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "evsam_export.cli", "export", "--variant", "l0", "--output", str(out_parent / "o")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    # The progress line of the first trace is printed inside the staged folder: reading up to it is the event.
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "trace encoder to ONNX" in line:
            break
    assert list(out_parent.glob(".o.tmp-*")), "".join(seen)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and "Traceback" not in stderr, stderr
    assert leftovers(out_parent) == []


def test_disk_full_during_an_export_is_exit_4_with_the_path(tmp_path, monkeypatch, capsys):
    import errno

    import typer

    from evsam_export import api
    from evsam_export.cli.common import run_guarded
    from evsam_export.progress import Reporter

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous export")

    def full_disk(module, args, path, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    with pytest.raises(typer.Exit) as exit_info:
        run_guarded(False, lambda: api.export("l0", target, force=True, reporter=Reporter(quiet=True)))
    assert exit_info.value.exit_code == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert str(target / "encoder.fp32.onnx") in errors[0] and "free space on /" in errors[0], errors[0]
    assert "--debug" not in errors[0]
    assert leftovers(target) == ["old.txt"]
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.builds  # an export of its own
def test_static_prompts_export_is_traced_at_its_declared_shape_and_predicts(tmp_path):
    """--static-prompts fixes one prompt set of two points (the contract); tracing used to feed 2 sets of 3
    points, so the simplifier's equivalence check refused the graph it had just written."""
    import numpy as np
    import onnx

    from evsam_export.runtime import Predictor

    out = tmp_path / "static"
    proc = run_cli("export", "--variant", "l0", "--static-prompts", "--no-graph-passes", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    graph = onnx.load(out / "decoder.fp32.onnx", load_external_data=False).graph
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["point_coords"] == [1, 2, 2] and dims["point_labels"] == [1, 2]
    predictor = Predictor(out)
    assert predictor.info["split_decoder"] and predictor.prompt_chunk_size() == 1  # the split pair is static too
    predictor.set_image(np.full((96, 128, 3), 127, np.uint8))
    boxes = predictor.predict(boxes=np.array([[10, 10, 60, 50], [20, 30, 90, 80]], np.float32))
    assert boxes.masks.shape[-2:] == (96, 128) and boxes.masks.shape[0] == 2
