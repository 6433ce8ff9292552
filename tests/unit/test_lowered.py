"""Honest names for lower precision (evsam_export.precision.lowered): the census of what runs INT8, the verdict
that hands the fp32 parent back when a gated build gained nothing, the exit code that says so, and the
CPU-flag decisions of the INT8 steps (EVSAM_HIDE_CPU_FLAGS plays a CPU without VNNI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evsam_export import errors
from evsam_export.environment import HIDE_CPU_FLAGS_ENV, cpu_flags
from evsam_export.pipeline.auto import decision_markdown, deployable_artifacts
from evsam_export.precision import lowered, ort_int8
from evsam_export.progress import Reporter
from evsam_export.steps import fallback

VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


def test_census_counts_per_op_type_and_reads_as_a_line():
    counted = lowered.qdq_census({"quantized": {"Conv": 56}, "float": {"Conv": 13, "MatMul": 8}})
    assert counted["ops"] == {"Conv": {"lowered": 56, "total": 69}, "MatMul": {"lowered": 0, "total": 8}}
    assert (counted["lowered"], counted["total"]) == (56, 77)
    assert counted["text"] == "56 of 69 Conv, 0 of 8 MatMul INT8"
    assert lowered.whole_graph_census([("a", "Convolution"), ("b", "MatMul"), ("c", "Add")], "bf16")["text"] == \
        "1 of 1 Conv, 1 of 1 MatMul bf16"


def test_gain_verdict_refuses_no_int8_and_too_little_speed():
    none_left = lowered.qdq_census({"quantized": {}, "float": {"Conv": 69}})
    assert lowered.gain_verdict(none_left, True, None, 1.1) == "no INT8 layer passed the gate; the artifact is the fp32 parent"
    some = lowered.qdq_census({"quantized": {"Conv": 2}, "float": {"Conv": 67}})
    slow = {"parent_ms": 600.0, "candidate_ms": 580.0, "speedup": 1.034, "runs": 5}
    line = lowered.gain_verdict(some, True, slow, 1.1)
    assert "2 of 69 Conv INT8 is only 1.03x its fp32 parent" in line and line.endswith("the artifact is the fp32 parent")
    assert lowered.gain_verdict(some, True, {**slow, "speedup": 1.9}, 1.1) == ""
    assert lowered.gain_verdict(some, False, None, 1.1) == ""  # a failed gate speaks for itself (release gate decides)


def test_summary_line_of_a_handed_back_parent_and_of_a_census():
    line = "no INT8 layer passed the gate; the artifact is the fp32 parent"
    assert fallback.summary_outcome({"lowering": {"line": line}}) == ("warn", line)
    counted = lowered.qdq_census({"quantized": {"Conv": 56}, "float": {"Conv": 13}})
    facts = {"gate_passed": True, "lowered": counted, "fallback": [
        {"round": 0, "kept_fp32_groups": [], "worst_gate": "encoder/all embedding_snr_db.min = 8 (needs >= 10)"},
        {"round": 1, "kept_fp32_groups": ["neck"]}]}
    status, note = fallback.summary_outcome(facts)
    assert status == "ok" and "(56 of 69 Conv INT8)" in note


def test_progress_note_estimates_what_is_left():
    assert fallback.progress_note(120.0, 2, 3) == " [120 s so far; at most 3 more rounds, about 180 s]"
    assert fallback.progress_note(60.0, 1, 0) == " [60 s so far]"


def test_nothing_gained_has_its_own_documented_exit_code():
    codes = [cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.EvsamError)]
    assert errors.NothingGained.exit_code == 11 and codes.count(11) == 1
    root = Path(__file__).parents[2]
    assert "11 nothing gained" in (root / "README.md").read_text()
    assert "| 11 |" in (root / "docs" / "ci.md").read_text()


def test_auto_table_shows_what_each_artifact_holds():
    decision = {"recipe": "cpu-auto", "variant": "l0", "suite": "default", "runs": 3,
                "machine": {"cpu": "cpu", "cpu_flags": []},
                "candidates": [{"recipe": "cpu-ort-int8", "status": "passed", "reason": "", "artifacts": ["encoder.ort.int8"]},
                               {"recipe": "cpu-openvino-int8", "status": "no gain", "artifacts": [],
                                "reason": "openvino:encoder: no INT8 layer passed the gate; the artifact is the fp32 parent"}],
                "median_ms": {"encoder.ort.int8": {"1 image": 300.0}}, "pairs_tried": [], "recommended": {},
                "lowered": {"encoder.ort.int8": "56 of 69 Conv INT8"}}
    table = decision_markdown(decision)
    assert "| encoder.ort.int8 (56 of 69 Conv INT8) |" in table
    assert "| cpu-openvino-int8 | no gain: openvino:encoder: no INT8 layer passed the gate" in table


def test_auto_compares_the_int8_encoder_a_precision_step_wrote_for_the_runtime():
    """cpu-ort-int8's ort step keeps the QDQ INT8 encoder as is and writes no encoder of its own: the encoder
    cpu-auto times and may recommend is the int8 step's artifact."""
    from types import SimpleNamespace

    built = [SimpleNamespace(id=i, target=i.split(".")[1]) for i in (
        "encoder.onnx.fp32", "decoder.onnx.fp32", "encoder.ort.int8", "decoder.ort.fp32", "decoder_prompt.ort.fp32")]
    assert deployable_artifacts(built, "ort") == ["encoder.ort.int8", "decoder.ort.fp32", "decoder_prompt.ort.fp32"]
    assert deployable_artifacts(built, "openvino") == []


