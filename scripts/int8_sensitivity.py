"""Which part of an encoder INT8 hurts: quantize one fallback group at a time, measure the embedding SNR.

    EVSAM_CACHE_DIR=... python scripts/int8_sensitivity.py FOLDER [--groups encoder-neck,encoder-early-stages]

FOLDER is a `cpu-ort-int8` recipe output (its manifest holds the INT8 step's settings, so the same
calibration ranges are reused from the cache: no recalibration). For each ort_int8.INT8_GROUPS encoder
group, and for "ungrouped" (the Convs no group names), the encoder is quantized with *only* those Convs in
INT8 and every other Conv fp32; "all" quantizes every Conv the recipe would. The SNR of each against the
fp32 graph on the calibration-gate suite's images says where the error comes from and what it costs
(Conv count). The fallback order in ort_int8.INT8_GROUPS was chosen from this kind of table on l0; run
this with real weights before trusting that order for another variant.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a cpu-ort-int8 recipe output folder")
    parser.add_argument("--groups", default="", help="comma-separated INT8_GROUPS names (default: every encoder group; "
                                                       "'all' alone: only the every-Conv row)")
    parser.add_argument("--calibrate-method", help="override the recipe's ranges: minmax, percentile, entropy "
                                                   "(a new calibration, then cached)")
    parser.add_argument("--percentile", type=float, help="override the recipe's percentile")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort

    from evsam_export.calibration.images import load_image_spec
    from evsam_export.manifest import read_manifest
    from evsam_export.model.processing import preprocess_image
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.metrics import snr_db
    from evsam_export.parity.suites import load_suite
    from evsam_export.progress import Reporter
    from evsam_export.precision import ort_int8
    from evsam_export.pipeline.step import StepContext
    from evsam_export.pipeline.fallback import GATE_SUITE, graph_nodes

    manifest = read_manifest(args.folder)
    variant = get_variant(manifest.variant)
    parent = manifest.artifact("encoder.onnx.fp32")
    overrides = {"calibrate_method": args.calibrate_method, "percentile": args.percentile}
    settings = ort_int8.Settings(**{**manifest.artifact("encoder.ort.int8").settings, "fallback": False,
                                    **{k: v for k, v in overrides.items() if v is not None}})
    convs = [(name, op) for name, op in graph_nodes(args.folder / parent.path) if op in settings.op_types_to_quantize]
    wanted = [g for g in args.groups.split(",") if g]
    groups = {g.name: g for g in ort_int8.INT8_GROUPS if not wanted or g.name in wanted}
    unknown = set(wanted) - set(groups) - {"all"}
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {[g.name for g in ort_int8.INT8_GROUPS]}")
    selected = {name: set(g.select(convs)) for name, g in groups.items()}
    selected = {name: nodes for name, nodes in selected.items() if nodes}
    if not wanted:
        grouped = set().union(*selected.values())
        selected["ungrouped"] = {name for name, _ in convs} - grouped
    selected["all"] = {name for name, _ in convs}

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    images = [load_image_spec(spec) for spec in load_suite(GATE_SUITE).images]
    feeds = [{"input_image": preprocess_image(image.rgb, variant.encoder_size)[0]} for image in images]

    def embeddings(path: Path) -> list[np.ndarray]:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [session.run(None, feed)[0] for feed in feeds]

    reference = embeddings(args.folder / parent.path)
    ranges = settings.calibrate_method + (f" {settings.percentile}" if settings.calibrate_method == "percentile" else "")
    print(f"{manifest.variant} ({ranges} ranges): {len(convs)} {'/'.join(settings.op_types_to_quantize)} nodes; SNR vs fp32 on "
          f"{len(images)} {GATE_SUITE} images (min / mean dB); only the named Convs INT8")
    for name, quantized in selected.items():
        work = Path(tempfile.mkdtemp(prefix="int8-sensitivity-"))
        try:
            (work / parent.path).symlink_to((args.folder / parent.path).resolve())
            ctx = StepContext(folder=work, manifest=manifest, variant=variant, reporter=Reporter(quiet=True), threads=args.threads)
            keep_fp32 = tuple(f"^{re.escape(node)}$" for node, _ in convs if node not in quantized)
            started = time.perf_counter()
            artifact = ort_int8.build(ctx, parent, replace(settings, exclude_patterns=settings.exclude_patterns + keep_fp32))[0]
            snrs = [snr_db(r, t) for r, t in zip(reference, embeddings(ctx.path_of(artifact)))]
            print(f"  {name:28s} {artifact.facts['qdq']['quantized'].get('Conv', 0):4d} Conv INT8   "
                  f"SNR {min(snrs):6.2f} / {np.mean(snrs):6.2f} dB   ({time.perf_counter() - started:.0f} s, "
                  f"ranges reused: {artifact.facts['calibration']['ranges_reused']})", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
