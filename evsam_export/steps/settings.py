"""Typed step settings: every step's `Settings` derives from `StepSettings`, whose values are checked when
the object is built, so a recipe is refused when it loads (`run --dry-run` included), not after an export.

Precision steps share `PrecisionSettings`: the calibration, fallback and gate fields have one name in
every backend (ORT QDQ, NNCF, fp16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evsam_export.errors import RecipeError, SettingValueError  # noqa: F401  (the settings' error, re-exported)


@dataclass(frozen=True)
class StepSettings:
    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):  # recipes give lists; keep the frozen object hashable
            if isinstance(getattr(self, item.name), list):
                object.__setattr__(self, item.name, tuple(getattr(self, item.name)))
        self.check()

    def check(self) -> None:
        """Refuse values the step cannot use (raise `SettingValueError`); subclasses extend it."""

    # -- helpers for check() -------------------------------------------------------------------------
    def require_one_of(self, name: str, allowed) -> None:
        value = getattr(self, name)
        if value not in tuple(allowed):
            raise SettingValueError(name, f"{value!r} is not one of {', '.join(map(repr, allowed))}")

    def require_at_least(self, name: str, minimum: float) -> None:
        value = getattr(self, name)
        if value < minimum:
            raise SettingValueError(name, f"{value!r} must be >= {minimum}")

    def require_image_source(self, name: str) -> None:
        """The field names a folder holding at least one image (data.images.ImageFolder) or a COCO-format
        annotation file whose images are beside it (data.coco.AnnotationSet, checked like `evaluate` checks it)."""
        from pathlib import Path

        from evsam_export.data.coco import AnnotationSet
        from evsam_export.data.images import ImageFolder
        from evsam_export.errors import UsageError

        path = Path(getattr(self, name)).expanduser()
        try:
            AnnotationSet(path).load() if path.is_file() else ImageFolder(path).all_files()
        except UsageError as error:
            raise SettingValueError(name, error.message, hint=error.hint) from error

    def require_between(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        if not low <= value <= high:
            raise SettingValueError(name, f"{value!r} must be between {low} and {high}")


# The small suite every candidate is gated on (validators/calibration-gate.toml).
GATE_SUITE = "calibration-gate"


@dataclass(frozen=True)
class PrecisionSettings(StepSettings):
    """What every lower-precision step shares: where calibration data comes from, and the gated fallback."""

    # Calibration images (deterministic synthetic scenes and offline photos, data.calibration).
    calibration_images: int = 16
    # Seed of the calibration set (scene seeds, photo rotation, prompts; the sample of calibration_data).
    calibration_seed: int = 0
    # A folder of your own images (PNG/JPEG/TIFF/BMP/WebP, recursive) to calibrate on instead of the synthetic
    # set: calibration_images of them, sampled with calibration_seed. A relative path is read from the working
    # directory. The step's cache key follows the folder's files (names, sizes, modification times).
    # Or a COCO-format annotation file, its file_names relative to its folder: the annotated images, with
    # decoder prompts from the ground truth; the cache key follows the file's bytes and its images.
    calibration_data: str | None = None
    # Gate each candidate on `gate_suite` and put layer groups back to higher precision while it fails.
    fallback: bool = True
    # Most gate runs (1: gate once, no fallback); each step's default tries every group it has.
    max_rounds: int = 8
    # Parity suite of the build-time gate (a shipped suite name or a path).
    gate_suite: str = GATE_SUITE

    def check(self) -> None:
        self.require_at_least("calibration_images", 1)
        self.require_at_least("max_rounds", 1)
        if self.calibration_data is not None:
            self.require_image_source("calibration_data")
