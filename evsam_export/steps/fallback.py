"""Automatic precision fallback: build a reduced-precision candidate, gate it, and while the gate fails put
the next most sensitive group of nodes back to fp32, rebuild and re-gate.

Generic over the precision tool (ORT float16 converter, ORT QDQ, NNCF): a step describes its ordered
`FallbackGroup`s (regions of evsam_export.export.regions, each group with the reason it comes at that place) and
gives a `candidates_fn(kept)` that writes the artifact with the groups in `kept` held at fp32. This
module decides nothing about graphs; it only orders rounds, gates, and records every round in
`facts["fallback"]`:

    artifact = build_with_fallback(ctx, parent, build_round, max_rounds=4, groups=INT8_GROUPS, nodes=graph_nodes(path))

Verdicts never go silent (docs/design.md "A missed goal never exits 0"): when nothing passes, the last
candidate comes back with `facts["gate_passed"] = False` and a one-line `facts["gate_note"]`, for the
caller to report and fail on. A candidate counts as passing only when *its own* stages exist and all
pass; the fp32 artifacts the gate validates alongside it are reported separately, and an artifact no
runner can execute is a failure, not a pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from evsam_export.manifest import Artifact
from evsam_export.steps.step import StepContext, artifact_id

# The small suite every candidate is gated on (validators/calibration-gate.toml: 2 scenes + 1 photo,
# every prompt kind, the default.toml tolerances verbatim). The recipe's own suite still validates the
# finished folder afterwards.
GATE_SUITE = "calibration-gate"


@dataclass(frozen=True)
class FallbackGroup:
    """Regions that go back to fp32 together, in one fallback round, and why the group sits at its place.

    `regions` are names from evsam_export.export.regions.REGIONS (or Region objects, for tests and
    experiments); the group's name is theirs, joined with "+"."""

    regions: tuple
    reason: str  # why it is this far up the list (one line, recorded in facts)

    def __post_init__(self) -> None:
        from evsam_export.export.regions import Region, region

        resolved = tuple(item if isinstance(item, Region) else region(item) for item in self.regions)
        object.__setattr__(self, "regions", resolved)

    @property
    def name(self) -> str:
        return "+".join(r.name for r in self.regions)

    def select(self, nodes: Iterable[tuple[str, str]]) -> list[str]:
        """Names of the (name, op_type) nodes in any of the group's regions, in graph order."""
        from evsam_export.export.regions import select

        return select(self.regions, list(nodes))


@dataclass
class Verdict:
    """The gate's answer for one candidate (only the candidate's own stages)."""

    passed: bool
    failed: list[dict] = field(default_factory=list)  # {stage, kind, metric, value, threshold, op}
    worst: dict | None = None  # the failing gate furthest from its threshold (relative)
    note: str = ""  # e.g. "no runner", "fp32 reference artifacts also failed"
    seconds: float = 0.0
    task_drop_points: dict | None = None  # prompt kind -> mIoU points below PyTorch (gate suites with ground truth)
    advisory_misses: list[str] = field(default_factory=list)  # agreement gates missed without deciding (task gating)


