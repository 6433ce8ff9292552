"""`evsam-export run RECIPE`: export -> precision -> target build -> validate, each step cached.

Every step is content-addressed: its key is the sha256 of the canonical JSON of {step, the step module's
source hash, resolved settings, the parent artifact's sha256 (or the weights' sha256 for export), the
parity suite's content, tool and library versions}. A hit restores the step's files and manifest entries;
a failure is never cached (Olive replays cached failures and cut keys to 8 hex characters and without
library versions: two models once shared an entry — we keep all 64 and everything that can change a
result).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from evsam_export import __version__
from evsam_export.cache import cache_key, module_code_hash
from evsam_export.environment import environment, package_versions
from evsam_export.errors import EvsamError
from evsam_export.manifest import Artifact, Manifest
from evsam_export.pipeline.cache import StepCache
from evsam_export.pipeline.recipe import Recipe, build_settings
from evsam_export.progress import Reporter
from evsam_export.steps.fallback import summary_outcome
from evsam_export.targets.registry import check_cpu_features, get_target

KEY_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnx_graphsurgeon", "openvino", "nncf", "tensorrt", "numpy")


@dataclass
class Step:
    name: str  # export | fp16:encoder | int8:encoder | openvino:encoder | ort:decoder | validate ...
    module: str | None
    component: str | None = None
    parent: str | None = None  # parent artifact id
    settings: dict = field(default_factory=dict)
    precision: str | None = None
    key: str | None = None
    status: str = "planned"  # planned | reused | built | failed | skipped
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache_problem: str | None = None  # why a cached entry was refused and the step rebuilt


def plan_steps(recipe: Recipe) -> list[Step]:
    target = get_target(recipe.target)
    steps = [Step("export", "evsam_export.pipeline.export", settings=dict(recipe.export))]
    for component, precision in (("encoder", recipe.encoder_precision), ("decoder", recipe.decoder_precision)):
        parent = f"{component}.onnx.fp32"
        table = recipe.fp16 if precision == "fp16" else recipe.int8 if precision == "int8" else {}
        module = target.precision_steps.get(precision)
        if module is not None:
            steps.append(Step(f"{precision}:{component}", module.__name__, component, parent, dict(table), precision))
            parent = None  # resolved at run time from the precision step's output
            table = {}
        settings = dict(recipe.target_settings, **table)
        steps.append(Step(f"{target.name}:{component}", target.target_step.__name__, component, parent, settings, precision))
    if recipe.validate:
        settings = {"suite": recipe.suite}
        if recipe.ground_truth is not None:
            settings["ground_truth"] = recipe.ground_truth.to_json()
        steps.append(Step("validate", "evsam_export.parity.validate", settings=settings))
    return steps


def step_payload(step: Step, parent_sha: str | None, versions: dict, suite_hash: str, variant: str, weights_sha: str) -> dict:
    """What a step's cache key is the hash of: its code, settings, tool versions, the suite, and its parent
    artifact (the export step: the variant and weights instead)."""
    payload = {"step": step.name, "module": step.module, "code": module_code_hash(step.module), "settings": step.settings,
               "precision": step.precision, "tool": __version__, "versions": versions, "suite": suite_hash}
    if step.settings.get("calibration_data"):
        from evsam_export.data.coco import AnnotationSet
        from evsam_export.data.images import ImageFolder

        # the files, not only the name: editing the annotations, adding or rewriting an image must rebuild the step
        source = Path(step.settings["calibration_data"]).expanduser()
        payload["calibration_data"] = (AnnotationSet(source) if source.is_file() else ImageFolder(source)).fingerprint()
    if step.precision == "int8":  # INT8 numerics and settings resolved by CPU class (VNNI: saturation fixes)
        from evsam_export.environment import cpu_flags

        payload["cpu_flags"] = cpu_flags()
    if step.component == "decoder":  # the step also builds the split decoder's halves (pipeline/split_lowering.py)
        payload["split_lowering"] = module_code_hash("evsam_export.pipeline.split_lowering")
    if step.module == "evsam_export.targets.tensorrt":
        # an engine belongs to the GPU and TensorRT that built it; a kit to a machine that could not build
        payload["device"] = _tensorrt_device()
    if step.name == "export":
        payload.update(variant=variant, weights=weights_sha)
    else:
        payload["parent"] = parent_sha
    return payload


def _suite_hash(suite: str, ground_truth=None) -> str:
    from evsam_export.parity.suites import load_suite

    return load_suite(suite, ground_truth).fingerprint()


@dataclass
class RunResult:
    output: Path | None
    steps: list[Step]
    manifest: Manifest | None
    passed: bool | None  # parity gate (None: not validated / dry run)
    report: object = None
    # One line per lower-precision step that gained nothing and shipped its fp32 parent (facts["lowering"]):
    # `run` exits with NothingGained's code.
    declined: list[str] = field(default_factory=list)


def _artifact_files(artifact: Artifact) -> list[str]:
    return [artifact.path] + list(artifact.extra_files)


def run_recipe(
    recipe: Recipe,
    variant_name: str,
    output: Path,
    checkpoint: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    cache: StepCache | None = None,
    command: str = "",
    threads: int | None = None,
) -> RunResult:
    from evsam_export.model.checkpoint import load_model, parse_synthetic
    from evsam_export.model.variants import get_variant
    from evsam_export.output import check_output_folder, staged_folder
    from evsam_export.parity.gate import ParityGate
    from evsam_export.pipeline.export import export_components, model_contract
    from evsam_export.realistic import resolve_realistic
    from evsam_export.steps.step import StepContext

    reporter = reporter or Reporter()
    cache = cache or StepCache()
    variant = get_variant(variant_name)
    target = get_target(recipe.target)
    check_cpu_features(target, (recipe.encoder_precision, recipe.decoder_precision), recipe.name)
    target_module = target.target_step if target.hooks else None
    if target_module is not None and not dry_run:  # before any work: a refusal costs nothing
        target_module.preflight(recipe.target_settings)
    output = Path(output) if dry_run else check_output_folder(Path(output), force)
    if not dry_run:
        cache.check_writable()  # before any model work: an unwritable cache would fail only at the first store
    if checkpoint is not None:  # `realistic`: our trained-decoder file (trained on first use, dry run included)
        checkpoint = resolve_realistic(checkpoint, variant)
    weights_sha = _weights_sha(variant, checkpoint)
    versions = {name: version for name, version in package_versions(KEY_PACKAGES).items()}
    suite_hash = _suite_hash(recipe.suite, recipe.ground_truth)
    steps = plan_steps(recipe)
    options = recipe.export_options()

    def key_for(step: Step, parent_sha: str | None) -> str | None:
        if step.name != "export" and parent_sha is None:
            return None
        return cache_key(step_payload(step, parent_sha, versions, suite_hash, variant.name, weights_sha))

    if dry_run:
        return RunResult(None, _dry_run(steps, key_for, cache), None, None)

    manifest = Manifest(
        variant=variant.name,
        encoder_size=variant.encoder_size,
        weights={
            "spec": checkpoint or "synthetic:0",
            "sha256": weights_sha,
            "synthetic_seed": parse_synthetic(checkpoint or "synthetic:0"),
        },
        model=model_contract(variant, options),
        environment=environment(),
        command=command,
    )
    report = None
    with staged_folder(output, force) as staging:
        ctx = StepContext(folder=staging, manifest=manifest, variant=variant, reporter=reporter, suite=recipe.suite, threads=threads,
                          ground_truth=recipe.ground_truth, gating=ParityGate())
        latest: dict[str, str] = {}  # component -> id of its newest artifact
        for step in steps:
            started = time.perf_counter()
            if step.name == "validate":
                report = _validate_step(step, ctx, staging, manifest, suite_hash, cache, reporter, versions)
                step.seconds = time.perf_counter() - started
                continue
            parent_id = step.parent or latest.get(step.component)
            parent = manifest.artifact(parent_id) if parent_id else None
            step.parent = parent_id
            step.key = key_for(step, parent.sha256 if parent else None)
            entry, step.cache_problem = cache.restore(step.key, staging)
            artifacts = _cached_artifacts(step, entry, parent)
            if artifacts is None and entry is not None:
                cache.discard(step.key, staging)  # its files verified, so a store would keep it: drop it first
            if artifacts is not None:
                step.status = "reused"
            else:
                try:
                    with reporter.step(_step_line(step)):
                        artifacts = _run_step(step, ctx, parent, variant, checkpoint, options, load_model, export_components)
                except EvsamError:
                    step.status = "failed"
                    raise
                own = [a for a in artifacts if not _is_parent(a, parent)]  # a parent handed back is the parent step's file
                _store(cache, reporter, step.key, staging, [f for a in own for f in _artifact_files(a)],
                       {"step": step.name, "artifacts": [a.to_json() for a in artifacts]})
                step.status = "built"
            for artifact in artifacts:
                manifest.add(artifact)
                if artifact.component:
                    latest[artifact.component] = artifact.id
            step.outputs = [a.id for a in artifacts]
            step.seconds = time.perf_counter() - started
            if not artifacts:
                step.status = "skipped" if step.status == "built" else step.status
        if target_module is not None:
            target_module.finish(staging, manifest)
        if recipe.apps:
            from evsam_export.apps import write_app_configs

            written = write_app_configs(staging, manifest, recipe.apps, latest["encoder"], latest["decoder"], recipe.name)
            manifest.model["app_configs"] = written
        manifest.history.append({"command": command, "recipe": recipe.name, "steps": [
            {"step": s.name, "status": s.status, "key": s.key, "outputs": s.outputs, "seconds": round(s.seconds, 2)} for s in steps]})
        manifest.write(staging)
    declined = []
    for step in steps:
        for artifact_id in step.outputs:
            artifact = manifest.artifact(artifact_id)
            facts = artifact.facts
            if step.name == "export":  # a later step may have handed this artifact back (facts["lowering"])
                facts = {k: v for k, v in facts.items() if k != "lowering"}
            elif isinstance(facts.get("lowering"), dict):
                declined.append(f"{step.name}: {facts['lowering']['line']}")
            status, outcome = summary_outcome(facts)
            if step.status == "reused" and status == "ok":
                status = "reused"
            note = f"{artifact_id} · {outcome}" if outcome else artifact_id
            if "download_bytes" in artifact.facts:
                from evsam_export.progress import human_size

                download, runtime = human_size(artifact.facts["download_bytes"]), human_size(artifact.facts["runtime_bytes"])
                note += f" · download {download} + runtime {runtime} (shared)"
            if step.cache_problem:
                note += " · rebuilt: its cache entry was bad"
            reporter.artifact(status, step.seconds, output / artifact.path, size_bytes=artifact.size_bytes,  # incl. .bin
                              note=note)
    return RunResult(output, steps, manifest, None if report is None else report.passed, report, declined)


def _is_parent(artifact: Artifact, parent: Artifact | None) -> bool:
    """A step that gained nothing hands its parent back (precision/lowered.py): same id, file and bytes."""
    return parent is not None and (artifact.id, artifact.path, artifact.sha256) == (parent.id, parent.path, parent.sha256)


def _cached_artifacts(step: Step, entry: dict | None, parent: Artifact | None = None) -> list[Artifact] | None:
    """The artifacts a restored entry records, or None (with the reason on the step) when they do not
    parse or do not match the file records the restore verified (a parent handed back has no file record:
    its file is the parent's, already in the folder)."""
    if entry is None:
        return None
    try:
        artifacts = [Artifact.from_json(a) for a in entry["artifacts"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        step.cache_problem = "entry.json has malformed artifact records"
        return None
    for artifact in artifacts:
        record = entry["files"].get(artifact.path)
        if record is None and _is_parent(artifact, parent):
            continue
        if record is None or record["sha256"] != artifact.sha256:
            step.cache_problem = f"{artifact.path}: the artifact record and the file record disagree"
            return None
    return artifacts


def _store(cache: StepCache, reporter, key: str, folder: Path, files: list[str], payload: dict) -> None:
    """Store a step's result; a cache that filled up (or turned read-only) mid-run costs the reuse, not the
    finished work, so it is a warning line instead of an error."""
    from evsam_export.errors import OutputError

    try:
        cache.store(key, folder, files, payload)
    except OutputError as exc:
        reporter.line(f"warning: {exc.one_line()}")


def _step_line(step: Step) -> str:
    if step.cache_problem:
        return f"{step.name} (cache entry {step.key[:16]} refused: {step.cache_problem}; rebuilding it)"
    return step.name


def _tensorrt_device() -> dict:
    from evsam_export.runners import availability_of

    state = availability_of("tensorrt")
    if not state.available:
        return {"tensorrt": None, "reason": state.reason}
    from evsam_export.targets.tensorrt import gpu_properties

    return {"tensorrt": state.version, **gpu_properties()}


def _weights_sha(variant, checkpoint: str | None) -> str:
    from evsam_export.files import sha256_file
    from evsam_export.model.checkpoint import parse_synthetic
    from evsam_export.model.synthetic import state_dict_sha256, synthetic_state_dict

    spec = checkpoint or "synthetic:0"
    seed = parse_synthetic(spec)
    if seed is not None:
        return state_dict_sha256(synthetic_state_dict(variant, seed))
    path = Path(spec).expanduser()
    if not path.is_file():
        from evsam_export.errors import CheckpointError

        raise CheckpointError(f"checkpoint not found: {path}", hint="check the path, or omit --checkpoint to use synthetic weights")
    return sha256_file(path)


def _run_step(step: Step, ctx, parent, variant, checkpoint, options, load_model, export_components) -> list[Artifact]:
    if step.name == "export":
        # no local name for the model: export_components frees it before simplifying (export memory)
        return export_components(load_model(variant, checkpoint)[0], variant, ctx.folder, options, ctx.reporter)
    from evsam_export.pipeline.split_lowering import lower_split_pair

    module = importlib.import_module(step.module)
    settings = build_settings(importlib.import_module(step.module).Settings, step.settings, step.precision)
    built = list(module.build(ctx, parent, settings))
    return built + lower_split_pair(ctx, module, settings, parent, built) if step.component == "decoder" else built


def _validate_step(step: Step, ctx, staging: Path, manifest: Manifest, suite_hash: str, cache: StepCache, reporter, versions):
    from evsam_export.parity.report import write_reports
    from evsam_export.parity.suites import load_suite
    from evsam_export.parity.validate import validate_folder

    manifest.write(staging)
    step.key = validate_key(staging, manifest, suite_hash, versions)
    entry, step.cache_problem = cache.restore(step.key, staging)
    if entry is not None and entry.get("passed") is True:
        step.status = "reused"
        step.outputs = []
        return _CachedReport(True, [])
    if entry is not None:  # only passes are stored, so anything else was edited
        step.cache_problem = "entry.json has no passing verdict"
        cache.discard(step.key, staging)
    if step.cache_problem:
        reporter.line(_step_line(step))
    report = validate_folder(staging, load_suite(step.settings["suite"], ctx.ground_truth), reporter=reporter, threads=ctx.threads)
    write_reports(report, staging)
    pictures = [p.relative_to(staging).as_posix() for p in (staging / "parity").glob("*.png")]
    files = ["parity.json", "parity.md", "junit.xml", "report.html"] + pictures
    if report.passed:  # a failing validation is not cached: it re-runs after the cause is fixed
        _store(cache, reporter, step.key, staging, files, {"step": "validate", "passed": True, "failed": []})
    step.status = "built"
    return report


def validate_key(folder: Path, manifest: Manifest, suite_hash: str, versions: dict) -> str:
    """The validate step's key: over the sha256 of every file it will check, read from disk (not the hashes the
    manifest records), and every artifact's IO contract, which the feeds are built from."""
    from evsam_export.files import sha256_file

    files = {name: sha256_file(folder / name) if (folder / name).is_file() else None  # a missing file fails the validation itself
             for artifact in manifest.artifacts for name in _artifact_files(artifact)}
    return cache_key({"step": "validate", "code": module_code_hash("evsam_export.parity.validate"), "suite": suite_hash,
                     "artifacts": sorted((a.id, a.path, a.to_json()["inputs"], a.to_json()["outputs"]) for a in manifest.artifacts),
                     "files": files, "tool": __version__, "versions": versions})


@dataclass
class _CachedReport:
    passed: bool
    failed: list

    @property
    def failed_gates(self):
        return []


def _dry_run(steps: list[Step], key_for, cache: StepCache) -> list[Step]:
    """Resolve keys as far as cached parents allow; a step after a rebuilt one cannot be known reusable."""
    parent_sha: dict[str, str] = {}
    for step in steps:
        if step.name == "validate":
            step.status = "will run (or reuse if every artifact is unchanged)"
            continue
        parent_id = step.parent or (parent_sha.get(f"latest:{step.component}") if step.component else None)
        sha = parent_sha.get(parent_id) if parent_id else None
        step.parent = parent_id or (f"<output of the previous {step.component} step>" if step.component else "<weights>")
        step.key = key_for(step, sha) if (step.name == "export" or sha) else None
        entry = cache.lookup(step.key) if step.key else None
        step.status = "reuse" if entry else "run"
        if entry:
            for artifact in entry["artifacts"]:
                parent_sha[artifact["id"]] = artifact["sha256"]
                parent_sha[f"latest:{artifact['component']}"] = artifact["id"]
    return steps
