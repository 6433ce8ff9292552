"""The settings of task-level gating (parity.task): which prompt kinds, how many mIoU points may be lost, the
floors against gross failure, and the ground truth a suite names. Import-light, so suites and recipes load
without the evaluate protocol."""


from __future__ import annotations

import math
from dataclasses import dataclass

from evsam_export.errors import UsageError

# The prompt kinds of the evaluate protocol (evaluation.protocol.PROMPT_KINDS, kept import-free here because
# suites load without numpy-heavy modules).
TASK_KINDS = ("box", "point")
TASK_STAGE = "task"
DROP_METRIC = "miou_drop_points"
# Hard floors under task gating (embedding SNR >= 10 dB, mask IoU vs fp32 >= 0.9): an
# artifact this far from fp32 is broken even when the annotated set happens not to show it.
SNR_FLOOR_DB = 10.0
MASK_IOU_FLOOR = 0.9


@dataclass(frozen=True)
class TaskCriterion:
    """`max_drop`: prompt kind -> most mIoU points an artifact may lose against PyTorch (None: measure and
    report the drop, agreement decides); the floors that still decide under task gating."""

    max_drop: dict | None = None
    embedding_snr_db_floor: float = SNR_FLOOR_DB
    mask_iou_floor: float = MASK_IOU_FLOOR

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.max_drop) if self.max_drop else TASK_KINDS

    @property
    def decides(self) -> bool:
        return bool(self.max_drop)


def parse_max_drop(value) -> dict[str, float]:
    """One number (every protocol kind) or {kind: points}: {kind: points}; ValueError with a one-line reason."""
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"give a number or a table of {', '.join(TASK_KINDS)}")
        items = list(value.items())
    else:
        items = [(kind, value) for kind in TASK_KINDS]
    parsed = {}
    for kind, points in items:
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown prompt kind {kind!r} (the evaluate protocol has {', '.join(TASK_KINDS)})")
        if isinstance(points, bool) or not isinstance(points, (int, float)) or math.isnan(points):
            raise ValueError(f"{kind}: expected mIoU points as a number, got {type(points).__name__} {points!r}")
        if not 0 <= points <= 100:
            raise ValueError(f"{kind}: {points} is outside 0..100 mIoU points")
        parsed[kind] = float(points)
    return parsed


def parse_max_drop_text(text: str) -> dict[str, float]:
    """`--max-drop 1.5` or `--max-drop box=1,point=2`, or one UsageError line."""
    hint = "give mIoU points: one number (e.g. 1.0) or box=1.0,point=2.0"
    try:
        if "=" not in text:
            return parse_max_drop(float(text))
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        return parse_max_drop({kind.strip(): float(points) for kind, points in pairs})
    except ValueError as exc:
        raise UsageError(f"bad --max-drop {text!r}: {exc}", hint=hint) from None


@dataclass(frozen=True)
class GroundTruth:
    """A recipe's `[validate]` annotations: they replace the images of its release suite and of every build
    gate (so both gate on the same criterion, parity.suites.gate_coverage_problems), `limit` of them sampled
    with `seed`; relative paths are read from the working directory, as calibration_data's are."""

    annotations: str
    images: str | None = None
    limit: int | None = None
    seed: int = 0
    max_drop: dict | None = None

    def source(self):
        from pathlib import Path

        from evsam_export.data.coco import AnnotationSet

        images = Path(self.images).expanduser() if self.images is not None else None
        return AnnotationSet(Path(self.annotations).expanduser(), images, self.limit, self.seed)

    def apply(self, suite):
        return suite.with_annotations(self.source(), self.max_drop)

    def to_json(self) -> dict:
        return {"annotations": self.annotations, "images": self.images, "limit": self.limit, "seed": self.seed,
                "max_drop": self.max_drop}


# ------------------------------------------------------------------------------------------------ measuring
