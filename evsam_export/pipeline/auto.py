"""`evsam-export run cpu-auto`: the best gated artifact pair for this machine.

Every candidate recipe this machine can build (its runtime imports, its CPU has the flags its precision
needs) runs as usual, with its own build and release gates, through the step cache, so candidates share the
fp32 export. The deployable artifacts of the candidates whose release gate passed go into one folder, are
timed alternated in one process (the encoder on one image; the decoder on one click, fetching what the
Predictor fetches), and the fastest encoder and fastest decoder are recommended. That pair may come from two
candidates, so it is gated end to end itself before it is written as `recommended` in the manifest; if it
fails, the next pairs by summed latency are tried. The Predictor runs the recommended pair by default.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export.errors import EvsamError, RecipeError
from evsam_export.pipeline.recipe import apply_overrides, check_table, load_recipe, resolve_recipe_path
from evsam_export.progress import Reporter

AUTO_SECTION = "auto"
AUTO_JSON = "auto.json"
AUTO_MD = "auto.md"
CANDIDATES_DIR = "candidates"
# Pairs tried end to end, fastest first, before the run gives up recommending one.
MAX_PAIRS_TRIED = 3


@dataclass(frozen=True)
class _AutoRecipeSection:
    name: str
    description: str = ""


@dataclass(frozen=True)
class _AutoSection:
    candidates: list
    runs: int = 10
    warmup: int = 2


@dataclass(frozen=True)
class _AutoValidateSection:
    suite: str = "default"


@dataclass(frozen=True)
class AutoRecipe:
    name: str
    description: str
    path: Path
    candidates: tuple[str, ...]
    runs: int
    warmup: int
    suite: str
    candidate_overrides: tuple[str, ...]  # --set values handed to every candidate (export, precision, target, validate)
    recipes: tuple = ()  # the candidates' Recipes, loaded (and checked) with those overrides


def is_auto_recipe(name_or_path: str | Path) -> bool:
    import tomllib

    try:
        return AUTO_SECTION in tomllib.loads(resolve_recipe_path(name_or_path).read_text())
    except tomllib.TOMLDecodeError:
        return False  # load_recipe reports it


def load_auto_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> AutoRecipe:
    """An auto recipe: [recipe] name/description, [auto] candidates/runs/warmup, [validate] suite; every other
    --set goes to the candidates, and each candidate is loaded now, so a bad one fails before any build."""
    import tomllib

    path = resolve_recipe_path(name_or_path)
    source = path.name
    own = [o for o in overrides or [] if o.split("=", 1)[0].split(".", 1)[0] in ("recipe", AUTO_SECTION)]
    document = apply_overrides(tomllib.loads(path.read_text()), own)
    for key in document:
        if key not in ("recipe", AUTO_SECTION, "validate"):
            raise RecipeError(f"{source}: [{key}]: an auto recipe has only [recipe], [auto] and [validate]",
                              hint="put build settings in the candidate recipes, or pass them with --set")
    head = check_table(document.get("recipe", {}), _AutoRecipeSection, "recipe", source)
    if "name" not in head:
        raise RecipeError(f"{source}: [recipe] name: missing")
    auto = check_table(document[AUTO_SECTION], _AutoSection, AUTO_SECTION, source)
    candidates = auto.get("candidates")
    if not candidates or not all(isinstance(c, str) for c in candidates):
        raise RecipeError(f"{source}: [auto] candidates: expected a non-empty list of recipe names")
    for key in ("runs", "warmup"):
        low = 1 if key == "runs" else 0
        if auto.get(key, low) < low:
            raise RecipeError(f"{source}: [auto] {key}: must be at least {low}, got {auto[key]}")
    validate = check_table(document.get("validate", {}), _AutoValidateSection, "validate", source)
    suite = validate.get("suite", "default")
    passed_on = tuple(o for o in overrides or [] if o not in own)
    if not any(o.startswith("validate.suite=") for o in passed_on):
        passed_on += (f"validate.suite={suite}",)
    from evsam_export.targets.registry import get_target

    loaded = []
    for candidate in candidates:
        recipe = load_recipe(candidate, list(passed_on))
        loaded.append(recipe)
        if AUTO_SECTION in recipe.document:
            raise RecipeError(f"{source}: [auto] candidates: {candidate} is itself an auto recipe")
        if get_target(recipe.target).device != "cpu":
            raise RecipeError(f"{source}: [auto] candidates: {candidate} builds for {recipe.target}, not a CPU target",
                              hint="cpu-auto compares CPU runtimes on this machine")
        if not recipe.validate:
            raise RecipeError(f"{source}: [auto] candidates: {candidate} has validation off",
                              hint="only gated artifacts can be recommended")
    return AutoRecipe(head["name"], head.get("description", ""), path, tuple(candidates), auto.get("runs", 10),
                      auto.get("warmup", 2), suite, passed_on, tuple(loaded))


@dataclass
class Candidate:
    recipe: str
    status: str = "planned"  # skipped | failed | passed | error | no gain (its lower precision shipped fp32)
    reason: str = ""
    seconds: float = 0.0
    artifacts: list[str] = field(default_factory=list)  # its deployable artifacts (the target steps' outputs)


@dataclass
class AutoResult:
    output: Path
    candidates: list[Candidate]
    timings: dict  # artifact id -> {"workload": median ms}
    recommended: dict
    passed: bool
    report: object = None  # the recommended pair's end-to-end parity report


def support_of(recipe) -> str:
    """Why this machine cannot build `recipe` ('' when it can)."""
    from evsam_export.environment import cpu_flags
    from evsam_export.runners import availability_of
    from evsam_export.targets.registry import get_target, missing_cpu_features

    target = get_target(recipe.target)
    availability = availability_of(target.runtime)
    if not availability.available:
        return f"{target.runtime} unavailable: {availability.reason}"
    missing = missing_cpu_features(target, (recipe.encoder_precision, recipe.decoder_precision), cpu_flags())
    if missing:
        precision, needs = next(iter(missing.items()))
        return f"{precision} needs {' or '.join(needs)}, which this CPU lacks"
    return ""


def deployable_artifacts(artifacts, target: str) -> list[str]:
    """Ids of a built recipe's artifacts for its target, in manifest order: what the target step wrote, and what
    a precision step already wrote for that runtime (ORT's QDQ INT8 encoder, which the ort step keeps as is)."""
    return [artifact.id for artifact in artifacts if artifact.target == target]


def _merge_candidate(staging: Path, manifest, built: Path, built_manifest, name: str) -> None:
    """Copy a candidate folder's artifacts (and its parity reports) into the auto folder; an artifact two
    candidates share must be the same bytes, since both were gated as that file."""
    if manifest.model != built_manifest.model:
        raise RecipeError(f"candidate {name} exports a different model contract than the first candidate",
                          hint="auto candidates must share their [export] settings")
    for artifact in built_manifest.artifacts:
        known = next((a for a in manifest.artifacts if a.id == artifact.id), None)
        if known is not None:
            if known.sha256 != artifact.sha256:
                raise RecipeError(f"candidates built two different {artifact.id} files",
                                  hint="run with the step cache on, so candidates share the export")
            continue
        for relative in [artifact.path] + list(artifact.extra_files):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built / relative, staging / relative)
        manifest.add(artifact)
    reports = staging / CANDIDATES_DIR / name
    reports.mkdir(parents=True, exist_ok=True)
    for report_name in ("parity.json", "parity.md", "junit.xml"):
        if (built / report_name).is_file():
            shutil.copy2(built / report_name, reports / report_name)


