"""One consistent gate: the build-time gate a precision step runs on every candidate checks every
prompt kind, stage and gate that the release suite checks, with fewer images. Structural: a build suite
`extends` its release suite and cannot override kinds or tolerances, and a recipe whose gate_suite checks
less than its [validate] suite is refused when it loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from evsam_export.errors import RecipeError
from evsam_export.parity.suites import (
    PRECISIONS,
    gate_coverage_problems,
    list_suites,
    load_suite,
    validators_dir,
)
from evsam_export.pipeline.auto import is_auto_recipe, load_auto_recipe
from evsam_export.pipeline.recipe import load_recipe, recipes_dir
from evsam_export.steps.settings import GATE_SUITE

RELEASE_SUITES = ("default", "full")


def _derived(tmp_path: Path, body: str, name: str = "derived.toml") -> Path:
    path = tmp_path / name
    path.write_text('extends = "default"\n\n[suite]\nname = "derived"\ndescription = "fewer images"\n\n'
                    '[[suite.images]]\nsynthetic = 0\nsize = [240, 320]\n' + body)
    return path


def test_shipped_build_gate_is_derived_from_the_release_suite():
    gate = load_suite(GATE_SUITE)
    assert 'extends = "default"' in (validators_dir() / f"{GATE_SUITE}.toml").read_text()
    for release in RELEASE_SUITES:  # default and full share kinds and gates, so the one build gate serves both
        assert gate_coverage_problems(gate, load_suite(release), PRECISIONS) == []
    assert len(gate.images) < len(load_suite("default").images)


def test_a_derived_suite_inherits_kinds_and_tolerances(tmp_path):
    suite = load_suite(_derived(tmp_path, "\n[suite.prompts]\nseed = 3\n"))
    default = load_suite("default")
    assert suite.prompt_kinds == default.prompt_kinds and suite.tolerances == default.tolerances
    assert suite.prompt_seed == 3 and len(suite.images) == 1 and suite.name == "derived"


@pytest.mark.parametrize("body, field", [
    ('\n[suite.prompts]\nkinds = ["point", "box"]\n', "kinds"),
    ("\n[tolerances.int8]\nembedding_snr_db_min = 5.0\n", "tolerances"),
])
def test_a_derived_suite_cannot_check_less(tmp_path, body, field):
    with pytest.raises(RecipeError, match=field):
        load_suite(_derived(tmp_path, body))


def test_a_suite_that_extends_itself_is_refused(tmp_path):
    path = tmp_path / "loop.toml"
    path.write_text('extends = "loop.toml"\n[suite]\nname = "x"\ndescription = "x"\n')
    with pytest.raises(RecipeError, match="extends back"):
        load_suite(path)


def _loose_gate(tmp_path: Path, kinds: tuple[str, ...], snr: float) -> Path:
    """A stand-alone suite with default.toml's gates except the given kinds and INT8 SNR floor."""
    text = (validators_dir() / "default.toml").read_text()
    text = text.replace('name = "default"', 'name = "loose"')
    kinds_line = next(line for line in text.splitlines() if line.startswith("kinds = "))
    text = text.replace(kinds_line, "kinds = [" + ", ".join(f'"{k}"' for k in kinds) + "]")
    text = text.replace("embedding_snr_db_min = 10.0", f"embedding_snr_db_min = {snr}")
    path = tmp_path / "loose.toml"
    path.write_text(text)
    return path


def test_gate_coverage_names_a_skipped_kind_and_a_looser_gate(tmp_path):
    default = load_suite("default")
    loose = load_suite(_loose_gate(tmp_path, ("point", "box", "boxes16"), 5.0))
    problems = gate_coverage_problems(loose, default, ("int8",))
    assert "prompt kind 'mask_refine'" in problems and "prompt kind 'multimask'" in problems
    assert "int8 embedding_snr_db_min = 5.0 (release gate: 10.0)" in problems
    assert gate_coverage_problems(loose, default, ("fp16",)) == [p for p in problems if p.startswith("prompt kind")]
    stricter = load_suite(_loose_gate(tmp_path, default.prompt_kinds, 20.0))
    assert gate_coverage_problems(stricter, default, PRECISIONS) == []


