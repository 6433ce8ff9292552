"""Evaluation reports: eval.json (results and the per-instance IoUs they come from), eval.md, JUnit XML;
reading shards' eval.json back and merging them into the report of one run.

Results are always computed from the per-instance lists sorted by (image id, annotation id), so a run split
into shards and merged gives the same numbers, bit for bit, as the run in one piece.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evsam_export.data.coco import AREA_BUCKETS, SMALL_AREA, area_bucket
from evsam_export.errors import UsageError
from evsam_export.evaluation.protocol import PYTORCH, Evaluation

FORMAT = "evsam-export/eval"
FORMAT_VERSION = 1
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
EVAL_JUNIT = "eval-junit.xml"
WORST_COUNT = 5  # lowest-IoU instances kept per result, for a person (or an overlay) to look at


def _canonical_order(evaluation: Evaluation) -> np.ndarray:
    return np.lexsort((np.asarray(evaluation.annotation_ids), np.asarray(evaluation.image_ids)))


def results(evaluation: Evaluation) -> list[dict]:
    """One entry per pipeline and prompt kind: mIoU (0..1), instance count, COCO's size split, worst instances."""
    order = _canonical_order(evaluation)
    buckets = np.asarray([area_bucket(a) for a in evaluation.areas])[order]
    image_ids = np.asarray(evaluation.image_ids)[order]
    annotation_ids = np.asarray(evaluation.annotation_ids)[order]
    entries = []
    for pipeline in evaluation.pipelines:
        for prompt in evaluation.prompts:
            if prompt not in evaluation.ious.get(pipeline, {}):
                continue
            values = np.asarray(evaluation.ious[pipeline][prompt], dtype=np.float64)[order]
            entry = {"pipeline": pipeline, "prompt": prompt, "miou": float(values.mean()), "instances": int(values.size)}
            for bucket in AREA_BUCKETS:
                chosen = values[buckets == bucket]
                entry[bucket] = {"miou": float(chosen.mean()) if chosen.size else None, "instances": int(chosen.size)}
            worst = np.argsort(values, kind="stable")[:WORST_COUNT]
            entry["worst"] = [
                {"image_id": int(image_ids[i]), "annotation_id": int(annotation_ids[i]), "iou": float(values[i])} for i in worst
            ]
            entries.append(entry)
    reference = {e["prompt"]: e["miou"] for e in entries if e["pipeline"] == PYTORCH}
    for entry in entries:
        if entry["pipeline"] != PYTORCH and entry["prompt"] in reference:
            entry["drop_points"] = drop_points(reference[entry["prompt"]], entry["miou"])
    return entries


def result_rows(evaluation: Evaluation) -> list[tuple[str, dict]]:
    """(key, values) per pipeline for docs/benchmarks.md's `evaluate` table: mIoU and drop per prompt kind, and
    the time split into the encoder per image and the prompts per instance."""
    rows = {}
    instances = len(evaluation.image_ids)
    for entry in results(evaluation):
        values = rows.setdefault(entry["pipeline"], {"variant": evaluation.variant, "pipeline": entry["pipeline"],
                                                     "annotations": Path(evaluation.annotations.get("file", "")).name,
                                                     "images": evaluation.images, "instances": instances})
        values[f"{entry['prompt']}_miou"] = round(100 * entry["miou"], 2)
        if entry.get("drop_points") is not None:
            values[f"{entry['prompt']}_drop_points"] = round(entry["drop_points"], 2)
    for pipeline, values in rows.items():
        seconds = evaluation.pipeline_seconds.get(pipeline)
        if seconds and evaluation.images and instances:
            values["encoder_s_per_image"] = round(seconds["encoder"] / evaluation.images, 3)
            values["prompts_s_per_instance"] = round(seconds["prompts"] / instances, 3)
    return [(f"{evaluation.variant}-{values['annotations']}-{pipeline}", values) for pipeline, values in rows.items()]


def drop_points(reference_miou: float, miou: float) -> float:
    """How many mIoU points (0..100 scale) a pipeline is below PyTorch's; negative when it is above."""
    return 100.0 * (reference_miou - miou)


def drop_limit(max_drop, prompt: str) -> float | None:
    """The --max-drop points for one prompt kind: one number for every kind, or {kind: points} (a kind not named
    is not gated)."""
    return max_drop.get(prompt) if isinstance(max_drop, dict) else max_drop


def drop_text(max_drop) -> str:
    """--max-drop as the user gives it: `1` or `box=1,point=2`."""
    if isinstance(max_drop, dict):
        return ",".join(f"{kind}={points:g}" for kind, points in max_drop.items())
    return f"{max_drop:g}"


def drop_failures(entries: Sequence[dict], max_drop: float | dict[str, float] | None) -> list[str]:
    """One line per artifact result more than its prompt kind's `max_drop` mIoU points below PyTorch's."""
    if max_drop is None:
        return []
    failures = []
    for e in entries:
        limit = drop_limit(max_drop, e["prompt"])
        if e.get("drop_points") is not None and limit is not None and e["drop_points"] > limit:
            failures.append(f"{e['pipeline']} [{e['prompt']}] mIoU {100 * e['miou']:.2f} is {e['drop_points']:.2f} points "
                            f"below PyTorch's (--max-drop {drop_text(max_drop)})")
    return failures