def graph_nodes(model_or_path) -> list[tuple[str, str]]:
    """(name, op_type) of every node of an ONNX graph (weights not loaded)."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, Path)) else model_or_path
    return [(node.name, node.op_type) for node in model.graph.node]


def nodes_matching(nodes: Iterable[tuple[str, str]], patterns: Sequence[str] = (), op_types: Sequence[str] = ()) -> list[str]:
    """Names of nodes whose name matches any regex in `patterns` OR whose op type is in `op_types`."""
    compiled = [re.compile(p) for p in patterns]
    return [name for name, op_type in nodes if op_type in op_types or any(p.search(name) for p in compiled)]


# ------------------------------------------------------------------------------------------ gating

def gate_context(ctx: StepContext, suite: str) -> StepContext:
    """A copy of `ctx` that gates on `suite`. The copy shares `ctx.references`, so the suite's PyTorch
    reference is computed once and reused by every round and step of the run."""
    if suite == ctx.suite:
        return ctx
    return replace(ctx, suite=suite)


def _gate_view(artifact: Artifact) -> Artifact:
    """The artifact as the validator should run it. A QDQ/fp16 ONNX made for a runtime the validator has
    no runner for (target "trt": TensorRT explicit-quantization input) is still an ONNX graph, so it is
    gated by ONNX Runtime on CPU under an "onnx" id; facts["gate_runtime"] says so."""
    from evsam_export.runners import RUNTIME_OF_TARGET

    if artifact.target in RUNTIME_OF_TARGET or not artifact.path.endswith(".onnx"):
        return artifact
    return replace(artifact, target="onnx", id=artifact_id(artifact.component, "onnx", artifact.precision))


def gate_candidate(ctx: StepContext, artifact: Artifact, suite: str = GATE_SUITE) -> Verdict:
    """Run the parity gate on one candidate; judge only the candidate's own stages."""
    started = time.perf_counter()
    view = _gate_view(artifact)
    report = gate_context(ctx, suite).gate([view], only_candidates=True)
    own = [s for s in report.stages if s.artifact == view.id]
    # Only deciding gates count: with ground truth in the gate suite, the mIoU drop decides for the candidate
    # and its agreement gates are advisory (parity.task).
    others_failed = [g for s in report.stages if s.artifact != view.id for g in s.gates if g.failed]
    failed = [
        {"stage": g.stage, "kind": g.kind, "metric": g.metric, "value": g.value, "threshold": g.threshold, "op": g.op}
        for s in own for g in s.gates if g.failed
    ]
    task = {kind: round(entry["drop_points"], 3) for s in own if s.stage == "task" for kind, entry in s.per_kind.items()}
    advisory = [g.line() for s in own for g in s.gates if not g.decides and not g.passed]
    notes = []
    if view.id in report.unavailable:
        notes.append(f"no runner: {report.unavailable[view.id]}")
    elif not own:
        notes.append("the gate produced no stage for the candidate")
    if others_failed:
        notes.append(f"{len(others_failed)} gate(s) of the fp32 reference artifacts failed too (first: {others_failed[0].line()})")
    worst = max(failed, key=_shortfall) if failed else None
    return Verdict(
        passed=bool(own) and not failed and view.id not in report.unavailable,
        failed=failed,
        worst=worst,
        note="; ".join(notes),
        seconds=round(time.perf_counter() - started, 1),
        task_drop_points=task or None,
        advisory_misses=advisory,
    )


def _shortfall(gate: dict) -> float:
    value, threshold = gate["value"], gate["threshold"]
    if not isinstance(value, (int, float)) or value != value:  # NaN
        return float("inf")
    scale = max(abs(threshold), 1e-12)
    return (threshold - value) / scale if gate["op"] == ">=" else (value - threshold) / scale


def gate_line(gate: dict | None) -> str:
    if gate is None:
        return "-"
    return f"{gate['stage']}/{gate['kind']} {gate['metric']} = {gate['value']:.4g} (needs {gate['op']} {gate['threshold']:g})"


# ------------------------------------------------------------------------------------------ the loop


