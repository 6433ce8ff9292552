"""Parity suites: `validators/<name>.toml` read into frozen, typed objects. The shipped suites are package
data (evsam_export/validators, which the top-level validators/ folder links to).

A suite names the images, the prompt kinds and the gates per precision. Validation is strict, like
recipes: an unknown key or a wrong type is refused with a one-line message naming the field path
("[suite.prompts] kindz: unknown key"), because a misspelt gate that were silently ignored would
pass every artifact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from evsam_export.calibration.images import (
    MAX_SCENE_SIDE,
    MIN_SCENE_SIDE,
    PROMPT_KINDS,
    SAMPLE_IMAGES,
    ImageSpec,
    SampleImageSpec,
    SyntheticImageSpec,
)
from evsam_export.errors import RecipeError

PRECISIONS = ("fp32", "fp16", "int8", "bf16")


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

    def tolerance(self, precision: str) -> Tolerance:
        """The gates for `precision`; refused when this suite does not define them."""
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


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a suite by bare name (validators/<name>.toml) or by path to a .toml file."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
    else:
        path = validators_dir() / f"{text}.toml"
    if not path.is_file():
        known = ", ".join(list_suites()) or "none found"
        raise RecipeError(f"parity suite {text!r} not found ({path})", hint=f"shipped suites: {known}")
    return parse_suite(_read_toml(path), path)


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
    check.keys(entry, where, ("synthetic", "size", "sample"))
    if ("synthetic" in entry) == ("sample" in entry):
        raise check.fail(where, "synthetic", "give exactly one of synthetic = SEED (with size) or sample = NAME")
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


def parse_suite(document: dict, path: Path) -> Suite:
    """Validate a parsed TOML document (see validators/default.toml for the layout)."""
    check = _Checker(path)
    check.keys(document, "top level", ("suite", "tolerances"), required=("suite", "tolerances"))
    suite = check.subtable(document, "top level", "suite")
    check.keys(suite, "suite", ("name", "description", "images", "prompts"),
               required=("name", "description", "images", "prompts"))
    images = suite["images"]
    if not isinstance(images, list) or not images:
        raise check.fail("suite", "images", f"expected a non-empty array of tables, got {_describe(images)}")
    prompts = check.subtable(suite, "suite", "prompts")
    check.keys(prompts, "suite.prompts", ("kinds", "seed"), required=("kinds",))
    tolerance_tables = check.subtable(document, "top level", "tolerances")
    check.keys(tolerance_tables, "tolerances", PRECISIONS)
    if not tolerance_tables:
        raise check.fail("tolerances", "fp32", "define at least one precision table")
    return Suite(
        name=check.string(suite, "suite", "name"),
        description=check.string(suite, "suite", "description"),
        path=path,
        images=tuple(_parse_image(check, entry, index) for index, entry in enumerate(images)),
        prompt_kinds=_parse_prompt_kinds(check, prompts),
        prompt_seed=check.integer(prompts, "suite.prompts", "seed", 0, 2**32 - 1) if "seed" in prompts else 0,
        tolerances={precision: _parse_tolerance(check, tolerance_tables, precision)
                    for precision in PRECISIONS if precision in tolerance_tables},
    )
