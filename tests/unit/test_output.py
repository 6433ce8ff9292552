"""Atomic output folders under hostile conditions: concurrent --force writes, stop signals, stale leftovers of
killed runs, a full disk, unwritable predict outputs and decompression-bomb sized images."""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import typer

from evsam_export import output as output_module
from evsam_export.cli.common import run_guarded
from evsam_export.errors import ExportError, OutputError
from evsam_export.output import staged_folder, sweep_stale_temp_folders

RACE_TRIALS = 100
BARRIER_TIMEOUT_S = 60


def temp_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def dead_pid() -> int:
    """The PID of a child that has exited and been reaped (PID reuse within a test is not a concern)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def race_worker(target: str, barrier, failures, trials: int, without_lock: bool, force: bool = True) -> None:
    """Write `target` with --force `trials` times, meeting the other worker at the barrier right before each swap."""
    if without_lock:  # the retries alone must also settle the race (filesystems where flock is refused)
        output_module.folder_lock = lambda folder: contextlib.nullcontext()
    for trial in range(trials):
        try:
            with staged_folder(Path(target), force=force) as staging:
                (staging / "writer.txt").write_text(f"{os.getpid()} {trial}")
                (staging / "payload.bin").write_bytes(os.urandom(4096))
                barrier.wait(BARRIER_TIMEOUT_S)
        except Exception as exc:  # collected and asserted on in the parent, which cannot see a child's raise
            failures.put(f"trial {trial}: {type(exc).__name__}: {exc}")
            barrier.abort()
            return


def run_two_writers(context, target: Path, *worker_args) -> tuple[list, list[str]]:
    """Two race_worker processes behind one barrier; (the processes, after join; the failures they reported)."""
    barrier = context.Barrier(2)
    failures = context.Queue()
    workers = [context.Process(target=race_worker, args=(str(target), barrier, failures, *worker_args)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(BARRIER_TIMEOUT_S * 2)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    return workers, errors


@pytest.mark.parametrize("without_lock", [False, True], ids=["locked", "retries-only"])
def test_two_force_writes_of_one_folder_never_fail_or_leave_temp_folders(tmp_path, without_lock):
    context = multiprocessing.get_context("fork")
    target = tmp_path / "out"
    workers, errors = run_two_writers(context, target, RACE_TRIALS, without_lock)
    assert errors == []
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert temp_leftovers(tmp_path) == []
    assert sorted(p.name for p in target.iterdir()) == ["payload.bin", "writer.txt"]
    pid, trial = (target / "writer.txt").read_text().split()
    assert int(pid) in {worker.pid for worker in workers} and int(trial) == RACE_TRIALS - 1


def test_two_writes_without_force_one_wins_and_the_other_is_refused(tmp_path):
    context = multiprocessing.get_context("fork")
    target = tmp_path / "out"
    _workers, errors = run_two_writers(context, target, 1, False, False)
    assert len(errors) == 1 and "OutputError" in errors[0] and "not empty" in errors[0], errors
    assert temp_leftovers(tmp_path) == []
    assert sorted(p.name for p in target.iterdir()) == ["payload.bin", "writer.txt"]


def test_stale_temp_folders_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    gone = dead_pid()
    stale = [tmp_path / f".out.tmp-{gone}-ab12cd34", tmp_path / f".other.old-{gone}-ef56", tmp_path / f".cachekey.tmp-{gone}"]
    live = [tmp_path / f".out.tmp-{os.getpid()}-live0001", tmp_path / f".other.tmp-{os.getppid()}-live0002"]
    unrelated = [tmp_path / ".out.tmp-abc123xy", tmp_path / "photos.tmp-1", tmp_path / "keep"]
    for folder in stale + live + unrelated:
        folder.mkdir()
        (folder / "partial.onnx").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".notes.tmp-{gone}"
    stale_file.write_text("a file, not a staging folder")
    with staged_folder(tmp_path / "out", force=False) as staging:
        (staging / "manifest.json").write_text("{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([p.name for p in live + unrelated] + [stale_file.name, "out"])
    assert all((p / "partial.onnx").exists() for p in live + unrelated)


def test_sweep_reports_what_it_removed(tmp_path):
    gone = dead_pid()
    (tmp_path / f".a.tmp-{gone}-x1").mkdir()
    (tmp_path / f".a.tmp-{os.getpid()}-x2").mkdir()
    assert [p.name for p in sweep_stale_temp_folders(tmp_path)] == [f".a.tmp-{gone}-x1"]


# The two signal tests run in a fresh interpreter, so no earlier test's OpenVINO Cores can have left a freed
# signal stack behind (docs/reliability.md, "Signals and OpenVINO's signal stack"; tests/unit/test_signal_stack.py).
SIGNAL_PROBE = """
import os, signal, sys
from pathlib import Path
import typer
from evsam_export import output as output_module
from evsam_export.cli.common import run_guarded
from evsam_export.output import staged_folder