def build_with_fallback(
    ctx: StepContext,
    parent: Artifact,
    candidates_fn: Callable[[tuple[FallbackGroup, ...]], Artifact],
    max_rounds: int,
    groups: Sequence[FallbackGroup] = (),
    nodes: Sequence[tuple[str, str]] | None = None,
    suite: str = GATE_SUITE,
    gate: Callable[[StepContext, Artifact], Verdict] | None = None,
) -> Artifact:
    """Build with `candidates_fn(kept)`, gate, and fall back group by group until a candidate passes.

    Round 0 keeps no extra group at fp32; round k keeps groups[:k] (cumulative, in the given order, which
    must be most-sensitive first). Groups matching none of `nodes` (when given) are skipped without a
    round. At most `max_rounds` gates are run (max_rounds=1: gate once, no fallback). Returns the passing
    candidate, or the last one built with facts["gate_passed"] = False and facts["gate_note"] explaining.
    `candidates_fn` must write a fresh file each call (the same path may be overwritten) and return its
    manifest entry; the entry is re-hashed by the caller's ctx.new_artifact, so facts added here are the
    only change made to it."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    gate = gate or (lambda c, a: gate_candidate(c, a, suite))
    usable = []
    skipped = []
    for group in groups:
        if nodes is not None and not group.select(nodes):
            skipped.append(group.name)
        else:
            usable.append(group)
    history: list[dict] = []
    artifact = None
    verdict = None
    rounds = min(max_rounds, len(usable) + 1)
    began = time.perf_counter()
    for round_index in range(rounds):
        kept = tuple(usable[:round_index])
        started = time.perf_counter()
        artifact = candidates_fn(kept)
        built_s = time.perf_counter() - started
        verdict = gate(ctx, artifact)
        history.append({
            "round": round_index,
            "kept_fp32_groups": [g.name for g in kept],
            "added_group": kept[-1].name if kept else None,
            "added_reason": kept[-1].reason if kept else None,
            "kept_fp32_nodes": len({n for g in kept for n in g.select(nodes)}) if nodes is not None else None,
            "passed": verdict.passed,
            "failed_gates": verdict.failed,
            "worst_gate": gate_line(verdict.worst) if verdict.worst else None,
            "note": verdict.note or None,
            "task_drop_points": verdict.task_drop_points,
            "advisory_misses": len(verdict.advisory_misses) or None,
            "build_s": round(built_s, 1),
            "gate_s": verdict.seconds,
        })
        ctx.reporter.line(
            f"  {artifact.id} round {round_index}: fp32 groups {[g.name for g in kept] or 'none'} -> "
            + ("gate passed" if verdict.passed else f"gate failed ({gate_line(verdict.worst) if verdict.worst else verdict.note})")
            + progress_note(time.perf_counter() - began, round_index + 1, 0 if verdict.passed else rounds - round_index - 1)
        )
        if verdict.passed:
            break
    assert artifact is not None and verdict is not None
    facts = dict(artifact.facts)
    facts["gate_suite"] = suite
    facts["gate_passed"] = verdict.passed
    facts["fallback"] = history
    if skipped:
        facts["fallback_groups_skipped"] = skipped  # matched no node of this graph
    if not verdict.passed:
        left = len(usable) - (len(history) - 1)
        why = "no fallback group left" if left <= 0 else f"stopped at max_rounds={max_rounds} with {left} group(s) untried"
        facts["gate_note"] = (
            f"{artifact.id} failed the {suite} gate in all {len(history)} round(s) ({why}); "
            f"worst in the last round: {gate_line(verdict.worst) if verdict.worst else verdict.note}. "
            "The artifact is kept for inspection, not as a passing build."
        )
    return replace(artifact, facts=facts)


def progress_note(elapsed: float, done: int, left: int) -> str:
    """' [312 s so far; at most 3 more rounds, about 290 s]': the elapsed time of a round loop and, from the mean
    round so far, what the rounds still allowed would cost (an upper bound: the loop stops at the first pass)."""
    note = f" [{elapsed:.0f} s so far"
    if left > 0:
        note += f"; at most {left} more round{'s' if left > 1 else ''}, about {elapsed / max(done, 1) * left:.0f} s"
    return note + "]"


def summary_outcome(facts: dict) -> tuple[str, str]:
    """(status, note) for an artifact's summary line: what the build-time gate and the fallback did, so a
    precision kept higher or a build gate that never passed shows on the line, not only in the manifest.
    Status "warn" when the gate never passed or a lower precision gained nothing (the fp32 parent ships:
    facts["lowering"]); ("ok", "") for artifacts built without a gate."""
    lowering = facts.get("lowering")
    if isinstance(lowering, dict):
        return "warn", lowering["line"]
    history = facts.get("fallback")
    if not history:
        return "ok", ""
    last = history[-1]
    rounds = len(history)
    kept = last["kept_fp32_groups"]
    share = _quantized_share(facts)
    if facts.get("fallback_method") == "rank":
        return _ranked_outcome(facts, history, share)
    if facts.get("gate_passed"):
        if not kept:
            return "ok", "build gate passed in round 0"
        # What the round before missed says, with its number, why the fallback had to go this far.
        missed = history[-2].get("worst_gate") if rounds > 1 else None
        return "ok", (f"build gate passed in round {last['round']}, kept higher precision: {', '.join(kept)}" + share
                      + (f"; round {history[-2]['round']} missed {missed}" if missed else ""))
    worst = last.get("worst_gate") or last.get("note") or "no gate verdict"
    return "warn", (f"BUILD GATE FAILED in all {rounds} round(s) (last: {worst}){share}; "
                    "kept for inspection, only a passing release gate accepts it")


def _ranked_outcome(facts: dict, history: list[dict], share: str) -> tuple[str, str]:
    """The summary of a ranked search: how many regions went back to fp32, the first of them, the census."""
    rounds = len(history)
    if facts.get("gate_passed"):
        kept = facts.get("kept_fp32_regions") or []
        if not kept:
            return "ok", f"build gate passed in round 0{share}"
        of = history[0]["of_regions"]
        named = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        return "ok", f"build gate passed after {rounds} round(s), kept {len(kept)} of {of} ranked regions fp32 ({named}){share}"
    return "warn", f"BUILD GATE FAILED in all {rounds} round(s) (last: {history[-1].get('worst_gate') or history[-1].get('note')}){share}"


def _quantized_share(facts: dict) -> str:
    """' (56 of 69 Conv INT8)' for a QDQ artifact, ' (3 FakeQuantize ops)' for an NNCF IR: after a fallback,
    how much is still INT8, so a build that passed by reverting nearly everything says so on its summary
    line (with synthetic weights OpenVINO l1 passes its build gate with 3 FakeQuantize ops left)."""
    if isinstance(facts.get("lowered"), dict) and facts["lowered"].get("text"):  # precision/lowered.py's census
        return f" ({facts['lowered']['text']})"
    qdq = facts.get("qdq")
    if not isinstance(qdq, dict) or "quantized" not in qdq:
        count = facts.get("fake_quantize")
        return f" ({count} FakeQuantize ops)" if isinstance(count, int) else ""
    quantized, kept_float = qdq["quantized"], qdq.get("float", {})
    ops = facts.get("op_types_to_quantize") or sorted(set(quantized) | set(kept_float))
    parts = [f"{quantized.get(op, 0)} of {quantized.get(op, 0) + kept_float.get(op, 0)} {op}"
             for op in ops if quantized.get(op, 0) + kept_float.get(op, 0)]
    return f" ({', '.join(parts)} INT8)" if parts else ""


# ------------------------------------------------------------------------------------------ ranking and search

# A small region: the ops of one block (".../op_list.3/", the neck's ".../input_ops.2/"); an op outside any is its own.
_BLOCK = re.compile(r"^(.*?/(?:op_list|input_ops|output_ops)\.\d+)/")


@dataclass(frozen=True)
class RankedUnit:
    """A small region of quantized ops and its measured effect: the relative noise power (error power over signal
    power, over the probe's outputs) with only this region quantized and everything else fp32."""

    name: str
    ops: tuple[str, ...]
    noise: float

    @property
    def snr_db(self) -> float:
        import math

        return math.inf if self.noise <= 0 else -10.0 * math.log10(self.noise)

    def to_json(self) -> dict:
        return {"region": self.name, "ops": len(self.ops), "alone_snr_db": round(self.snr_db, 2)}


def units_of(ops: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The quantized ops grouped into small regions (blocks), in graph order."""
    grouped: dict[str, list[str]] = {}
    for name in ops:
        match = _BLOCK.match(name)
        grouped.setdefault(match.group(1) if match else name, []).append(name)
    return [(unit, tuple(names)) for unit, names in grouped.items()]


def relative_noise(reference: dict, test: dict) -> float:
    """Error power over signal power, averaged over the float outputs both dicts hold."""
    import numpy as np

    ratios = []
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        if name not in test or ref.dtype.kind != "f" or not ref.size:
            continue
        error = np.asarray(test[name], dtype=np.float64) - ref
        if not np.all(np.isfinite(error)):
            return float("inf")
        ratios.append(float(np.mean(error**2) / max(float(np.mean(ref**2)), 1e-30)))
    return float(np.mean(ratios)) if ratios else 0.0


def rank_units(ctx: StepContext, label: str, ops: Sequence[str], run_with_only: Callable[[set[str]], dict],
               reference: dict) -> list[RankedUnit]:
    """Every small region of `ops` measured alone (`run_with_only(names)`: the outputs with only those ops
    quantized), most harmful first."""
    units = units_of(ops)
    ranked = []
    started = time.perf_counter()
    with ctx.reporter.step(f"{label}: ranking {len(units)} regions of {len(ops)} quantized ops, each quantized alone"):
        for name, names in units:
            ranked.append(RankedUnit(name, names, relative_noise(reference, run_with_only(set(names)))))
    ranked.sort(key=lambda unit: -unit.noise)
    ctx.reporter.line(f"  {label}: ranked in {time.perf_counter() - started:.0f} s; most harmful alone: "
                      + ", ".join(f"{u.name} {u.snr_db:.1f} dB" for u in ranked[:3]))
    return ranked


def predicted_snr_db(ranked: Sequence[RankedUnit], kept: int) -> float:
    """The SNR with the `kept` most harmful regions in fp32, if the regions' noise powers add."""
    import math

    noise = sum(unit.noise for unit in ranked[kept:])
    return math.inf if noise <= 0 else -10.0 * math.log10(noise)


def first_probe(ranked: Sequence[RankedUnit], target_snr_db: float) -> int:
    """The fewest regions to keep in fp32 whose predicted SNR reaches `target_snr_db` (at least 1, at most all
    but one)."""
    for kept in range(1, len(ranked)):
        if predicted_snr_db(ranked, kept) >= target_snr_db:
            return kept
    return max(len(ranked) - 1, 1)


def build_with_ranking(
    ctx: StepContext,
    parent: Artifact,
    candidates_fn: Callable[[frozenset], Artifact],
    ranking: Callable[[], Sequence[RankedUnit]],
    max_rounds: int,
    target_snr_db: float,
    suite: str = GATE_SUITE,
    gate: Callable[[StepContext, Artifact], Verdict] | None = None,
    release_suite: str | None = None,
    release_gate: Callable[[StepContext, Artifact], Verdict] | None = None,
) -> Artifact:
    """Gate the candidate with every region quantized; while it fails, search how many of the most harmful
    regions (`ranking()`, measured only once round 0 failed) to keep in fp32: the first probe is the fewest whose
    predicted SNR reaches `target_snr_db`, then bisection between the largest count that failed and the smallest
    that passed (all regions fp32 counts as passing and is never built: that is the fp32 parent).
    `candidates_fn(kept_ops)` writes the artifact with those ops in fp32.

    The smallest count the build suite passes sits on that suite's edge, so with a `release_suite` (the recipe's
    own, larger suite; ignored when it is `suite`) that candidate is gated on it once more; if it fails there, the search goes on above it
    with the release suite as the gate. Returns the passing candidate with the fewest regions kept (rebuilt when
    a later round overwrote it), or the last one with facts["gate_passed"] = False and facts["error_carriers"]:
    the regions that carry the error and their measured effect."""
    gate = gate or (lambda c, a: gate_candidate(c, a, suite))
    if release_suite == suite:  # the recipe validates on its build suite: nothing to confirm
        release_suite = None
    if release_suite is not None and release_gate is None:
        release_gate = lambda c, a: gate_candidate(c, a, release_suite)  # noqa: E731
    confirmed = release_gate is None
    gated_on = suite
    history: list[dict] = []
    began = time.perf_counter()
    ranked: Sequence[RankedUnit] = []
    total = None  # known once ranked
    lo, hi, best = -1, None, None  # lo: most regions kept that failed; hi: fewest that passed
    probe = 0
    artifact = verdict = None
    # Release-suite rounds come on top of max_rounds: at most one confirmation and a bisection above it.
    extra_rounds = 0 if confirmed else 6
    while len(history) < max_rounds + extra_rounds and probe is not None:
        kept = frozenset(op for unit in ranked[:probe] for op in unit.ops)
        started = time.perf_counter()
        if artifact is None or history[-1]["kept_fp32_regions"] != probe:  # a confirmation gates the last candidate again
            artifact = candidates_fn(kept)
        built_s = time.perf_counter() - started
        verdict = gate(ctx, artifact)
        history.append({
            "round": len(history), "suite": gated_on, "kept_fp32_regions": probe, "of_regions": total,
            "kept_fp32_groups": [unit.name for unit in ranked[:probe]], "kept_fp32_nodes": len(kept),
            "predicted_snr_db": round(predicted_snr_db(ranked, probe), 2) if ranked else None,
            "passed": verdict.passed, "failed_gates": verdict.failed,
            "worst_gate": gate_line(verdict.worst) if verdict.worst else None, "note": verdict.note or None,
            "task_drop_points": verdict.task_drop_points, "advisory_misses": len(verdict.advisory_misses) or None,
            "build_s": round(built_s, 1), "gate_s": verdict.seconds,
        })
        if verdict.passed:
            hi, best = probe, dict(history[-1])
        else:
            lo = probe
        if total is None and not verdict.passed and len(history) < max_rounds + extra_rounds:  # rank only when a round failed
            ranked = list(ranking())
            total = hi = len(ranked)
            history[-1]["of_regions"] = total
        if gated_on != suite and not confirmed:  # this round gated the build suite's answer on the release suite
            confirmed = True
            if not verdict.passed:  # search on above it, judged by the release suite from now on
                lo, hi, best = probe, total, None
        following = None
        if total is not None and hi - lo > 1 and (gated_on != suite or len(history) < max_rounds):
            following = first_probe(ranked, target_snr_db) if lo == 0 and hi == total else (lo + hi) // 2
            following = min(max(following, lo + 1), hi - 1)
        if following is None and best is not None and not confirmed:
            following = best["kept_fp32_regions"]  # the same candidate, on the release suite
        left = 0 if following is None else 1 if total is None else max(1, (hi - lo - 1).bit_length())
        ctx.reporter.line(
            f"  {artifact.id} round {len(history) - 1}: "
            + (f"{probe} of {total} regions fp32 -> " if probe else "every region INT8 -> ")
            + (f"{gated_on} " if gated_on != suite else "")
            + ("gate passed" if verdict.passed else f"gate failed ({gate_line(verdict.worst) if verdict.worst else verdict.note})")
            + progress_note(time.perf_counter() - began, len(history), min(left, max_rounds + extra_rounds - len(history)))
        )
        if following is not None and not confirmed and following == (best or {}).get("kept_fp32_regions"):
            gate, gated_on = release_gate, release_suite or "release"
        probe = following
    assert artifact is not None and verdict is not None
    if best is not None and best["kept_fp32_regions"] != history[-1]["kept_fp32_regions"]:
        with ctx.reporter.step(f"{artifact.component}: the passing candidate of round {best['round']} again"):
            artifact = candidates_fn(frozenset(op for unit in ranked[:best["kept_fp32_regions"]] for op in unit.ops))
    facts = dict(artifact.facts)
    facts.update(gate_suite=best["suite"] if best is not None else gated_on, gate_passed=best is not None, fallback=history,
                 fallback_method="rank", ranking=[unit.to_json() for unit in ranked])
    if release_gate is not None:  # the suite the search started on; gate_suite is the one the shipped candidate passed last
        facts["build_suite"] = suite
    if best is not None:
        facts["kept_fp32_regions"] = best["kept_fp32_groups"]
    else:
        carriers = [unit.to_json() for unit in ranked[:5]]
        facts["error_carriers"] = carriers
        facts["gate_note"] = (
            f"{artifact.id} failed the {suite} gate in all {len(history)} round(s) (at most {max(lo, 0)} of {total} regions "
            f"fp32 tried); worst in the last round: {gate_line(verdict.worst) if verdict.worst else verdict.note}. "
            "The error is carried by " + ", ".join(f"{c['region']} ({c['alone_snr_db']} dB alone)" for c in carriers))
    return replace(artifact, facts=facts)