def _time_artifacts(folder: Path, manifest, ids: list[str], runs: int, warmup: int, threads: int | None, reporter) -> dict:
    """Median ms per artifact, alternated in this process: encoders on one image, decoders on one click and on
    16 boxes, fetching the low-res outputs the Predictor fetches."""
    from evsam_export import contract
    from evsam_export.bench.timing import alternate_calls, decoder_feed, encoder_feed, latency_summary
    from evsam_export.runners import runner_for_artifact

    runners = {i: runner_for_artifact(folder, manifest.artifact(i), threads=threads).load() for i in ids}
    timings: dict[str, dict] = {i: {} for i in ids}
    try:
        encoders = [i for i in ids if manifest.artifact(i).component == "encoder"]
        decoders = [i for i in ids if manifest.artifact(i).component == "decoder"]
        wanted = (contract.LOW_RES_MASKS, contract.IOU_PREDICTIONS)
        workloads = [("encoder", "1 image", encoders, lambda r: encoder_feed(manifest.encoder_size, 1), None),
                     ("decoder", "1 click", decoders, lambda r: decoder_feed(r.inputs, 1, False), wanted),
                     ("decoder", "16 boxes", decoders, lambda r: decoder_feed(r.inputs, 16, True), wanted)]
        for component, workload, subjects, feed_for, outputs in workloads:
            if not subjects:
                continue
            with reporter.step(f"{component} latency, {workload}: {runs} alternated runs over {len(subjects)} artifacts"):
                calls = {i: functools.partial(runners[i].infer, feed_for(runners[i]), outputs=outputs) for i in subjects}
                times = alternate_calls(calls, runs, warmup)
            for artifact_id, values in times.items():
                timings[artifact_id][workload] = round(latency_summary(values)["median"], 2)
    finally:
        for runner in runners.values():
            runner.close()
    return timings


