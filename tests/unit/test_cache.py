"""The step cache: verified restores, independent copies, race-free stores, fail-fast when unwritable,
--no-cache, and the `cache verify|prune|clear` commands. The issue's end-to-end scenario (truncate a cached
export, run again) is in test_recipes.py, next to the runner's other cache tests."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evsam_export.errors import OutputError
from evsam_export.files import sha256_file
from evsam_export.pipeline.cache import StepCache, read_entry, verify_entry

KEY = "a" * 64


def make_step_output(folder: Path, seed: int = 0) -> list[str]:
    """Files a step might produce: a large one, a small one in a subfolder, an empty one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "model.onnx").write_bytes(bytes([seed % 251]) * (1 << 20) + b"end")
    (folder / "sub" / "weights.bin").write_bytes(b"weights %d" % seed)
    (folder / "empty.txt").write_bytes(b"")
    return ["model.onnx", "sub/weights.bin", "empty.txt"]


def stored(tmp_path: Path, key: str = KEY) -> tuple[StepCache, list[str]]:
    cache = StepCache(tmp_path / "cache")
    files = make_step_output(tmp_path / "built")
    cache.store(key, tmp_path / "built", files, {"step": "export", "artifacts": []})
    return cache, files


def test_restore_gives_independent_copies_and_the_cache_files_are_read_only(tmp_path):
    cache, files = stored(tmp_path)
    entry, problem = cache.restore(KEY, tmp_path / "out")
    assert problem is None and entry["step"] == "export" and sorted(entry["files"]) == sorted(files)
    for name in files:
        output, cached = tmp_path / "out" / name, cache.root / KEY / "files" / name
        assert output.read_bytes() == (tmp_path / "built" / name).read_bytes() == cached.read_bytes()
        assert os.stat(output).st_ino != os.stat(cached).st_ino
        assert os.stat(output).st_nlink == 1 and os.stat(cached).st_nlink == 1  # no hard links either way
        assert os.stat(cached).st_mode & 0o222 == 0, name  # read-only
        assert os.stat(output).st_mode & 0o200, name  # the user's own, writable copy
    assert os.stat(cache.root / KEY / "entry.json").st_mode & 0o222 == 0

    with open(tmp_path / "out" / "model.onnx", "r+b") as handle:  # editing an output in place ...
        handle.write(b"XXXX")
    assert verify_entry(cache.root / KEY)[1] is None  # ... leaves the cache intact
    before = (tmp_path / "out" / "sub" / "weights.bin").read_bytes()
    os.truncate(cache.root / KEY / "files" / "sub" / "weights.bin", 3)  # and damage in the cache ...
    assert (tmp_path / "out" / "sub" / "weights.bin").read_bytes() == before  # ... never reaches an output