target = Path(sys.argv[1])
case = sys.argv[2]
handler_before = signal.getsignal(signal.SIGHUP)
if case == "swap":
    real_replace = os.replace
    calls = []

    def replace_then_signal(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        if len(calls) == 1:  # between moving the old folder aside and moving the new one in
            signal.raise_signal(signal.SIGTERM)

    output_module.os.replace = replace_then_signal


def body():
    with staged_folder(target, force=True) as staging:
        (staging / "new.txt").write_text("half done" if case == "inside" else "complete")
        if case == "inside":
            os.kill(os.getpid(), signal.SIGHUP)
            raise AssertionError("the handler should have raised at the kill")


try:
    run_guarded(False, body)
except typer.Exit as exc:
    print("exit", exc.exit_code, "restored", signal.getsignal(signal.SIGHUP) == handler_before,
          "replaces", len(calls) if case == "swap" else 0)
"""


def run_signal_probe(target: Path, case: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_PROBE, str(target), case], capture_output=True, text=True,
                          timeout=120, check=False)


def test_sighup_inside_a_staged_folder_exits_129_and_leaves_the_previous_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    proc = run_signal_probe(target, "inside")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["exit", str(128 + signal.SIGHUP), "restored", "True", "replaces", "0"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGHUP" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_a_signal_during_the_swap_is_held_until_the_swap_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    proc = run_signal_probe(target, "swap")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["exit", str(128 + signal.SIGTERM), "restored", "True", "replaces", "2"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert temp_leftovers(tmp_path) == []
    assert "SIGTERM" in proc.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_inside_a_staged_folder_is_an_output_error_naming_the_target(tmp_path, code):
    target = tmp_path / "out"
    with pytest.raises(OutputError) as info:
        with staged_folder(target, force=False) as staging:
            try:
                raise OSError(code, os.strerror(code), str(staging / "encoder.fp32.onnx"))
            except OSError as exc:
                raise ExportError("torch.onnx.export of the encoder failed", hint="re-run with --debug") from exc
    line = info.value.one_line()
    assert info.value.exit_code == 4
    assert str(target / "encoder.fp32.onnx") in line and "free space on " in line
    assert "--debug" not in line
    assert list(tmp_path.iterdir()) == []


def test_disk_full_anywhere_in_a_command_is_exit_4(tmp_path, capsys):
    path = tmp_path / "cache" / "entry.onnx"

    def body():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError as exc:
            raise RuntimeError(f"failed to write the cache entry: {exc}") from exc

    with pytest.raises(typer.Exit) as exit_info:
        run_guarded(False, body)
    assert exit_info.value.exit_code == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "free space on /" in errors[0], errors
    assert "unexpected" not in errors[0] and "--debug" not in errors[0]


def test_a_message_saying_the_disk_is_full_is_exit_4_without_an_errno(capsys):
    def body():
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device")

    with pytest.raises(typer.Exit) as exit_info:
        run_guarded(False, body)
    assert exit_info.value.exit_code == 4
    assert "free space on the output disk" in capsys.readouterr().err


def write_png(path: Path, width: int, height: int, rows: bytes | None = None) -> None:
    """A grayscale PNG; with rows=None the IDAT is empty, so only the header claims the size (no allocation)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(rows) if rows is not None else zlib.compress(b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", *args], capture_output=True, text=True, env={**os.environ, "CI": "1"})


def test_predict_to_an_unwritable_place_fails_before_the_models_run(tmp_path):
    image = tmp_path / "small.png"
    write_png(image, 4, 4, bytes(5) * 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # The artifact folder does not exist: reaching the models would be exit 6, so exit 4 shows the order.
    proc = run_cli("predict", str(tmp_path / "no-artifacts"), str(image), "--point", "1,1", "-o", str(a_file / "sub" / "mask.png"))
    assert proc.returncode == 4, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a folder" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "small.png"]


def test_an_image_header_above_the_bomb_threshold_gets_one_line(tmp_path):
    image = tmp_path / "huge.png"
    write_png(image, 10_000, 10_000)  # 100 Mpx: above Pillow's warning threshold, below its refusal
    proc = run_cli("predict", str(tmp_path / "no-artifacts"), str(image), "--point", "1,1", "-o", str(tmp_path / "mask.png"))
    assert proc.returncode == 2, proc.stderr
    assert "DecompressionBomb" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot read image {image}")


def test_a_readable_image_above_the_bomb_threshold_is_read_with_one_warning_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from evsam_export.data.images import read_image_file as read_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144 px: a warning, not a refusal (above 200)
    image = tmp_path / "twelve.png"
    write_png(image, 12, 12, (b"\x00" + bytes(range(12))) * 12)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        rgb = read_image(image)
    assert rgb.shape == (12, 12, 3)
    assert [str(w.message) for w in leaked] == []
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {image} is above") and "refused" in lines[0], lines


def test_validate_with_an_unwritable_report_path_fails_before_any_model_work(tmp_path):
    folder = tmp_path / "artifacts"
    folder.mkdir()  # no manifest: reaching the parity gate would be exit 6, so exit 4 shows the order
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = run_cli("validate", str(folder), "--junit", str(a_file / "junit.xml"))
    assert proc.returncode == 4, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(a_file / "junit.xml") in errors[0], proc.stderr