def _pairs_by_speed(timings: dict, manifest) -> list[tuple[str, str]]:
    encoders = [i for i in timings if manifest.artifact(i).component == "encoder"]
    decoders = [i for i in timings if manifest.artifact(i).component == "decoder"]
    pairs = [(e, d) for e in encoders for d in decoders]
    return sorted(pairs, key=lambda p: (timings[p[0]]["1 image"] + timings[p[1]]["1 click"], p))


def run_auto(auto: AutoRecipe, variant_name: str, output: Path, checkpoint: str | None = None, force: bool = False,
             reporter: Reporter | None = None, cache=None, command: str = "", threads: int | None = None) -> AutoResult:
    from evsam_export.output import check_output_folder, staged_folder
    from evsam_export.parity.report import write_reports
    from evsam_export.parity.suites import load_suite
    from evsam_export.parity.validate import validate_folder
    from evsam_export.pipeline.cache import StepCache
    from evsam_export.pipeline.runner import run_recipe

    reporter = reporter or Reporter()
    cache = cache or StepCache()
    output = check_output_folder(Path(output), force)
    candidates = [Candidate(name) for name in auto.candidates]
    recipes = {}
    for candidate, recipe in zip(candidates, auto.recipes):
        candidate.reason = support_of(recipe)
        if candidate.reason:
            candidate.status = "skipped"
            reporter.line(f"skip {candidate.recipe}: {candidate.reason}")
        else:
            recipes[candidate.recipe] = recipe
    if not recipes:
        raise RecipeError(f"{auto.name}: this machine can build none of its candidates",
                          hint="; ".join(f"{c.recipe}: {c.reason}" for c in candidates))
    manifest, report, recommended, timings = None, None, {}, {}
    with staged_folder(output, force) as staging, tempfile.TemporaryDirectory(prefix=".auto-", dir=staging.parent) as scratch:
        # the candidates' own summary lines would name scratch folders: they get a reporter whose summary is dropped
        inner = Reporter(interactive=reporter.interactive, stream=reporter.stream, quiet=reporter.quiet)
        for candidate in candidates:
            if candidate.recipe not in recipes:
                continue
            reporter.line(f"candidate {candidate.recipe}")
            started = time.perf_counter()
            built = Path(scratch) / candidate.recipe
            try:
                result = run_recipe(recipes[candidate.recipe], variant_name, built, checkpoint, True, False, inner, cache, command, threads)
            except EvsamError as exc:  # one candidate that cannot be built does not stop the comparison
                candidate.status, candidate.reason = "error", exc.one_line()
                reporter.line(f"{candidate.recipe}: {candidate.reason}")
                continue
            finally:
                candidate.seconds = time.perf_counter() - started
            target = recipes[candidate.recipe].target
            candidate.artifacts = deployable_artifacts(result.manifest.artifacts, target)
            candidate.status = "passed" if result.passed else "failed"
            if not result.passed:
                failed = getattr(result.report, "failed_gates", [])
                candidate.reason = f"release gate failed ({len(failed)} gates; see {CANDIDATES_DIR}/{candidate.recipe}/parity.md)"
            if manifest is None:  # the first candidate's model facts and environment; artifacts merged below
                manifest = copy.deepcopy(result.manifest)
                manifest.artifacts, manifest.history = [], []
            if result.declined:  # its lower precision gained nothing: its fp32 artifacts are another candidate's job
                candidate.status, candidate.reason, candidate.artifacts = "no gain", "; ".join(result.declined), []
                reporter.line(f"{candidate.recipe}: {candidate.reason}")
                continue
            _merge_candidate(staging, manifest, built, result.manifest, candidate.recipe)
        gated = list(dict.fromkeys(i for c in candidates if c.status == "passed" for i in c.artifacts))
        if manifest is None or not gated:
            raise RecipeError(f"{auto.name}: no candidate passed its gates, nothing to recommend",
                              hint="; ".join(f"{c.recipe}: {c.status} {c.reason}".strip() for c in candidates))
        timings = _time_artifacts(staging, manifest, gated, auto.runs, auto.warmup, threads, reporter)
        manifest.write(staging)
        tried = []
        for encoder_id, decoder_id in _pairs_by_speed(timings, manifest)[:MAX_PAIRS_TRIED]:
            with reporter.step(f"end-to-end gate of the pair {encoder_id} + {decoder_id}"):
                report = validate_folder(staging, load_suite(auto.suite), artifacts=[encoder_id, decoder_id],
                                         reporter=reporter, threads=threads)
            tried.append({"encoder": encoder_id, "decoder": decoder_id, "passed": report.passed})
            if report.passed:
                recommended = {"encoder": encoder_id, "decoder": decoder_id, "suite": auto.suite,
                               "reason": "fastest gated pair on this machine (auto.md)", "cpu": manifest.environment.get("cpu"),
                               "cpu_flags": manifest.environment.get("cpu_flags")}
                break
        if report is not None:
            write_reports(report, staging)
        manifest.recommended = recommended
        decision = _decision(auto, candidates, timings, recommended, tried, manifest)
        (staging / AUTO_JSON).write_text(json.dumps(decision, indent=1) + "\n")
        (staging / AUTO_MD).write_text(decision_markdown(decision) + "\n")
        manifest.history.append({"command": command, "recipe": auto.name, "candidates": [
            {"recipe": c.recipe, "status": c.status, "reason": c.reason, "artifacts": c.artifacts, "seconds": round(c.seconds, 1)}
            for c in candidates],
            "recommended": recommended})
        manifest.write(staging)
    built_by = {}
    for candidate in candidates:
        for artifact_id in candidate.artifacts:
            built_by.setdefault(artifact_id, []).append(candidate)
    for artifact_id, makers in built_by.items():
        artifact = manifest.artifact(artifact_id)
        role = "RECOMMENDED" if artifact_id in (recommended.get("encoder"), recommended.get("decoder")) else ""
        speed = ", ".join(f"{w} {ms:.1f} ms" for w, ms in timings.get(artifact_id, {}).items())
        gate = ", ".join(f"{c.recipe} {c.status}" for c in makers)
        note = " · ".join(x for x in (gate, speed, role) if x)
        status = "ok" if artifact_id in gated else "fail"
        reporter.artifact(status, max(c.seconds for c in makers), output / artifact.path, size_bytes=artifact.size_bytes, note=note)
    return AutoResult(output, candidates, timings, recommended, bool(recommended), report)


