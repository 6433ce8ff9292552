"""A gated INT8 step that gains nothing ships its fp32 parent under its fp32 name, through the runner and its
step cache (precision/lowered.py; the CLI turns RunResult.declined into exit 11)."""

from __future__ import annotations

from pathlib import Path

from evsam_export.steps import fallback


def test_a_gated_int8_step_that_gains_nothing_ships_its_fp32_parent(tmp_path, monkeypatch):
    """A candidate below min_speedup (here an unreachable 1000x, with the build gate stubbed to pass): the step
    hands the fp32 parent back with the one line, no INT8-named file is left, the ORT target builds the fp32
    artifact, and the run reports it as declined (the CLI's exit 11), also when the step is reused from the cache."""
    from evsam_export.pipeline.recipe import load_recipe
    from evsam_export.pipeline.runner import StepCache, run_recipe
    from evsam_export.progress import Reporter

    monkeypatch.setenv("EVSAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fallback, "gate_candidate", lambda ctx, artifact, suite=None: fallback.Verdict(passed=True))
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text('extends = "cpu-ort-int8"\n[recipe]\nname = "r"\n[export]\nsplit_decoder = false\n'
                           '[validate]\nenabled = false\n[precision.int8]\ncalibration_images = 2\nmax_rounds = 1\n'
                           'min_speedup = 1000.0\nspeedup_runs = 1\n')
    recipe = load_recipe(recipe_file)
    cache = StepCache(tmp_path / "cache" / "steps")
    for run in ("a", "b"):
        reporter = Reporter(quiet=True)
        result = run_recipe(recipe, "l0", tmp_path / run, cache=cache, reporter=reporter)
        step = next(s for s in result.steps if s.name == "int8:encoder")
        assert step.status == ("built" if run == "a" else "reused") and step.outputs == ["encoder.onnx.fp32"]
        (line,) = result.declined
        assert line.startswith("int8:encoder: ") and "only" in line and line.endswith("the artifact is the fp32 parent")
        lowering = result.manifest.artifact("encoder.onnx.fp32").facts["lowering"]
        assert lowering["asked"] == "int8" and lowering["timing"]["speedup"] < 1000 and lowering["candidate"]["lowered"] > 0
        assert not list((tmp_path / run).glob("*int8*"))
        assert {"encoder.ort.fp32", "decoder.ort.fp32"} <= {a.id for a in result.manifest.artifacts}
        warned = next(entry for entry in reporter.summary if Path(entry.path).name == "encoder.fp32.onnx" and entry.status == "warn")
        assert "the artifact is the fp32 parent" in warned.note
