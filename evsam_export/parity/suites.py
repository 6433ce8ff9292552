"""Parity suites: `validators/<name>.toml` read into frozen, typed objects. The shipped suites are package
data (evsam_export/validators, which the top-level validators/ folder links to).

A suite names the images, the prompt kinds and the gates per precision. Validation is strict, like
recipes: an unknown key or a wrong type is refused with a one-line message naming the field path
("[suite.prompts] kindz: unknown key"), because a misspelt gate that were silently ignored would
pass every artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from evsam_export.data.coco import AnnotationSet
from evsam_export.data.images import ImageFolder
from evsam_export.data.scenes import (
    MAX_SCENE_SIDE,
    MIN_SCENE_SIDE,
    PROMPT_KINDS,
    SAMPLE_IMAGES,
    ImageSpec,
    SampleImageSpec,
    SyntheticImageSpec,
)
from evsam_export.errors import RecipeError
from evsam_export.parity.task_settings import GroundTruth, TaskCriterion, parse_max_drop

PRECISIONS = ("fp32", "fp16", "int8", "bf16")
# Gates for an `app`-profile encoder (preprocessing in the graph) are their own tables, "app-<precision>":
# its Resize approximates Pillow's uint8 resize, an error the host-preprocessed tables rightly refuse.
APP_PREFIX = "app-"
TOLERANCE_TABLES = PRECISIONS + tuple(APP_PREFIX + precision for precision in PRECISIONS)


@dataclass(frozen=True)
class Tolerance:
    """Gates for one precision. A gate set to None is not checked; the four embedding/mask gates and
    iou_pred_max_abs are required in every table so that no precision is accidentally ungated."""

    precision: str
    embedding_snr_db_min: float
    embedding_cosine_min: float
    mask_iou_mean_min: float
    mask_iou_p5_min: float
    iou_pred_max_abs: float
    decoder_logit_max_abs: float | None = None
    stable_mask_iou_mean_min: float | None = None
    stable_margin: float | None = None
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    path: Path
    images: tuple[ImageSpec, ...]
    prompt_kinds: tuple[str, ...]
    prompt_seed: int
    tolerances: dict[str, Tolerance]
    # [task]: gate lower precisions on the mIoU drop against PyTorch on the suite's annotations (parity.task).
    task: TaskCriterion | None = None

    def with_images(self, folder: ImageFolder, description: str | None = None) -> Suite:
        """This suite's prompt kinds and gates on the images of `folder` instead of its own images
        (`validate --images`)."""
        return dataclasses.replace(self, name=f"{self.name}+{folder.name}", images=(folder,),
                                   description=description or f"{self.description}; images from {folder.folder}")

    def with_annotations(self, annotations: AnnotationSet, max_drop: dict | None) -> Suite:
        """This suite's prompt kinds and gates on an annotation set instead of its own images, the mIoU drop
        measured and, with `max_drop` (else the suite's own [task] max_drop, if any), deciding for lower
        precisions (`validate --annotations --max-drop`)."""
        task = self.task or TaskCriterion()
        return dataclasses.replace(self, name=f"{self.name}+{annotations.name}", images=(annotations,),
                                   description=f"{self.description}; ground truth from {annotations.file}",
                                   task=dataclasses.replace(task, max_drop=max_drop if max_drop is not None else task.max_drop))

    def fingerprint(self) -> str:
        """sha256 of the suite file and of every image folder and annotation file it names (ImageFolder and
        AnnotationSet.fingerprint), so a cache key over it changes when the user's images or annotations change."""
        digest = hashlib.sha256(self.path.read_bytes() if self.path.is_file() else self.name.encode())
        if self.task is not None:  # --annotations/--max-drop change the gate without changing the file
            digest.update(f"|task|{sorted((self.task.max_drop or {}).items())}|{self.task.embedding_snr_db_floor}|"
                          f"{self.task.mask_iou_floor}".encode())
        for spec in self.images:
            if isinstance(spec, ImageFolder):
                digest.update(f"|{spec.folder.resolve()}|{spec.fingerprint()}".encode())
            elif isinstance(spec, AnnotationSet):
                digest.update(f"|{spec.file.resolve()}|{spec.fingerprint()}".encode())
        return digest.hexdigest()

    def tolerance(self, precision: str, encoder_profile: str = "host") -> Tolerance:
        """The gates for `precision` (of an encoder of `encoder_profile`); refused when this suite does not define them."""
        if encoder_profile == "app":
            precision = APP_PREFIX + precision
        if precision not in self.tolerances:
            raise RecipeError(
                f"parity suite {self.name!r} has no tolerances for {precision!r}",
                hint=f"add a [tolerances.{precision}] table to {self.path}",
            )
        return self.tolerances[precision]


# ------------------------------------------------------------------------------------------ locating


def validators_dir() -> Path:
    """The shipped suites, wherever evsam_export is installed (an unpacked wheel, editable or a checkout)."""
    return Path(str(resources.files("evsam_export").joinpath("validators")))


def list_suites() -> tuple[str, ...]:
    """Names of the shipped suites."""
    return tuple(sorted(path.stem for path in validators_dir().glob("*.toml")))


def suite_path(name_or_path: str | Path, beside: Path | None = None) -> Path:
    """The file of a suite given by bare name (validators/<name>.toml, or a file beside `beside`) or path."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if beside is not None and not path.is_absolute():
            path = beside.parent / path
    else:
        path = validators_dir() / f"{text}.toml"
    if not path.is_file():
        known = ", ".join(list_suites()) or "none found"
        raise RecipeError(f"parity suite {text!r} not found ({path})", hint=f"shipped suites: {known}")
    return path


def load_suite(name_or_path: str | Path, ground_truth: GroundTruth | None = None) -> Suite:
    """Load a suite by bare name (validators/<name>.toml) or by path to a .toml file; with `ground_truth` (a
    recipe's [validate] annotations) on those annotations, the mIoU drop measured (parity.task)."""
    path = suite_path(name_or_path)
    suite = parse_suite(_resolve_extends(_read_toml(path), path), path)
    return ground_truth.apply(suite) if ground_truth is not None else suite


def _resolve_extends(document: dict, path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A suite with `extends = "PARENT"` is the parent's prompt kinds and tolerances with its own name,
    description, images (and prompt seed). It may not set kinds or tolerances: a build gate derived from a
    release suite then checks every prompt kind and stage of it with the same gates, by construction
    (a build gate that passes and a release gate that fails would mean the suites disagree)."""
    if "extends" not in document:
        return document
    parent_name = document["extends"]
    check = _Checker(path)
    if not isinstance(parent_name, str) or not parent_name.strip():
        raise check.fail("top level", "extends", f"expected a suite name or path, got {_describe(parent_name)}")
    for table in ("tolerances", "task"):
        if table in document:
            raise check.fail("top level", table, f"a suite that extends {parent_name!r} inherits its {table}; "
                                                 "remove the table (or drop extends)")
    suite = document.get("suite", {})
    prompts = suite.get("prompts", {}) if isinstance(suite, dict) else {}
    if isinstance(prompts, dict) and "kinds" in prompts:
        raise check.fail("suite.prompts", "kinds", f"a suite that extends {parent_name!r} checks all of its prompt "
                                                   "kinds; remove the key (or drop extends)")
    parent_path = suite_path(parent_name, beside=path)
    if parent_path.resolve() in chain or parent_path.resolve() == path.resolve():
        raise check.fail("top level", "extends", f"{parent_name!r} extends back to this suite")
    parent = _resolve_extends(_read_toml(parent_path), parent_path, chain + (path.resolve(),))
    inherited = dict(parent["suite"])
    if isinstance(suite, dict) and ("images" in suite or "annotations" in suite):
        inherited.pop("images", None), inherited.pop("annotations", None)  # its own image sources replace the parent's
    merged_suite = {**inherited, **{k: v for k, v in suite.items() if k != "prompts"}}
    merged_suite["prompts"] = {**parent["suite"].get("prompts", {}), **prompts}
    return {"suite": merged_suite, "tolerances": parent["tolerances"], **({"task": parent["task"]} if "task" in parent else {})}


# A gate that is at least as strict as another: for "_min" gates a higher value, for "_max" gates a lower one.
_AT_LEAST_AS_STRICT = {
    "embedding_snr_db_min": ">=", "embedding_cosine_min": ">=", "mask_iou_mean_min": ">=", "mask_iou_p5_min": ">=",
    "stable_mask_iou_mean_min": ">=", "iou_pred_max_abs": "<=", "decoder_logit_max_abs": "<=",
}


def gate_coverage_problems(gate: Suite, release: Suite, precisions: tuple[str, ...]) -> list[str]:
    """What the build gate `gate` does not check that the release suite `release` does, for the artifact
    `precisions`: a prompt kind it skips (every stage runs every kind), a precision it has no gates for, or
    a gate looser than the release one. Empty when a candidate that passes `gate` can fail `release` only
    on images `gate` did not see."""
    problems = [f"prompt kind {kind!r}" for kind in release.prompt_kinds if kind not in gate.prompt_kinds]
    for precision in precisions:
        if precision not in release.tolerances:
            continue
        if precision not in gate.tolerances:
            problems.append(f"[tolerances.{precision}]")
            continue
        ours, theirs = gate.tolerances[precision], release.tolerances[precision]
        for name, op in _AT_LEAST_AS_STRICT.items():
            mine, needed = getattr(ours, name), getattr(theirs, name)
            if needed is None:
                continue
            if mine is None or (mine < needed if op == ">=" else mine > needed):
                problems.append(f"{precision} {name} = {mine} (release gate: {needed})")
        if ours.stable_margin != theirs.stable_margin and theirs.stable_margin is not None:
            problems.append(f"{precision} stable_margin = {ours.stable_margin} (release gate: {theirs.stable_margin})")
        if ours.allow_nonfinite and not theirs.allow_nonfinite:
            problems.append(f"{precision} allow_nonfinite = true (release gate: false)")
    return problems + _task_coverage_problems(gate.task, release.task)


def _task_coverage_problems(ours: TaskCriterion | None, theirs: TaskCriterion | None) -> list[str]:
    """Task gating lets lower precisions pass on the mIoU drop instead of agreement, so a build gate may use it
    only when the release gate does, with drops and floors at least as strict."""
    deciding, needed = ours is not None and ours.decides, theirs is not None and theirs.decides
    if deciding and not needed:
        return ["[task] max_drop (the release suite has no task gating: agreement with fp32 decides there)"]
    if not needed:
        return []
    if not deciding:
        return ["[task] max_drop (the release suite gates on the mIoU drop; give the build gate annotations and [task])"]
    problems = [f"[task] max_drop.{kind} = {ours.max_drop.get(kind)} (release gate: {points})"
                for kind, points in theirs.max_drop.items() if ours.max_drop.get(kind, math.inf) > points]
    for name in ("embedding_snr_db_floor", "mask_iou_floor"):
        if getattr(ours, name) < getattr(theirs, name):
            problems.append(f"[task] {name} = {getattr(ours, name)} (release gate: {getattr(theirs, name)})")
    return problems


def check_gate_covers(gate_name: str | Path, release_name: str | Path, precisions: tuple[str, ...], where: str,
                      ground_truth: GroundTruth | None = None) -> None:
    """Refuse a build gate that checks less than the release gate (RecipeError naming what it skips)."""
    gate, release = load_suite(gate_name, ground_truth), load_suite(release_name, ground_truth)
    problems = gate_coverage_problems(gate, release, precisions)
    if problems:
        raise RecipeError(
            f"{where}: build gate suite {gate.name!r} checks less than the release suite {release.name!r}: "
            + "; ".join(problems),
            hint=f'derive the build gate from the release suite (extends = "{release.name}" with fewer images)',
        )


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: invalid TOML: {error}", hint="fix the syntax at the line shown") from error


# ------------------------------------------------------------------------------------------ checking


class _Checker:
    """Typed reads from a TOML table; every refusal names the file and the field path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, key: str, problem: str) -> RecipeError:
        return RecipeError(f"{self.path.name}: [{where}] {key}: {problem}", hint=f"edit {self.path}")

    def subtable(self, parent: dict, where: str, key: str) -> dict:
        value = parent[key]
        if not isinstance(value, dict):
            raise self.fail(where, key, f"expected a table, got {_describe(value)}")
        return value

    def keys(self, table: dict, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
        for name in table:
            if name not in allowed:
                raise self.fail(where, name, f"unknown key (allowed: {', '.join(allowed)})")
        for name in required:
            if name not in table:
                raise self.fail(where, name, "missing required key")

    def string(self, table: dict, where: str, key: str) -> str:
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, key, f"expected a non-empty string, got {_describe(value)}")
        return value

    def integer(self, table: dict, where: str, key: str, low: int, high: int) -> int:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, key, f"expected an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise self.fail(where, key, f"{value} is outside {low}..{high}")
        return value

    def number(self, table: dict, where: str, key: str, low: float, high: float) -> float:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, key, f"expected a number, got {_describe(value)}")
        if math.isnan(value) or not low <= value <= high:
            raise self.fail(where, key, f"{value} is outside {low}..{high}")
        return float(value)

    def boolean(self, table: dict, where: str, key: str) -> bool:
        value = table[key]
        if not isinstance(value, bool):
            raise self.fail(where, key, f"expected true or false, got {_describe(value)}")
        return value


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"


# Each gate's type and sane range: IoU and cosine are bounded; errors and margins are non-negative.
_GATE_RANGES = {
    "embedding_snr_db_min": (-math.inf, math.inf),
    "embedding_cosine_min": (-1.0, 1.0),
    "mask_iou_mean_min": (0.0, 1.0),
    "mask_iou_p5_min": (0.0, 1.0),
    "iou_pred_max_abs": (0.0, math.inf),
    "decoder_logit_max_abs": (0.0, math.inf),
    "stable_mask_iou_mean_min": (0.0, 1.0),
    "stable_margin": (0.0, math.inf),
    "embedding_snr_db_floor": (-math.inf, math.inf),
    "mask_iou_floor": (0.0, 1.0),
}
_TOLERANCE_KEYS = tuple(field.name for field in fields(Tolerance) if field.name != "precision")
_REQUIRED_GATES = ("embedding_snr_db_min", "embedding_cosine_min", "mask_iou_mean_min", "mask_iou_p5_min",
                   "iou_pred_max_abs")


def _parse_tolerance(check: _Checker, tables: dict, precision: str) -> Tolerance:
    where = f"tolerances.{precision}"
    table = check.subtable(tables, "tolerances", precision)
    check.keys(table, where, _TOLERANCE_KEYS, required=_REQUIRED_GATES)
    values = {key: check.number(table, where, key, *_GATE_RANGES[key]) for key in table if key in _GATE_RANGES}
    if ("stable_margin" in values) != ("stable_mask_iou_mean_min" in values):
        raise check.fail(where, "stable_margin", "set together with stable_mask_iou_mean_min, or neither")
    if "allow_nonfinite" in table:
        values["allow_nonfinite"] = check.boolean(table, where, "allow_nonfinite")
    return Tolerance(precision=precision, **values)


def _parse_image(check: _Checker, entry, index: int) -> ImageSpec:
    where = f"suite.images #{index + 1}"  # counted from 1, as a reader counts [[suite.images]] blocks
    if not isinstance(entry, dict):
        raise check.fail(where, "-", f"expected a table, got {_describe(entry)}")
    check.keys(entry, where, ("synthetic", "size", "sample", "folder", "limit", "seed", "recursive"))
    given = [key for key in ("synthetic", "sample", "folder") if key in entry]
    if len(given) != 1:
        raise check.fail(where, (given or ["synthetic"])[-1],
                         "give exactly one of synthetic = SEED (with size), sample = NAME or folder = PATH")
    if "folder" not in entry:
        for key in ("limit", "seed", "recursive"):
            if key in entry:
                raise check.fail(where, key, "only a folder entry takes limit, seed and recursive")
    if "folder" in entry:
        if "size" in entry:
            raise check.fail(where, "size", "images of a folder keep their own size")
        return _parse_folder(check, entry, where)
    if "sample" in entry:
        if "size" in entry:
            raise check.fail(where, "size", "sample images keep their own size")
        name = check.string(entry, where, "sample")
        if name not in SAMPLE_IMAGES:
            raise check.fail(where, "sample", f"unknown image {name!r} (offline ones: {', '.join(SAMPLE_IMAGES)})")
        return SampleImageSpec(name=name)
    seed = check.integer(entry, where, "synthetic", 0, 2**32 - 1)
    size = entry.get("size")
    if (not isinstance(size, list) or len(size) != 2
            or any(isinstance(side, bool) or not isinstance(side, int) for side in size)):
        raise check.fail(where, "size", f"expected [height, width] integers, got {_describe(size)}")
    if not all(MIN_SCENE_SIDE <= side <= MAX_SCENE_SIDE for side in size):
        raise check.fail(where, "size", f"{size} sides must be within {MIN_SCENE_SIDE}..{MAX_SCENE_SIDE}")
    return SyntheticImageSpec(seed=seed, height=size[0], width=size[1])


def _parse_folder(check: _Checker, entry: dict, where: str) -> ImageFolder:
    """A folder entry; a relative path is read from the suite file's folder. A missing folder or one with no
    image is refused now (UsageError, exit 2), before any model runs."""
    folder = Path(check.string(entry, where, "folder")).expanduser()
    spec = ImageFolder(
        folder=folder if folder.is_absolute() else check.path.parent / folder,
        limit=check.integer(entry, where, "limit", 1, 2**31 - 1) if "limit" in entry else None,
        seed=check.integer(entry, where, "seed", 0, 2**32 - 1) if "seed" in entry else 0,
        recursive=check.boolean(entry, where, "recursive") if "recursive" in entry else True,
    )
    spec.all_files()
    return spec


def _parse_annotations(check: _Checker, entry, index: int) -> AnnotationSet:
    """A `[[suite.annotations]]` entry (file, images, limit, seed; paths relative to the suite file). The file is
    loaded and checked now (data.coco.load_coco: UsageError, exit 2, naming the file), before any model runs."""
    where = f"suite.annotations #{index + 1}"
    if not isinstance(entry, dict):
        raise check.fail(where, "-", f"expected a table, got {_describe(entry)}")
    check.keys(entry, where, ("file", "images", "limit", "seed"), required=("file",))

    def beside_suite(key: str) -> Path:
        path = Path(check.string(entry, where, key)).expanduser()
        return path if path.is_absolute() else check.path.parent / path

    spec = AnnotationSet(
        file=beside_suite("file"),
        images=beside_suite("images") if "images" in entry else None,
        limit=check.integer(entry, where, "limit", 1, 2**31 - 1) if "limit" in entry else None,
        seed=check.integer(entry, where, "seed", 0, 2**32 - 1) if "seed" in entry else 0,
    )
    spec.load()
    return spec


def _parse_prompt_kinds(check: _Checker, table: dict) -> tuple[str, ...]:
    kinds = table["kinds"]
    if not isinstance(kinds, list) or not kinds or not all(isinstance(kind, str) for kind in kinds):
        raise check.fail("suite.prompts", "kinds", f"expected a non-empty list of strings, got {_describe(kinds)}")
    for kind in kinds:
        if kind not in PROMPT_KINDS:
            known = ", ".join(PROMPT_KINDS)
            raise check.fail("suite.prompts", "kinds", f"unknown prompt kind {kind!r} (known: {known})")
    if len(set(kinds)) != len(kinds):
        raise check.fail("suite.prompts", "kinds", "lists a kind twice")
    return tuple(kinds)


def _parse_task(check: _Checker, document: dict, images: tuple[ImageSpec, ...]) -> TaskCriterion | None:
    """The `[task]` table: max_drop (mIoU points, one number or {box, point}) and the floors that still decide."""
    if "task" not in document:
        return None
    table = check.subtable(document, "top level", "task")
    check.keys(table, "task", ("max_drop", "embedding_snr_db_floor", "mask_iou_floor"), required=("max_drop",))
    if not any(isinstance(spec, AnnotationSet) for spec in images):
        raise check.fail("task", "max_drop", "the mIoU drop needs ground truth: add [[suite.annotations]]")
    try:
        max_drop = parse_max_drop(table["max_drop"])
    except ValueError as exc:
        raise check.fail("task", "max_drop", str(exc)) from None
    floors = {key: check.number(table, "task", key, *_GATE_RANGES[key]) for key in ("embedding_snr_db_floor", "mask_iou_floor")
              if key in table}
    return TaskCriterion(max_drop=max_drop, **floors)


def parse_suite(document: dict, path: Path) -> Suite:
    """Validate a parsed TOML document (see validators/default.toml for the layout)."""
    check = _Checker(path)
    check.keys(document, "top level", ("suite", "tolerances", "task", "extends"), required=("suite", "tolerances"))
    suite = check.subtable(document, "top level", "suite")
    check.keys(suite, "suite", ("name", "description", "images", "annotations", "prompts"),
               required=("name", "description", "prompts"))
    images, annotations = suite.get("images", []), suite.get("annotations", [])
    for key, value in (("images", images), ("annotations", annotations)):
        if not isinstance(value, list) or (key in suite and not value):
            raise check.fail("suite", key, f"expected a non-empty array of tables, got {_describe(value)}")
    if not images and not annotations:
        raise check.fail("suite", "images", "missing required key (give [[suite.images]] or [[suite.annotations]])")
    prompts = check.subtable(suite, "suite", "prompts")
    check.keys(prompts, "suite.prompts", ("kinds", "seed"), required=("kinds",))
    tolerance_tables = check.subtable(document, "top level", "tolerances")
    check.keys(tolerance_tables, "tolerances", TOLERANCE_TABLES)
    if not tolerance_tables:
        raise check.fail("tolerances", "fp32", "define at least one precision table")
    sources = (tuple(_parse_image(check, entry, index) for index, entry in enumerate(images))
               + tuple(_parse_annotations(check, entry, index) for index, entry in enumerate(annotations)))
    return Suite(
        name=check.string(suite, "suite", "name"),
        description=check.string(suite, "suite", "description"),
        path=path,
        images=sources,
        task=_parse_task(check, document, sources),
        prompt_kinds=_parse_prompt_kinds(check, prompts),
        prompt_seed=check.integer(prompts, "suite.prompts", "seed", 0, 2**32 - 1) if "seed" in prompts else 0,
        tolerances={precision: _parse_tolerance(check, tolerance_tables, precision)
                    for precision in TOLERANCE_TABLES if precision in tolerance_tables},
    )