def _decision(auto, candidates, timings, recommended, tried, manifest) -> dict:
    return {"recipe": auto.name, "variant": manifest.variant, "suite": auto.suite, "runs": auto.runs,
            "machine": {"cpu": manifest.environment.get("cpu"), "cpu_flags": manifest.environment.get("cpu_flags")},
            "candidates": [{"recipe": c.recipe, "status": c.status, "reason": c.reason, "artifacts": c.artifacts,
                            "seconds": round(c.seconds, 1)} for c in candidates],
            "median_ms": timings, "pairs_tried": tried, "recommended": recommended,
            # what each artifact really runs in its lower precision (precision/lowered.py), e.g. "56 of 69 Conv INT8"
            "lowered": {i: a.facts["lowered"]["text"] for i in timings if (a := manifest.artifact(i)).facts.get("lowered")}}


def decision_markdown(decision: dict) -> str:
    """The table the recommendation was made from (printed by `run` and written as auto.md)."""
    recommended = decision["recommended"]
    lines = [f"# {decision['recipe']}: {decision['variant']} on {decision['machine']['cpu']}",
             f"CPU flags: {' '.join(decision['machine']['cpu_flags'] or []) or '-'}; medians of {decision['runs']} alternated runs", "",
             "| candidate | gate | artifact | 1 image ms | 1 click ms | 16 boxes ms | |", "|---|---|---|---:|---:|---:|---|"]
    for candidate in decision["candidates"]:
        ids = candidate["artifacts"] or ["-"]
        for artifact_id in ids:
            ms = decision["median_ms"].get(artifact_id, {})
            cells = [f"{ms[w]:.1f}" if w in ms else "" for w in ("1 image", "1 click", "16 boxes")]
            mark = "recommended" if artifact_id in (recommended.get("encoder"), recommended.get("decoder")) else ""
            gate = candidate["status"] + (f": {candidate['reason']}" if candidate["reason"] else "")
            held = decision.get("lowered", {}).get(artifact_id)
            shown = f"{artifact_id} ({held})" if held else artifact_id
            lines.append(f"| {candidate['recipe']} | {gate} | {shown} | {' | '.join(cells)} | {mark} |")
    lines.append("")
    for pair in decision["pairs_tried"]:
        lines.append(f"- end-to-end gate {pair['encoder']} + {pair['decoder']}: {'passed' if pair['passed'] else 'FAILED'}")
    if recommended:
        lines.append(f"\nRecommended: **{recommended['encoder']}** + **{recommended['decoder']}**")
    else:
        lines.append("\nNo pair passed its end-to-end gate: nothing is recommended.")
    return "\n".join(lines)
