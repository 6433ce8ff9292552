"""Seconds per image of segment everything: our MaskGenerator on an artifact folder against upstream's
`EfficientViTSamAutomaticMaskGenerator` on the same checkpoint's PyTorch model, alternated in one process.

    evsam-export export --variant l0 -o /tmp/seg/l0            # synthetic weights (checkpoint synthetic:0)
    python scripts/bench_segment.py /tmp/seg/l0 --checkpoint synthetic:0 --grid 16 --grid 32 --threads 2 \
        --pred-iou-thresh 0.2 --stability-score-offset 0.1 --stability-score-thresh 0.6 --box-nms-thresh 1.0 \
        --record docs/results
    evsam-export export --variant l0 --checkpoint realistic -o /tmp/seg/l0real   # the trained-decoder test checkpoint
    python scripts/bench_segment.py /tmp/seg/l0real --checkpoint realistic --grid 16 --grid 32 --threads 2 \
        --pred-iou-thresh 0.4 --stability-score-thresh 0.4 --record docs/results

Upstream is the test reference (`pip install --no-deps efficientsam==1.0.0`), run through tests/upstream.py
and the torchvision stand-in of tests/torchvision_shim.py, exactly as tests/export/test_segment.py runs it.
Each round times both generators on a grid size, the order reversed every other round, so load from other
processes hits both alike (`evsam_export.bench.timing.alternate_calls`, no warm-up: a run is minutes); the load
average is sampled around every run. Prints per grid the median seconds
per image of each, their ratio, the mask counts and how many of upstream's masks ours matches (IoU >= 0.95),
and with --record DIR writes one row per grid size to DIR/segment-everything-speed/ (evsam_export.measurements).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = "segment-everything-speed"


def photo(name: str):
    """A scikit-image sample by name (coffee is 600x400), or an image file."""
    import numpy as np

    from evsam_export.model import processing

    if Path(name).is_file():
        from evsam_export.data.images import read_image_file

        return read_image_file(Path(name))
    import skimage.data

    return np.ascontiguousarray(processing.as_rgb_uint8(getattr(skimage.data, name)()))


def matched(reference: list[dict], ours: list[dict], threshold: float = 0.95) -> int:
    """Upstream's masks that one of ours (each used once, the best free one) matches at mask IoU >= threshold."""
    import numpy as np
    from pycocotools import mask as coco_mask

    from evsam_export.runtime.mask_generator import encode_masks

    if not reference or not ours:
        return 0
    rles = [encode_masks(np.asarray([r["segmentation"] for r in records], dtype=bool)) for records in (reference, ours)]
    iou = coco_mask.iou(rles[0], rles[1], [0] * len(ours))  # [reference, ours]
    free = np.ones(len(ours), bool)
    count = 0
    for row in np.asarray(iou).reshape(len(reference), len(ours)):
        candidates = np.where(free, row, -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= threshold:
            free[best] = False
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="artifact folder (evsam-export export of --checkpoint)")
    parser.add_argument("--checkpoint", default="synthetic:0", help="the folder's checkpoint: a .pt, synthetic:SEED or realistic")
    parser.add_argument("--image", default="coffee", help="scikit-image sample name or image file (default coffee, 600x400)")
    parser.add_argument("--grid", type=int, action="append", help="points per side (repeatable; default 16 and 32)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds (each grid on both generators)")
    parser.add_argument("--threads", type=int, default=2, help="threads of ONNX Runtime and of PyTorch")
    parser.add_argument("--decoder", default=None, help="decoder artifact id (default: what `evsam-export segment` picks)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--stability-score-offset", type=float, default=1.0)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--record", type=Path, default=None, help="write result rows under DIR/segment-everything-speed/")
    args = parser.parse_args()

    import pytest
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import torchvision_shim
    from upstream import build_upstream

    from evsam_export.bench.timing import alternate_calls
    from evsam_export.manifest import read_manifest
    from evsam_export.measurements import record_measurement
    from evsam_export.model.checkpoint import load_model
    from evsam_export.model.variants import VARIANTS
    from evsam_export.realistic import resolve_realistic
    from evsam_export.runtime import MaskGenerator, Predictor
    from evsam_export.runtime.choice import segment_decoder

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    grids = args.grid or [16, 32]
    settings = {"pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_score_thresh,
                "stability_score_offset": args.stability_score_offset, "box_nms_thresh": args.box_nms_thresh}
    variant = read_manifest(args.folder).variant
    rgb = photo(args.image)
    decoder = args.decoder or segment_decoder(args.folder)
    predictor = Predictor(args.folder, decoder=decoder, threads=args.threads)
    decoder_ran = predictor.info["split_decoder"] or predictor.decoder_artifact.id
    print(f"{variant} on {args.image} {rgb.shape[1]}x{rgb.shape[0]}, decoder {decoder_ran}, {args.threads} threads, "
          f"settings {settings}", flush=True)

    times: dict = {}
    outputs: dict = {}
    loads: list[float] = []
    with pytest.MonkeyPatch.context() as patch:
        torchvision_shim.patch_upstream(patch)
        from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator

        model, _ = load_model(VARIANTS[variant], resolve_realistic(args.checkpoint, VARIANTS[variant]))
        reference_model = build_upstream(variant, model.state_dict())  # built with the shim's transforms in place
        del model

        def run(grid, name, generate, stages):
            loads.append(os.getloadavg()[0])
            with torch.inference_mode():
                records = generate(rgb)
            loads.append(os.getloadavg()[0])
            outputs[(grid, name)] = (records, stages())
            print(f"{grid}x{grid} {name}: {len(records)} masks", flush=True)

        for grid in grids:
            ours = MaskGenerator(predictor, points_per_side=grid, **settings)
            theirs = EfficientViTSamAutomaticMaskGenerator(reference_model, points_per_side=grid, **settings)
            calls = {
                "ours": partial(run, grid, "ours", ours.generate, lambda ours=ours: dict(ours.last_stats["seconds"])),
                "upstream": partial(run, grid, "upstream", theirs.generate, dict),
            }
            for name, values in alternate_calls(calls, args.rounds, warmup=0).items():
                times[(grid, name)] = [value / 1000.0 for value in values]
                print(f"{grid}x{grid} {name}: {', '.join(f'{v / 1000:.1f}' for v in values)} s", flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
    for grid in grids:
        ours_s = statistics.median(times[(grid, "ours")])
        upstream_s = statistics.median(times[(grid, "upstream")])
        ours_records, stages = outputs[(grid, "ours")]
        upstream_records, _ = outputs[(grid, "upstream")]
        found = matched(upstream_records, ours_records)
        values = {
            "variant": variant,
            "weights": args.checkpoint,
            "thresholds": f"pred IoU {args.pred_iou_thresh:g}, stability {args.stability_score_thresh:g} "
                          f"(offset {args.stability_score_offset:g}), box NMS {args.box_nms_thresh:g}",
            "image": f"{args.image} {rgb.shape[1]}x{rgb.shape[0]}",
            "points": f"{grid}x{grid}",
            "ours_s": round(ours_s, 2),
            "upstream_s": round(upstream_s, 2),
            "speedup": round(upstream_s / ours_s, 2),
            "masks_ours": len(ours_records),
            "masks_upstream": len(upstream_records),
            "matched": found,
            "ours_stage_s": {key: round(value, 2) for key, value in stages.items()},
            "decoder": decoder_ran,
            "threads": args.threads,
            "rounds": args.rounds,
            "load_during": [round(min(loads), 1), round(max(loads), 1)],
        }
        print(f"{grid}x{grid}: ours {ours_s:.1f} s, upstream {upstream_s:.1f} s, {upstream_s / ours_s:.1f}x; masks "
              f"{len(ours_records)} / {len(upstream_records)}, {found} matched; load {min(loads):.1f}-{max(loads):.1f}")
        settings_key = "-".join(f"{''.join(w[0] for w in k.split('_'))}{v:g}" for k, v in settings.items())
        key = f"{variant}-{args.checkpoint}-{args.image}-{grid}x{grid}-{settings_key}"
        note = "ours: MaskGenerator on ONNX Runtime CPU; upstream: EfficientViTSamAutomaticMaskGenerator on PyTorch CPU"
        record_measurement(args.record, TABLE, key, values, command=command, note=note)
    predictor.close()


if __name__ == "__main__":
    main()
