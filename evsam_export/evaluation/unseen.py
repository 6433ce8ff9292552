"""An independent check of a lower-precision artifact pair on unseen synthetic scenes.

The parity gates score an artifact on the suites' images; this check scores it on scenes no gate, calibration
or training ever saw (evsam_export.realistic.UNSEEN_SEED_BASE), through the torch-free runtime
(Predictor) exactly as a user runs it, against the folder's fp32 ONNX pair:

* embedding SNR (dB) of the encoder artifact vs the fp32 encoder, per scene;
* mask IoU vs the fp32 pair, per prompt kind (one prompt per ground-truth object);
* the task score: mIoU against the scenes' ground-truth shapes for both pairs, and the drop in points;
* the encoder's speed against ORT fp32 as a ratio of medians in one alternated run (bench.alternate_calls).

`check_folder` returns the numbers and the verdict against the floors (DONE_WHEN); run it with
`evsam-export unseen FOLDER [--encoder ID] [--decoder ID]` (docs/benchmarks.md has runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export import metrics
from evsam_export.data.scenes import prompts_for

# The floors a lower-precision pair must meet: embedding SNR >= 10 dB, mask IoU vs fp32 >= 0.9 (mean per kind), shape-mIoU drop
# <= 2 points per kind, and an INT8 encoder at least 1.5x faster than ORT fp32.
DONE_WHEN = {"embedding_snr_db_min": 10.0, "mask_iou_vs_fp32_min": 0.9, "miou_drop_points_max": 2.0,
             "int8_encoder_speedup_min": 1.5}
# The kinds an app sends one object at a time; multimask is the point prompt with SAM's best-of-3 selection.
KINDS = ("point", "points_neg", "box", "box_point", "multimask")
FP32_ENCODER, FP32_DECODER = "encoder.onnx.fp32", "decoder.onnx.fp32"


@dataclass
class _Tally:
    iou_vs_fp32: list
    iou_gt_fp32: list
    iou_gt_test: list


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(metrics.mask_iou(a, b))


def lowest_precision_pair(manifest) -> tuple[str, str]:
    """The folder's reduced-precision encoder and decoder that a runtime here can run (the last one built,
    e.g. the fp16 ONNX of a TensorRT build kit), or the fp32 ONNX where a component has none."""
    from evsam_export.runners import RUNTIME_OF_TARGET, availability_of

    def runnable(artifact) -> bool:
        runtime = RUNTIME_OF_TARGET.get(artifact.target)
        return runtime is not None and availability_of(runtime).available

    def pick(component: str, fp32: str) -> str:
        others = [a for a in manifest.artifacts if a.component == component and a.precision != "fp32" and runnable(a)]
        return others[-1].id if others else fp32

    return pick("encoder", FP32_ENCODER), pick("decoder", FP32_DECODER)


def check_folder(folder: Path, encoder: str | None = None, decoder: str | None = None, scenes: int = 8,
                 threads: int = 2, bench_runs: int = 6) -> dict:
    """Score the (encoder, decoder) pair of `folder` against its fp32 ONNX pair on `scenes` unseen scenes."""
    from evsam_export.manifest import read_manifest
    from evsam_export.realistic import UNSEEN_SEED_BASE
    from evsam_export.runtime import Predictor

    manifest = read_manifest(folder)
    default_encoder, default_decoder = lowest_precision_pair(manifest)
    encoder, decoder = encoder or default_encoder, decoder or default_decoder
    reference = Predictor(folder, encoder=FP32_ENCODER, decoder=FP32_DECODER, threads=threads)
    test = Predictor(folder, encoder=encoder, decoder=decoder, threads=threads)
    with reference, test:
        scored = score_pair(reference, test, [UNSEEN_SEED_BASE + i for i in range(scenes)], int(manifest.encoder_size),
                            bench_runs)
    result = {"folder": str(folder), "encoder": encoder, "decoder": decoder, "scenes": scenes, "threads": threads, **scored}
    result["failures"] = failures(result, int8_encoder=encoder.endswith(".int8"))
    return result


@dataclass
class SceneReference:
    """What the fp32 pair produced on one scene: its embeddings and best mask per (kind, object)."""

    seed: int
    embeddings: np.ndarray
    masks: dict  # (kind, object index) -> best mask of the fp32 pair


def reference_scenes(reference, seeds: list[int], encoder_size: int) -> list[SceneReference]:
    """The fp32 pair's outputs on the scenes of `seeds`, to score several test pairs against one reference run."""
    from evsam_export.realistic import scene_for

    out = []
    for index, seed in enumerate(seeds):
        scene = scene_for(seed, encoder_size)
        reference.set_image(scene.rgb)
        masks = {(kind, number): reference.predict(**_prompt_args(kind, scene, truth, index * 64 + number)).best()
                 for kind in KINDS for number, truth in enumerate(scene.masks)}
        out.append(SceneReference(seed, reference.image_embeddings.copy(), masks))
    return out


def _prompt_args(kind: str, scene, truth: np.ndarray, seed: int) -> dict:
    prompt = prompts_for(kind, scene.rgb, (truth,), seed=seed)
    return dict(point_coords=prompt.points, point_labels=prompt.labels,
                box=None if prompt.boxes is None else prompt.boxes[0], multimask_output=prompt.multimask)