@pytest.mark.parametrize("hidden, expected", [("", None), (",".join(VNNI), True)])
def test_ort_reduce_range_follows_the_cpu_flags(monkeypatch, hidden, expected):
    """With VNNI hidden the ORT step keeps 7-bit weights (its u8s8 kernels would saturate), as the NNCF step
    picks its overflow fix; with the machine's own flags it follows whether they include VNNI."""
    monkeypatch.setenv(HIDE_CPU_FLAGS_ENV, hidden)
    flags = cpu_flags()
    resolved, why = ort_int8.resolve_reduce_range("auto", flags)
    has_vnni = any(flag in flags for flag in VNNI)
    assert resolved is (expected if expected is not None else not has_vnni)
    assert ("no VNNI" in why) is resolved
    assert ort_int8.resolve_reduce_range(False, flags) == (False, "set explicitly")
    from evsam_export.precision import nncf_int8

    assert (nncf_int8.resolve_overflow_fix("auto", flags)[0] == "first_layer") is resolved


def _fake_artifact(kept: frozenset):
    from evsam_export.manifest import Artifact

    return Artifact(id="encoder.ort.int8", component="encoder", target="ort", precision="int8", path="encoder.ort.int8.onnx",
                    sha256="0" * 64, size_bytes=1, inputs=[], outputs=[], parent="encoder.onnx.fp32", step="int8",
                    settings={}, facts={"kept": sorted(kept)})


@pytest.mark.parametrize("needed", [0, 1, 3, 7, 10])
def test_ranked_search_finds_the_fewest_regions_to_keep(needed):
    """Bisection over the ranking: the result keeps exactly the `needed` most harmful regions fp32 (the gate passes
    from there on), the passing candidate is rebuilt when a later round overwrote it, and the rounds stay few."""
    from evsam_export.steps.step import StepContext

    ranked = [fallback.RankedUnit(f"block{i}", (f"op{i}a", f"op{i}b"), 0.1 / (i + 1)) for i in range(10)]
    built = []

    def candidates_fn(kept):
        built.append(len(kept) // 2)
        return _fake_artifact(kept)

    def gate(ctx, artifact):
        return fallback.Verdict(passed=len(artifact.facts["kept"]) // 2 >= needed)

    ctx = StepContext(folder=Path("."), manifest=None, variant=None, reporter=Reporter(quiet=True))
    artifact = fallback.build_with_ranking(ctx, None, candidates_fn, lambda: ranked, max_rounds=8, target_snr_db=10.0, gate=gate)
    rounds = artifact.facts["fallback"]
    if needed < 10:
        assert artifact.facts["gate_passed"] and len(artifact.facts["kept"]) == 2 * needed
        assert artifact.facts["kept_fp32_regions"] == [f"block{i}" for i in range(needed)]
    else:  # every region fp32 is the parent: never built, and the error carriers are named
        assert not artifact.facts["gate_passed"] and artifact.facts["error_carriers"][0]["region"] == "block0"
        assert 10 not in built
    assert len(rounds) <= 1 + 4 and rounds[0]["kept_fp32_regions"] == 0


def test_ranking_orders_regions_by_their_measured_noise():
    reference = {"y": np.ones(100, dtype=np.float32)}

    def run_with_only(names):
        noise = 0.5 if "b/op_list.1/conv" in names else 0.01
        return {"y": reference["y"] + np.sqrt(noise)}

    from evsam_export.steps.step import StepContext

    ctx = StepContext(folder=Path("."), manifest=None, variant=None, reporter=Reporter(quiet=True))
    ops = ["/a/op_list.0/conv", "/a/op_list.0/conv2", "b/op_list.1/conv", "lonely"]
    ranked = fallback.rank_units(ctx, "t", ops, run_with_only, reference)
    assert [u.name for u in ranked][0] == "b/op_list.1" and {u.name for u in ranked} == {"/a/op_list.0", "b/op_list.1", "lonely"}
    assert ranked[0].snr_db == pytest.approx(3.01, abs=0.01)
    assert fallback.predicted_snr_db(ranked, 1) == pytest.approx(-10 * np.log10(0.02), abs=0.01)


@pytest.mark.parametrize("build_needs, release_needs", [(2, 2), (2, 5), (0, 3), (3, 10)])
def test_the_build_suites_answer_is_gated_on_the_release_suite_and_the_search_goes_on_above_it(build_needs, release_needs):
    """The smallest count the build suite passes is gated on the release suite; a miss there moves the search
    above it with the release suite as the gate, so the shipped candidate passed the suite `run` releases on."""
    from evsam_export.steps.step import StepContext

    ranked = [fallback.RankedUnit(f"block{i}", (f"op{i}",), 0.1 / (i + 1)) for i in range(10)]

    def kept(artifact):
        return len(artifact.facts["kept"])

    ctx = StepContext(folder=Path("."), manifest=None, variant=None, reporter=Reporter(quiet=True))
    artifact = fallback.build_with_ranking(
        ctx, None, _fake_artifact, lambda: ranked, max_rounds=8, target_snr_db=10.0,
        gate=lambda c, a: fallback.Verdict(passed=kept(a) >= build_needs),
        release_suite="default", release_gate=lambda c, a: fallback.Verdict(passed=kept(a) >= release_needs))
    rounds = artifact.facts["fallback"]
    if release_needs < 10:
        assert artifact.facts["gate_passed"] and kept(artifact) == release_needs
        assert artifact.facts["gate_suite"] == "default" and artifact.facts["build_suite"] == "calibration-gate"
        confirmation = next(r for r in rounds if r["suite"] == "default")
        assert confirmation["kept_fp32_regions"] == build_needs and confirmation["passed"] == (build_needs >= release_needs)
    else:  # no count below all-fp32 passes the release suite: the parent is never built
        assert not artifact.facts["gate_passed"] and all(r["kept_fp32_regions"] < 10 for r in rounds)