def images_per_second(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def eval_json(evaluation: Evaluation, max_drop: float | dict[str, float] | None = None) -> dict:
    entries = results(evaluation)
    failures = drop_failures(entries, max_drop)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "variant": evaluation.variant,
        "reference": evaluation.reference,
        "annotations": evaluation.annotations,
        "selection": evaluation.selection,
        "protocol": {
            "box": "GT box (xywh -> xyxy), multimask_output=False",
            "point": "one foreground point, the GT-mask pixel farthest from the background; multimask_output=True, highest predicted IoU",
            "iou": "at the original image size; mIoU = mean over instances",
            "sizes": f"COCO area split: small < {SMALL_AREA}, medium < {96**2}, large >= {96**2} pixels",
        },
        "prompts": evaluation.prompts,
        "pipelines": evaluation.pipelines,
        "max_drop": max_drop,
        "passed": not failures,
        "failures": failures,
        "images": evaluation.images,
        "instances": len(evaluation.image_ids),
        "timing": {
            "seconds": evaluation.seconds,
            "images_per_s": images_per_second(evaluation.images, evaluation.seconds),
            "pipeline_seconds": evaluation.pipeline_seconds,
        },
        "results": [{k: _finite(v) for k, v in e.items()} for e in entries],
        "unavailable": evaluation.unavailable,
        "pictures": evaluation.pictures,
        "per_instance": {
            "image_ids": evaluation.image_ids,
            "annotation_ids": evaluation.annotation_ids,
            "areas": evaluation.areas,
            "ious": evaluation.ious,
        },
    }


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def eval_markdown(evaluation: Evaluation, max_drop: float | dict[str, float] | None = None) -> str:
    entries = results(evaluation)
    selection = evaluation.selection
    shards = f", shards {selection['shard_indices']} of {selection['shards']}" if selection.get("shards") else ""
    rate = images_per_second(evaluation.images, evaluation.seconds)
    lines = [
        f"# Evaluation: EfficientViT-SAM-{evaluation.variant} against {Path(evaluation.annotations['file']).name}",
        "",
        f"{evaluation.images} images ({selection['candidates']} with instances, limit {selection['limit'] or 'none'}, "
        f"seed {selection['seed']}{shards}), {len(evaluation.image_ids)} instances "
        f"({selection['crowd_skipped']} crowd annotations left out). Reference: {evaluation.reference}.",
        "Box prompt: the GT box, single mask. Point prompt: the GT-mask pixel farthest from the background, best of three "
        "masks by predicted IoU. mIoU in percent at the original image size; sizes by COCO area (32^2, 96^2).",
        "",
        "| pipeline | prompt | mIoU | small | medium | large | instances | drop vs PyTorch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        drop = e.get("drop_points")
        lines.append(
            f"| {e['pipeline']} | {e['prompt']} | {_percent(e['miou'])} | {_percent(e['small']['miou'])} | "
            f"{_percent(e['medium']['miou'])} | {_percent(e['large']['miou'])} | {e['instances']} | "
            f"{'-' if drop is None else f'{drop:.2f}'} |"
        )
    lines += ["", f"{rate:.2f} images/s over {evaluation.seconds:.1f} s (all pipelines).", ""]
    lines += ["| pipeline | encoder s/image | prompts s/instance | images/s |", "|---|---|---|---|"]
    instances = max(1, len(evaluation.image_ids))
    for name, parts in evaluation.pipeline_seconds.items():
        per_image = (parts["encoder"] + parts["prompts"]) / max(1, evaluation.images)
        lines.append(
            f"| {name} | {parts['encoder'] / max(1, evaluation.images):.3f} | {parts['prompts'] / instances:.3f} | "
            f"{1 / per_image if per_image else 0:.2f} |"
        )
    for name, reason in evaluation.unavailable.items():
        lines.append(f"- not evaluated: {name}: {reason}")
    if evaluation.pictures:
        lines += ["", "Worst instances (GT, PyTorch and artifact masks, the prompt; also in report.html):", ""]
        lines += [f"- [{picture['caption']}]({picture['file']})" for picture in evaluation.pictures]
    failures = drop_failures(entries, max_drop)
    if max_drop is not None:
        lines += ["", f"Gate --max-drop {drop_text(max_drop)}: " + ("passed." if not failures else "FAILED")]
        lines += [f"- {line}" for line in failures]
    return "\n".join(lines) + "\n"


def eval_junit(evaluation: Evaluation, max_drop: float | dict[str, float] | None = None) -> str:
    """One test case per pipeline and prompt kind; a failure when it drops more than --max-drop points."""
    from evsam_export.junit import junit_xml

    cases = [(e["pipeline"], e["prompt"], drop_failures([e], max_drop)) for e in results(evaluation)]
    return junit_xml(f"evsam-eval-{evaluation.variant}", cases, evaluation.unavailable)


def write_evaluation(evaluation: Evaluation, folder: Path, max_drop: float | dict[str, float] | None = None) -> dict[str, Path]:
    """eval.json, eval.md, eval-junit.xml and the worst-instance pictures in `folder`, all complete before any
    replaces an earlier one; pictures of an earlier run that this one does not list are removed."""
    from evsam_export.evaluation.pictures import PICTURE_FOLDER
    from evsam_export.folder_report import write_folder_report
    from evsam_export.output import write_files_atomically

    texts = {
        **evaluation.picture_data,
        EVAL_JSON: json.dumps(eval_json(evaluation, max_drop), indent=1) + "\n",
        EVAL_MD: eval_markdown(evaluation, max_drop),
        EVAL_JUNIT: eval_junit(evaluation, max_drop),
    }
    written = write_files_atomically(Path(folder), texts)
    for stale in (Path(folder) / PICTURE_FOLDER).glob("worst-*.png"):
        if f"{PICTURE_FOLDER}/{stale.name}" not in texts:
            stale.unlink(missing_ok=True)
    written["report.html"] = write_folder_report(Path(folder))  # the folder's one page links the new results
    return written


# ------------------------------------------------------------------------------------------------ shards


def load_evaluation(folder: Path) -> Evaluation:
    """The Evaluation saved in `folder`/eval.json (a shard's output folder), or one UsageError line."""
    path = Path(folder) / EVAL_JSON
    hint = "pass the output folders of `evsam-export evaluate --shard K/N` runs"
    if not path.is_file():
        raise UsageError(f"{path} does not exist", hint=hint)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError("not an evsam-export eval.json")
        per_instance, timing = data["per_instance"], data["timing"]
        saved = ("variant", "reference", "annotations", "selection", "prompts", "pipelines", "unavailable", "images")
        fields = {key: data[key] for key in saved}
        fields.update({key: per_instance[key] for key in ("image_ids", "annotation_ids", "areas", "ious")})
        needed = {"file", "pipeline", "prompt", "image_id", "annotation_id"}
        pictures = [p for p in data.get("pictures", []) if isinstance(p, dict) and needed <= p.keys()]
        return Evaluation(**fields, seconds=timing["seconds"], pipeline_seconds=timing["pipeline_seconds"], pictures=pictures)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not an evsam-export eval.json ({type(exc).__name__}: {str(exc)[:80]})", hint=hint) from None


def merge_evaluations(folders: Sequence[Path]) -> Evaluation:
    """The shards of one selection merged into the Evaluation of the whole selection (every shard needed once)."""
    shards = [load_evaluation(folder) for folder in folders]
    first = shards[0]
    same = ("variant", "reference", "prompts", "pipelines")
    for folder, shard in zip(folders, shards):
        differing = [name for name in same if getattr(shard, name) != getattr(first, name)]
        if shard.annotations["sha256"] != first.annotations["sha256"]:
            differing.append("annotations")
        differing += [k for k in ("limit", "seed", "shards", "candidates") if shard.selection.get(k) != first.selection.get(k)]
        if differing:
            raise UsageError(
                f"{folder} is not a shard of the same run as {folders[0]} (differs in {', '.join(differing)})",
                hint="merge the shards of one `evaluate --shard K/N` command line",
            )
    count = first.selection.get("shards")
    if count is None:
        raise UsageError(f"{folders[0]} holds a whole run, not a shard", hint="merge the outputs of --shard K/N runs")
    indices = [i for shard in shards for i in shard.selection["shard_indices"]]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    missing = sorted(set(range(1, count + 1)) - set(indices))
    if repeated:
        raise UsageError(f"shard {repeated[0]}/{count} is given twice", hint="pass each shard's folder once")
    if missing:
        raise UsageError(
            f"shard {missing[0]}/{count} is missing ({len(indices)} of {count} given)", hint="pass every shard's output folder"
        )
    merged = Evaluation(
        variant=first.variant,
        reference=first.reference,
        annotations=first.annotations,
        selection={
            **first.selection,
            "shard_indices": None,
            "shards": None,
            "merged_shards": count,
            "crowd_skipped": sum(s.selection["crowd_skipped"] for s in shards),
        },
        prompts=first.prompts,
        pipelines=first.pipelines,
        unavailable={k: v for s in shards for k, v in s.unavailable.items()},
        images=sum(s.images for s in shards),
        seconds=sum(s.seconds for s in shards),
        pipeline_seconds={
            name: {part: sum(s.pipeline_seconds[name][part] for s in shards) for part in ("encoder", "prompts")} for name in first.pipelines
        },
    )
    for shard in shards:
        merged.image_ids += shard.image_ids
        merged.annotation_ids += shard.annotation_ids
        merged.areas += shard.areas
    merged.ious = {name: {kind: [v for s in shards for v in s.ious[name][kind]] for kind in first.ious[name]} for name in first.pipelines}
    from evsam_export.evaluation.pictures import merged_pictures

    merged_pictures(merged, results(merged), list(zip(map(Path, folders), shards)))
    return merged