def score_pair(reference, test, seeds: list[int], encoder_size: int, bench_runs: int = 6,
               references: list[SceneReference] | None = None) -> dict:
    """Embedding SNR, mask IoU vs the fp32 pair and shape mIoU per prompt kind, and the encoder speed ratio, of
    the `test` Predictor against the `reference` one on the synthetic scenes of `seeds` (one prompt per
    ground-truth object). `references`: reference_scenes() already run for these seeds (then the reference
    Predictor only runs the speed comparison)."""
    from evsam_export import contract
    from evsam_export.bench.timing import alternate_calls, latency_summary
    from evsam_export.model.processing import preprocess_image
    from evsam_export.realistic import scene_for

    references = references or reference_scenes(reference, seeds, encoder_size)
    tallies = {kind: _Tally([], [], []) for kind in KINDS}
    snrs = []
    for index, known in enumerate(references):
        scene = scene_for(known.seed, encoder_size)
        test.set_image(scene.rgb)
        snrs.append(metrics.snr_db(known.embeddings, test.image_embeddings))
        for kind in KINDS:
            for number, truth in enumerate(scene.masks):
                ours = known.masks[(kind, number)]
                theirs = test.predict(**_prompt_args(kind, scene, truth, index * 64 + number)).best()
                tally = tallies[kind]
                tally.iou_vs_fp32.append(_iou(ours, theirs))
                tally.iou_gt_fp32.append(_iou(ours, truth))
                tally.iou_gt_test.append(_iou(theirs, truth))
    image = preprocess_image(scene_for(references[0].seed, encoder_size).rgb, encoder_size)[0]
    feeds = {name: contract.encoder_feeds(p.encoder_spec, image) for name, p in (("fp32", reference), ("test", test))}
    timings = alternate_calls({"fp32": lambda: reference.encoder.infer(feeds["fp32"]),
                               "test": lambda: test.encoder.infer(feeds["test"])}, runs=bench_runs, warmup=1)
    per_kind = {}
    for kind, tally in tallies.items():
        fp32_miou, test_miou = 100 * np.mean(tally.iou_gt_fp32), 100 * np.mean(tally.iou_gt_test)
        summary = metrics.summarize(tally.iou_vs_fp32)
        per_kind[kind] = {"mask_iou_vs_fp32": {"mean": round(summary.mean, 4), "p5": round(summary.p5, 4),
                                               "min": round(summary.min, 4)},
                          "miou_fp32": round(fp32_miou, 2), "miou_test": round(test_miou, 2),
                          "miou_drop_points": round(fp32_miou - test_miou, 2), "objects": len(tally.iou_vs_fp32)}
    fp32_ms, test_ms = latency_summary(timings["fp32"])["median"], latency_summary(timings["test"])["median"]
    return {
        "embedding_snr_db": {"min": round(min(snrs), 2), "median": round(float(np.median(snrs)), 2)},
        "per_kind": per_kind,
        "encoder_ms": {"fp32": round(fp32_ms, 1), "test": round(test_ms, 1), "speedup": round(fp32_ms / test_ms, 2)},
    }


def failures(result: dict, int8_encoder: bool) -> list[str]:
    """The DONE_WHEN floors `result` misses, one line each (empty: it passes)."""
    out = []
    if result["embedding_snr_db"]["min"] < DONE_WHEN["embedding_snr_db_min"]:
        out.append(f"embedding SNR min {result['embedding_snr_db']['min']} dB < {DONE_WHEN['embedding_snr_db_min']}")
    for kind, entry in result["per_kind"].items():
        if entry["mask_iou_vs_fp32"]["mean"] < DONE_WHEN["mask_iou_vs_fp32_min"]:
            out.append(f"{kind}: mask IoU vs fp32 {entry['mask_iou_vs_fp32']['mean']} < {DONE_WHEN['mask_iou_vs_fp32_min']}")
        if entry["miou_drop_points"] > DONE_WHEN["miou_drop_points_max"]:
            out.append(f"{kind}: mIoU drop {entry['miou_drop_points']} points > {DONE_WHEN['miou_drop_points_max']}")
    if int8_encoder and result["encoder_ms"]["speedup"] < DONE_WHEN["int8_encoder_speedup_min"]:
        out.append(f"INT8 encoder {result['encoder_ms']['speedup']}x ORT fp32 < {DONE_WHEN['int8_encoder_speedup_min']}x")
    return out


def record_result(result: dict, record: Path | None, command: str) -> Path | None:
    """The check as one row of docs/benchmarks.md's `unseen-check` table (None when not recording)."""
    from evsam_export.manifest import read_manifest
    from evsam_export.measurements import record_measurement, results_dir

    directory = results_dir(record)
    if directory is None:
        return None
    variant = read_manifest(Path(result["folder"])).variant
    per_kind = result["per_kind"]
    values = {"variant": variant, "encoder": result["encoder"], "decoder": result["decoder"], "scenes": result["scenes"],
              "snr_min_db": snr if np.isfinite(snr := result["embedding_snr_db"]["min"]) else "identical (inf)",
              "mask_iou_vs_fp32_mean": {kind: entry["mask_iou_vs_fp32"]["mean"] for kind, entry in per_kind.items()},
              "miou_drop_points": {kind: entry["miou_drop_points"] for kind, entry in per_kind.items()},
              "encoder_vs_fp32": f"{result['encoder_ms']['speedup']}x", "failures": "; ".join(result["failures"]) or "none"}
    return record_measurement(directory, "unseen-check", f"{variant}-{result['encoder']}-{result['decoder']}", values, command=command,
                              note=f"folder {Path(result['folder']).name}")

