"""Recipes: `recipes/*.toml` validated into a frozen `Recipe` (unknown keys, wrong types and values a step
cannot use refused with the field path), `extends = "other.toml"` for variations, `--set section.key=value`
overrides.

The shipped recipes are package data (evsam_export/recipes, which the top-level recipes/ folder links to),
so a wheel installed anywhere finds them by name."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomllib

from evsam_export.apps import check_app_configs
from evsam_export.errors import RecipeError, UsageError
from evsam_export.steps.settings import SettingValueError

PRECISIONS = ("fp32", "fp16", "int8")
SECTIONS = ("recipe", "export", "precision", "target", "validate", "apps")


def recipes_dir() -> Path:
    """The shipped recipes, wherever evsam_export is installed (an unpacked wheel, editable or a checkout)."""
    return Path(str(resources.files("evsam_export").joinpath("recipes")))


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    target: str
    path: Path
    export: dict  # pipeline.export.ExportOptions fields
    encoder_precision: str
    decoder_precision: str
    fp16: dict = field(default_factory=dict)  # settings of the fp16 step
    int8: dict = field(default_factory=dict)  # settings of the int8 step (ORT QDQ or NNCF)
    target_settings: dict = field(default_factory=dict)
    validate: bool = True
    suite: str = "default"
    ground_truth: object = None  # parity.task.GroundTruth from [validate] annotations, or None
    apps: dict = field(default_factory=dict)  # app config files to write (evsam_export.apps), e.g. {"x_anylabeling": True}
    document: dict = field(default_factory=dict)  # the merged TOML, for --dry-run and the manifest

    def export_options(self):
        from evsam_export.pipeline.export import ExportOptions

        return ExportOptions(**self.export)


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        path = recipes_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.toml")))
        raise RecipeError(f"recipe not found: {name_or_path}", hint=f"shipped recipes: {known}")
    return path


def _read(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path.name}: extends loops back to itself", hint=" -> ".join(p.name for p in chain + (path,)))
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path.name}: not valid TOML ({exc})") from exc
    parent_name = document.pop("extends", None)
    if parent_name is None:
        return document
    if not isinstance(parent_name, str):
        raise RecipeError(f"{path.name}: extends: expected a file name string")
    return _merge(_read(_parent_path(path, parent_name), chain + (path,)), document)


def _parent_path(child: Path, parent_name: str) -> Path:
    """`extends` names a file beside the child recipe, else a shipped recipe (with or without .toml)."""
    file_name = parent_name if parent_name.endswith(".toml") else f"{parent_name}.toml"
    for candidate in (child.parent / parent_name, child.parent / file_name, recipes_dir() / file_name):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.toml")))
    raise RecipeError(f"{child.name}: extends: {parent_name} is neither beside it nor a shipped recipe",
                      hint=f"shipped recipes: {known}")


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """`section.key=value` (value parsed as TOML: 8, true, "x", [1, 2]; bare words are strings)."""
    document = _merge({}, document)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RecipeError(f"--set {item!r}: expected section.key=value", hint="e.g. --set precision.encoder=int8")
        dotted, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        keys = dotted.strip().split(".")
        table = document
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise RecipeError(f"--set {item!r}: {key} is not a table")
        table[keys[-1]] = value
    return document


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation in (typing.Any, object):
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_table(table: dict, settings_cls, where: str, source: str) -> dict:
    """Validate `table` against a frozen Settings dataclass: unknown keys and wrong types refused."""
    if not isinstance(table, dict):
        raise RecipeError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(settings_cls)
    names = {f.name for f in dataclasses.fields(settings_cls)}
    for key, value in table.items():
        if key not in names:
            raise RecipeError(f"{source}: [{where}] {key}: unknown key", hint=f"allowed: {', '.join(sorted(names))}")
        if not _type_ok(value, hints[key]):
            expected = getattr(hints[key], "__name__", hints[key])
            raise RecipeError(f"{source}: [{where}] {key}: expected {expected}, got {type(value).__name__} {value!r}")
    return dict(table)


def _settings_class(module):
    return module.Settings


@dataclass(frozen=True)
class _RecipeSection:
    name: str
    description: str = ""
    target: str = "ort"


@dataclass(frozen=True)
class _PrecisionSection:
    encoder: str = "fp32"
    decoder: str = "fp32"
    fp16: dict | None = None
    int8: dict | None = None


@dataclass(frozen=True)
class _ValidateSection:
    enabled: bool = True
    suite: str = "default"
    # COCO-format ground truth for the release suite and every build gate (parity.task.GroundTruth).
    annotations: str | None = None
    images: str | None = None
    limit: int | None = None
    seed: int = 0
    # mIoU points per prompt kind (one number or {box, point}): lower precisions pass on this drop.
    max_drop: float | dict | None = None


def _ground_truth(validate: dict, source: str):
    """The [validate] annotations as a GroundTruth, checked now (file, images, max_drop), or None."""
    from evsam_export.parity.task_settings import GroundTruth, parse_max_drop

    given = [key for key in ("images", "limit", "seed", "max_drop") if key in validate]
    if validate.get("annotations") is None:
        if given:
            raise RecipeError(f"{source}: [validate] {given[0]}: needs annotations (a COCO-format instances JSON)")
        return None
    try:
        max_drop = parse_max_drop(validate["max_drop"]) if validate.get("max_drop") is not None else None
    except ValueError as exc:
        raise RecipeError(f"{source}: [validate] max_drop: {exc}") from None
    if validate.get("limit") is not None and validate["limit"] < 1:
        raise RecipeError(f"{source}: [validate] limit: {validate['limit']} must be >= 1")
    truth = GroundTruth(validate["annotations"], validate.get("images"), validate.get("limit"), validate.get("seed", 0), max_drop)
    truth.source().load()  # a missing or malformed file is refused when the recipe loads
    return truth


@dataclass(frozen=True)
class _AppsSection:
    x_anylabeling: bool = False  # write x-anylabeling.yaml (X-AnyLabeling custom model, type efficientvit_sam)


def build_settings(settings_cls, values: dict, precision: str | None):
    """A step's Settings as the runner builds it: a step with a `precision` field is told which one."""
    names = {f.name for f in dataclasses.fields(settings_cls)}
    told = {"precision": precision} if "precision" in names and precision is not None else {}
    return settings_cls(**{**values, **told})


