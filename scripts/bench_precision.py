"""ONNX Runtime CPU latency of one encoder: fp32 (export and ORT target), fp16 with fp32 islands, INT8 Conv-only QDQ.

    evsam-export export -o /tmp/p-l0                       # synthetic weights are fine for speed
    python scripts/bench_precision.py /tmp/p-l0 --threads 2 --runs 12

Builds encoder.fp16.onnx and encoder.ort.int8.onnx (and, with --int8-fp32-groups, the INT8 graph a
fallback ended with) next to a link to the fp32 graph in a scratch folder (the export folder is not
touched; no parity gate: this measures speed), then times the sessions with `evsam_export.bench`'s
alternation (warm-up, then one run of each per round, the order reversed every other round), so load from
other processes on a busy machine hits them all alike. Prints median / p10 / p90 per precision, the ratio
of medians against fp32, embedding SNR against fp32, and the CPU flags that decide INT8 and fp16 speed
(VNNI, AVX-512, F16C).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path


def build_variants(folder: Path, scratch: Path, calibration_images: int, threads: int,
                   fallback_groups: list[str], int8_options: dict) -> tuple[dict[str, Path], str, dict]:
    from evsam_export.manifest import read_manifest
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.precision import fp16, ort_int8
    from evsam_export.progress import Reporter
    from evsam_export.steps.step import StepContext
    from evsam_export.targets import ort

    manifest = read_manifest(folder)
    encoder = manifest.artifact("encoder.onnx.fp32")

    def context(sub: str) -> StepContext:
        (scratch / sub).mkdir()
        (scratch / sub / encoder.path).symlink_to((folder / encoder.path).resolve())
        return StepContext(folder=scratch / sub, manifest=manifest, variant=get_variant(manifest.variant),
                           reporter=Reporter(interactive=False), threads=threads, gating=ParityGate())

    ctx = context("main")
    half = fp16.build(ctx, encoder, fp16.Settings(fallback=False))[0]
    int8 = ort_int8.build(ctx, encoder, ort_int8.Settings(calibration_images=calibration_images, fallback=False,
                                                         **int8_options))[0]
    # "fp32-ort": the ORT target's fp32 artifact (its graph passes, e.g. FastGelu, which the INT8 graph
    # also gets): the fair fp32 baseline for INT8 on ORT.
    ort_fp32 = ort.build(ctx, encoder, ort.Settings())[0]
    paths = {"fp32": ctx.path_of(encoder), "fp32-ort": ctx.path_of(ort_fp32), "fp16": ctx.path_of(half), "int8": ctx.path_of(int8)}
    structure = {"fp16_islands": half.facts["fp32_islands"]["fp32_by_op_type"], "int8_qdq": int8.facts["qdq"]}
    if fallback_groups:  # the INT8 graph a fallback would end with: these groups' convs kept fp32
        groups = {g.name: g for g in ort_int8.INT8_GROUPS}
        kept_regions = tuple(r.name for name in fallback_groups for r in groups[name].regions)
        settings = ort_int8.Settings(calibration_images=calibration_images, fallback=False,
                                     fp32_regions=ort_int8.FP32_REGIONS + kept_regions, **int8_options)
        ctx = context("fallback")
        kept = ort_int8.build(ctx, encoder, settings)[0]
        paths["int8-fb"] = ctx.path_of(kept)
        structure["int8-fb_qdq"] = kept.facts["qdq"]
        structure["int8-fb_fp32_groups"] = fallback_groups
    return paths, manifest.variant, structure


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="artifact folder from `evsam-export export`")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=12, help="timed runs per precision, alternated (default 12, min 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per precision first (default 2)")
    parser.add_argument("--calibration-images", type=int, default=8, help="INT8 calibration images (default 8)")
    parser.add_argument("--int8-fp32-groups", default="",
                        help="also time INT8 with these ort_int8.INT8_GROUPS kept fp32, comma-separated "
                             "(e.g. encoder-neck-pointwise: what a fallback ended with)")
    parser.add_argument("--calibrate-method", default="percentile", help="INT8 activation ranges: minmax, percentile, entropy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.runs < 10:
        parser.error("--runs must be at least 10")

    from evsam_export.bench.timing import alternate_calls, latency_summary
    from evsam_export.data.calibration import encoder_calibration_feeds
    from evsam_export.environment import cpu_flags, cpu_model, package_versions
    from evsam_export.metrics import snr_db

    scratch = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    try:
        started = time.perf_counter()
        groups = [g for g in args.int8_fp32_groups.split(",") if g]
        paths, variant, structure = build_variants(args.folder, scratch, args.calibration_images, args.threads, groups,
                                                   {"calibrate_method": args.calibrate_method})
        build_s = time.perf_counter() - started
        feeds = encoder_calibration_feeds(variant, 1, seed=123, photos=False)[0]  # held out from calibration
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
        times = alternate_calls({name: partial(s.run, None, feeds) for name, s in sessions.items()}, args.runs, args.warmup)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    summary = {name: latency_summary(values) for name, values in times.items()}
    median = {name: values["median"] for name, values in summary.items()}
    results = {
        "command": shlex.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "variant": variant,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "runs": args.runs,
        "versions": {k: v for k, v in package_versions(("onnxruntime", "onnx", "numpy")).items()},
        "build_s": round(build_s, 1),
        "ms": {name: {key: round(summary[name][key], 1) for key in ("median", "p10", "p90")} for name in times},
        "speedup_vs_fp32": {name: round(median["fp32"] / median[name], 2) for name in times},
        "speedup_vs_fp32_ort": {name: round(median["fp32-ort"] / median[name], 2) for name in times},
        "snr_db_vs_fp32": {name: round(snr_db(outputs["fp32"], outputs[name]), 1) for name in times if name != "fp32"},
        "structure": structure,
    }
    print(f"{results['cpu']} flags={','.join(results['cpu_flags'])} threads={args.threads} runs={args.runs} (alternated)")
    print(f"{'precision':<10}{'median ms':>11}{'p10':>9}{'p90':>9}{'x fp32':>9}{'x fp32-ort':>11}{'SNR dB':>9}")
    for name in times:
        row = results["ms"][name]
        snr = results["snr_db_vs_fp32"].get(name, float("inf"))
        print(f"{name:<10}{row['median']:>11.1f}{row['p10']:>9.1f}{row['p90']:>9.1f}{results['speedup_vs_fp32'][name]:>9.2f}"
              f"{results['speedup_vs_fp32_ort'][name]:>11.2f}{snr:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