def _truncate_largest(entry: Path) -> None:
    largest = max((p for p in (entry / "files").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


def _flip_a_byte(entry: Path) -> None:
    path = entry / "files" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _rewrite_entry(entry: Path, change) -> None:
    path = entry / "entry.json"
    data = json.loads(path.read_text())
    change(data)
    path.chmod(0o644)
    path.write_text(json.dumps(data))


DAMAGE = {
    "truncated largest file": (_truncate_largest, "model.onnx is"),
    "same size, other bytes": (_flip_a_byte, "model.onnx sha256 differs"),
    "file missing": (lambda e: (e / "files" / "sub" / "weights.bin").unlink(), "sub/weights.bin"),
    "entry.json garbled": (lambda e: ((e / "entry.json").chmod(0o644), (e / "entry.json").write_text('{"files": {')), "unreadable"),
    "entry.json missing": (lambda e: (e / "entry.json").unlink(), "entry.json is missing"),
    "older format (names only)": (lambda e: _rewrite_entry(e, lambda d: d.update(format=1, files=list(d["files"]))), "older version"),
    "a name outside the entry": (lambda e: _rewrite_entry(e, lambda d: d["files"].update({"../x": {"size": 0, "sha256": ""}})),
                                 "malformed file records"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_a_miss_that_leaves_nothing_and_the_next_store_replaces_it(tmp_path, damage):
    cache, files = stored(tmp_path)
    spoil, reason = DAMAGE[damage]
    spoil(cache.root / KEY)
    entry, problem = cache.restore(KEY, tmp_path / "out")
    assert entry is None and reason in problem
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # no half-restored step
    assert verify_entry(cache.root / KEY)[1] is not None

    cache.store(KEY, tmp_path / "built", files, {"step": "export", "artifacts": []})  # the rebuilt step's store
    entry, problem = cache.restore(KEY, tmp_path / "out")
    assert problem is None and entry is not None
    assert sha256_file(tmp_path / "out" / "model.onnx") == sha256_file(tmp_path / "built" / "model.onnx")
    assert sorted(p.name for p in cache.root.iterdir()) == [KEY]  # the bad entry's remains are gone


def test_no_entry_is_a_plain_miss(tmp_path):
    assert StepCache(tmp_path / "cache").restore(KEY, tmp_path / "out") == (None, None)


def _store_behind_barrier(barrier, root: str, folder: str, files: list[str], keys: list[str], errors) -> None:
    cache = StepCache(Path(root))
    for key in keys:
        barrier.wait()
        try:
            cache.store(key, Path(folder), files, {"step": "export", "artifacts": []})
        except Exception as exc:  # reported to the parent, which fails the test with it
            errors.put(f"{key[:8]}: {type(exc).__name__}: {exc}")


def test_two_processes_storing_the_same_keys_at_once_both_succeed_without_leftovers(tmp_path):
    """Both processes pass a barrier, then store the same key; half of the keys start with a bad entry
    that both try to replace at once."""
    root = tmp_path / "cache"
    files = make_step_output(tmp_path / "built")
    keys = [f"{index:064x}" for index in range(24)]
    seeder = StepCache(root)
    for key in keys[::2]:
        seeder.store(key, tmp_path / "built", files, {"step": "export", "artifacts": []})
        os.truncate(root / key / "files" / "model.onnx", 10)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch's threads
    barrier, errors = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_store_behind_barrier, args=(barrier, str(root), str(tmp_path / "built"), files, keys, errors))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert reported == [] and [w.exitcode for w in workers] == [0, 0]
    assert sorted(p.name for p in root.iterdir()) == keys  # no .KEY.tmp-PID or .KEY.gone-PID left
    for key in keys:
        assert verify_entry(root / key)[1] is None, key


def test_an_unwritable_cache_fails_before_any_model_work(tmp_path, monkeypatch):
    from evsam_export.pipeline import runner
    from evsam_export.pipeline.recipe import load_recipe

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = StepCache(blocker / "steps")
    with pytest.raises(OutputError) as info:
        cache.check_writable()
    line = info.value.one_line()
    assert str(blocker / "steps") in line and "EVSAM_CACHE_DIR" in line and "--no-cache" in line and info.value.exit_code == 4

    def model_work(*args, **kwargs):
        raise AssertionError("model work started before the cache was checked")

    monkeypatch.setattr(runner, "_weights_sha", model_work)
    with pytest.raises(OutputError, match="not writable"):
        runner.run_recipe(load_recipe("cpu-ort-fp32"), "l0", tmp_path / "out", cache=cache)
    assert not (tmp_path / "out").exists()
    StepCache(blocker / "steps", enabled=False).check_writable()  # --no-cache never touches it


def test_an_unwritable_cache_is_one_line_and_exit_4_from_the_cli(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "CI": "1", "EVSAM_CACHE_DIR": str(blocker)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", "cpu-ort-fp32", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: step cache ") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(blocker / "steps") in proc.stderr and "EVSAM_CACHE_DIR" in proc.stderr and "--no-cache" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 60  # nothing was exported


def test_a_full_cache_is_one_line_and_leaves_no_partial_entry(tmp_path, monkeypatch):
    import errno

    from evsam_export.pipeline import cache as cache_module

    files = make_step_output(tmp_path / "built")

    def copy_until_full(source, target):
        if source.name == "weights.bin":  # the second file: the first is already in the entry's scratch
            raise OSError(errno.ENOSPC, "No space left on device")
        cache_module.shutil.copyfile(source, target)

    monkeypatch.setattr(cache_module, "copy_independent", copy_until_full)
    cache = StepCache(tmp_path / "cache")
    with pytest.raises(OutputError) as info:
        cache.store(KEY, tmp_path / "built", files, {"step": "export", "artifacts": []})
    assert str(cache.root) in info.value.one_line() and "free space" in info.value.one_line() and info.value.exit_code == 4
    assert list(cache.root.iterdir()) == []

    import io

    from evsam_export.pipeline.runner import _store
    from evsam_export.progress import Reporter

    lines = io.StringIO()  # in a run, the finished step is kept and the lost reuse is a warning line
    _store(cache, Reporter(interactive=False, stream=lines), KEY, tmp_path / "built", files, {"step": "export", "artifacts": []})
    assert lines.getvalue().startswith("warning: could not store a step in the cache ") and lines.getvalue().count("\n") == 1


def test_no_cache_neither_reads_nor_writes(tmp_path, monkeypatch):
    cache, files = stored(tmp_path)
    disabled = StepCache(cache.root, enabled=False)
    assert disabled.restore(KEY, tmp_path / "out") == (None, None) and disabled.lookup(KEY) is None
    disabled.store("b" * 64, tmp_path / "built", files, {"step": "export", "artifacts": []})
    assert sorted(p.name for p in cache.root.iterdir()) == [KEY]
    elsewhere = StepCache(tmp_path / "never", enabled=False)
    elsewhere.store(KEY, tmp_path / "built", files, {"step": "export", "artifacts": []})
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("flags, enabled", [([], True), (["--no-cache"], False)])
def test_the_run_command_hands_the_runner_a_cache_that_matches_no_cache(tmp_path, monkeypatch, flags, enabled):
    from typer.testing import CliRunner

    from evsam_export.cli import _register, app
    from evsam_export.pipeline import runner

    seen = {}

    def fake_run_recipe(recipe, variant, folder, checkpoint, force, dry_run, reporter, cache, *rest):
        seen["cache"] = cache
        raise OutputError("stopped by the test")

    _register()
    monkeypatch.setattr(runner, "run_recipe", fake_run_recipe)
    monkeypatch.setenv("EVSAM_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["run", "cpu-ort-fp32", "-o", str(tmp_path / "out"), *flags])
    assert result.exit_code == 4 and seen["cache"].enabled is enabled
    help_text = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "store nothing: the step cache is neither read nor written" in help_text


def _cache_cli(tmp_path: Path, *args: str):
    from typer.testing import CliRunner

    from evsam_export.cli import _register, app

    _register()
    return CliRunner().invoke(app, ["cache", *args], env={"EVSAM_CACHE_DIR": str(tmp_path / "cache")})


def _fill(tmp_path: Path, count: int) -> tuple[StepCache, list[str]]:
    cache = StepCache(tmp_path / "cache" / "steps")
    keys = [f"{index:064x}" for index in range(count)]
    for index, key in enumerate(keys):
        files = make_step_output(tmp_path / f"built{index}", seed=index)
        cache.store(key, tmp_path / f"built{index}", files, {"step": "export", "artifacts": []})
    return cache, keys


def test_cache_verify_reports_each_entry_and_fix_removes_the_bad_ones(tmp_path):
    cache, keys = _fill(tmp_path, 3)
    _truncate_largest(cache.root / keys[1])
    result = _cache_cli(tmp_path, "verify")
    assert result.exit_code == 6, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.split()[1:2] and len(line.split()[1]) == 64}
    assert lines[keys[0]].startswith("ok") and lines[keys[2]].startswith("ok")
    assert lines[keys[1]].startswith("BAD") and "model.onnx is" in lines[keys[1]]
    assert "3 entries" in result.output and "(1 bad)" in result.output and "error: 1 bad step cache entries" in result.output
    assert (cache.root / keys[1]).exists()  # reporting removes nothing

    result = _cache_cli(tmp_path, "verify", "--fix")
    assert result.exit_code == 0, result.output
    assert "removed 1 entries" in result.output
    assert sorted(p.name for p in cache.root.iterdir()) == [keys[0], keys[2]]
    assert _cache_cli(tmp_path, "verify").exit_code == 0


def test_cache_prune_by_age_then_by_size_least_recently_used_first(tmp_path):
    cache, keys = _fill(tmp_path, 4)
    now = time.time()
    for age_days, key in zip((40, 20, 10, 0), keys):
        os.utime(cache.root / key, (now - age_days * 86400,) * 2)
    entry_bytes = sum(p.stat().st_size for p in (cache.root / keys[0]).rglob("*") if p.is_file())

    result = _cache_cli(tmp_path, "prune", "--older-than", "30")
    assert result.exit_code == 0 and "4 entries" in result.output and "removed 1 entries" in result.output, result.output
    assert sorted(p.name for p in cache.root.iterdir()) == keys[1:]

    cache.restore(keys[1], tmp_path / "out")  # a reuse makes the 20-day-old entry the most recently used
    room_for_two = (2 * entry_bytes + 100) / (1 << 30)
    result = _cache_cli(tmp_path, "prune", "--max-gib", f"{room_for_two:.9f}")
    assert result.exit_code == 0 and "removed 1 entries" in result.output, result.output
    assert sorted(p.name for p in cache.root.iterdir()) == [keys[1], keys[3]]

    assert _cache_cli(tmp_path, "prune").exit_code == 2  # neither limit given


def test_cache_clear_removes_every_entry_and_the_scratch_of_dead_processes_only(tmp_path):
    cache, keys = _fill(tmp_path, 2)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(finished.stdout), os.getppid()
    (cache.root / f".{keys[0]}.tmp-{dead_pid}-abc").mkdir()
    (cache.root / f".{keys[0]}.tmp-{live_pid}-abc").mkdir()
    result = _cache_cli(tmp_path, "clear")
    assert result.exit_code == 0, result.output
    assert "2 entries" in result.output and "removed 2 entries" in result.output and "1 temporary folders" in result.output
    assert [p.name for p in cache.root.iterdir()] == [f".{keys[0]}.tmp-{live_pid}-abc"]  # another process may still write it
    assert read_entry(cache.root / keys[0]) == (None, "entry.json is missing")


def test_an_entry_whose_artifact_records_disagree_with_its_files_is_dropped_and_rebuilt(tmp_path):
    """Sound files but an edited artifact record (its sha256 no longer the file's): the runner refuses the
    entry and drops it with the copies it restored, since a later store would keep an entry whose files verify."""
    from evsam_export.pipeline.runner import Step, _cached_artifacts

    cache, files = stored(tmp_path)
    _rewrite_entry(cache.root / KEY, lambda d: d.update(artifacts=[{"id": "encoder.onnx.fp32", "path": "model.onnx"}]))
    step = Step("export", "evsam_export.pipeline.export", key=KEY)
    entry, problem = cache.restore(KEY, tmp_path / "out")
    assert problem is None and _cached_artifacts(step, entry) is None and step.cache_problem == "entry.json has malformed artifact records"

    good = json.loads((cache.root / KEY / "entry.json").read_text())
    artifact = {"id": "encoder.onnx.fp32", "component": "encoder", "target": "onnx", "precision": "fp32", "path": "model.onnx",
                "sha256": "0" * 64, "size_bytes": 3, "inputs": [], "outputs": []}
    assert _cached_artifacts(step, {**good, "artifacts": [artifact]}) is None and "disagree" in step.cache_problem
    artifact["sha256"] = good["files"]["model.onnx"]["sha256"]
    assert [a.id for a in _cached_artifacts(step, {**good, "artifacts": [artifact]})] == ["encoder.onnx.fp32"]

    cache.discard(KEY, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()] and list(cache.root.iterdir()) == []
    cache.store(KEY, tmp_path / "built", files, {"step": "export", "artifacts": [artifact]})
    assert cache.restore(KEY, tmp_path / "again")[0]["artifacts"] == [artifact]


def test_a_run_sweeps_the_temporary_folders_of_dead_processes_when_it_starts(tmp_path):
    cache, _files = stored(tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = cache.root / f".{KEY}.tmp-{int(finished.stdout)}-abc", cache.root / f".{KEY}.gone-{os.getppid()}-abc"
    dead.mkdir()
    live.mkdir()
    cache.check_writable()  # what run_recipe calls before any model work
    assert not dead.exists() and live.exists() and verify_entry(cache.root / KEY)[1] is None