def _build_step_settings(target, target_settings: dict, tables: dict, used: set, source: str) -> None:
    """Build every step's Settings once, so a value no step can use is refused now, not after an export.

    A target without its own precision step takes the precision table merged into [target] (as the
    runner does); a refused field is named in the table it came from."""
    target_cls = _settings_class(target.target_step)
    builds = [(target_cls, target_settings, "fp32")]  # (Settings class, values, precision)
    for precision in ("fp16", "int8"):
        if not tables[precision] and precision not in used:
            continue
        module = target.precision_steps.get(precision)
        if module is not None:
            builds += [(_settings_class(module), tables[precision], precision), (target_cls, target_settings, precision)]
        else:
            builds.append((target_cls, dict(target_settings, **tables[precision]), precision))
    for settings_cls, values, precision in builds:
        try:
            build_settings(settings_cls, values, precision)
        except SettingValueError as error:
            from_target = settings_cls is target_cls and error.field not in tables.get(precision, {})
            where = "target" if from_target else f"precision.{precision}"
            raise RecipeError(f"{source}: [{where}] {error.message}", hint=error.hint) from error
        except RecipeError as error:  # a step whose Settings do not name the field (no StepSettings base yet)
            raise RecipeError(f"{source}: {error.message}", hint=error.hint) from error