def test_a_recipe_whose_build_gate_checks_less_is_refused(tmp_path):
    loose = _loose_gate(tmp_path, ("point", "box", "boxes16"), 10.0)
    with pytest.raises(RecipeError, match=r"\[precision.int8\] gate_suite.*'mask_refine'"):
        load_recipe("cpu-ort-int8", [f"precision.int8.gate_suite={loose}"])
    # Without a build gate (fallback off) or without a release gate nothing can disagree.
    load_recipe("cpu-ort-int8", [f"precision.int8.gate_suite={loose}", "precision.int8.fallback=false"])
    load_recipe("cpu-ort-int8", [f"precision.int8.gate_suite={loose}", "validate.enabled=false"])


@pytest.mark.parametrize("recipe", sorted(path.stem for path in recipes_dir().glob("*.toml")))
@pytest.mark.parametrize("release", RELEASE_SUITES)
def test_every_shipped_recipe_has_a_build_gate_that_covers_each_release_suite(recipe, release):
    if is_auto_recipe(recipe):  # its candidates are loaded, build gates checked, with the release suite handed on
        assert f"validate.suite={release}" in load_auto_recipe(recipe, [f"validate.suite={release}"]).candidate_overrides
        return
    load_recipe(recipe, [f"validate.suite={release}"])


def test_passing_a_covering_gate_implies_passing_the_release_gate():
    """For every gate the validator applies, a value that meets the build gate's threshold meets the release
    threshold whenever gate_coverage_problems is empty (the direction of each comparison is right)."""
    default = load_suite("default")
    release = default.tolerances["int8"]
    names = ("embedding_snr_db_min", "embedding_cosine_min", "mask_iou_mean_min", "mask_iou_p5_min",
             "stable_mask_iou_mean_min", "iou_pred_max_abs", "decoder_logit_max_abs")
    for name in names:
        base = getattr(release, name) if getattr(release, name) is not None else 1e-3
        for factor in (0.5, 0.9, 1.0, 1.1, 2.0):
            changed = dataclasses.replace(release, **{name: base * factor})
            gate = dataclasses.replace(default, tolerances={**default.tolerances, "int8": changed})
            covers = gate_coverage_problems(gate, default, ("int8",)) == []
            for value in (base * f for f in (0.4, 0.8, 0.95, 1.0, 1.05, 1.2, 3.0)):
                minimum = name.endswith("_min")
                meets_gate = value >= base * factor if minimum else value <= base * factor
                needed = getattr(release, name)
                meets_release = needed is None or (value >= needed if minimum else value <= needed)
                if covers and meets_gate:
                    assert meets_release, (name, factor, value)


def test_every_shipped_suite_loads():
    for name in list_suites():
        load_suite(name)


def test_a_covering_task_gate_implies_the_release_task_gate():
    """With task gating (parity.task), a candidate whose drops and floors meet a covering build gate meets the
    release gate's; a build gate with task gating under a release suite without it never covers."""
    from evsam_export.parity.task_settings import TaskCriterion

    default = load_suite("default")
    release = dataclasses.replace(default, task=TaskCriterion({"box": 1.0, "point": 2.0}))
    assert gate_coverage_problems(dataclasses.replace(default, task=TaskCriterion({"box": 0.1})), default, PRECISIONS)
    for box in (0.5, 1.0, 1.5):
        for floor in (0.8, 0.9, 0.95):
            gate = dataclasses.replace(default, task=TaskCriterion({"box": box, "point": 2.0}, mask_iou_floor=floor))
            covers = gate_coverage_problems(gate, release, PRECISIONS) == []
            for drop in (0.0, 0.9, 1.2, 1.6):
                for iou in (0.85, 0.92, 0.97):
                    if covers and drop <= box and iou >= floor:
                        assert drop <= release.task.max_drop["box"] and iou >= release.task.mask_iou_floor, (box, floor, drop, iou)