def _check_build_gates(tables: dict, used: set, release_suite: str, source: str, ground_truth=None) -> None:
    """Refuse a recipe whose build-time gate (a precision step's gate_suite) checks less than its release
    suite: a candidate that passes the build gate must fail the release gate only on images it did not see."""
    from evsam_export.parity.suites import check_gate_covers
    from evsam_export.steps.settings import GATE_SUITE

    for precision in ("fp16", "int8"):
        if precision in used and tables[precision].get("fallback", True):
            check_gate_covers(tables[precision].get("gate_suite", GATE_SUITE), release_suite, (precision,),
                              f"{source}: [precision.{precision}] gate_suite", ground_truth)


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    from evsam_export.pipeline.export import ExportOptions
    from evsam_export.targets.registry import get_target

    path = resolve_recipe_path(name_or_path)
    source = path.name
    document = apply_overrides(_read(path), overrides or [])
    if "auto" in document:
        raise RecipeError(f"{source} is an auto recipe: it builds several candidate recipes, not one",
                          hint="run it with `evsam-export run`; pipeline.auto.load_auto_recipe reads it")
    for key in document:
        if key not in SECTIONS:
            raise RecipeError(f"{source}: [{key}]: unknown section", hint=f"allowed: {', '.join(SECTIONS)}")
    head = check_table(document.get("recipe", {}), _RecipeSection, "recipe", source)
    if "name" not in head:
        raise RecipeError(f"{source}: [recipe] name: missing")
    target = get_target(head.get("target", "ort"))
    export = check_table(document.get("export", {}), ExportOptions, "export", source)
    if target.decoder_profile and export.get("decoder_profile", target.decoder_profile) != target.decoder_profile:
        raise RecipeError(f"{source}: [export] decoder_profile: target {target.name} needs {target.decoder_profile!r}")
    if target.decoder_profile:
        export["decoder_profile"] = target.decoder_profile
    try:
        ExportOptions(**export)  # the values (profiles, single-mask rule...) are checked at load, not mid-build
    except UsageError as exc:
        raise RecipeError(f"{source}: [export] {exc.message}", hint=exc.hint) from None
    precision = check_table(document.get("precision", {}), _PrecisionSection, "precision", source)
    for component in ("encoder", "decoder"):
        value = precision.get(component, "fp32")
        if value not in target.precisions:
            allowed = ", ".join(target.precisions)
            raise RecipeError(f"{source}: [precision] {component}: {value!r} not one of {allowed} for {target.name}")
    steps = {p: target.precision_steps.get(p) or target.target_step for p in ("fp16", "int8")}
    used = {precision.get("encoder", "fp32"), precision.get("decoder", "fp32")}
    tables = {}
    for name in ("fp16", "int8"):  # a precision table is checked when present or when that precision is used
        table = precision.get(name) or {}
        used_or_given = table or name in used
        tables[name] = check_table(table, _settings_class(steps[name]), f"precision.{name}", source) if used_or_given else {}
    fp16, int8 = tables["fp16"], tables["int8"]
    target_settings = check_table(document.get("target", {}), _settings_class(target.target_step), "target", source)
    _build_step_settings(target, target_settings, tables, used, source)
    validate = check_table(document.get("validate", {}), _ValidateSection, "validate", source)
    ground_truth = _ground_truth(validate, source)
    if validate.get("enabled", True):
        _check_build_gates(tables, used, validate.get("suite", "default"), source, ground_truth)
    apps = check_table(document.get("apps", {}), _AppsSection, "apps", source)
    check_app_configs(apps, export, source)
    return Recipe(
        name=head["name"],
        description=head.get("description", ""),
        target=target.name,
        path=path,
        export=export,
        encoder_precision=precision.get("encoder", "fp32"),
        decoder_precision=precision.get("decoder", "fp32"),
        fp16=fp16,
        int8=int8,
        target_settings=target_settings,
        validate=validate.get("enabled", True),
        suite=validate.get("suite", "default"),
        ground_truth=ground_truth,
        apps=apps,
        document=document,
    )
