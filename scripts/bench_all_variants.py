"""Speed of every CPU artifact kind for every variant, against PyTorch eager and the plain export, in one run each.

    python scripts/bench_all_variants.py --output /tmp/bench-all --variants l0,l1,l2,xl0,xl1 --runs 10

Per variant (synthetic weights: speed does not depend on weight values): `evsam-export export`, then the
artifacts of every CPU target built next to it with the target modules directly —

    encoder.onnx.fp32     the export (portable graph passes)        ORT
    encoder.ort.fp32      ORT target: + ORT passes, offline-optimized ORT
    encoder.onnx.fp16     fp16 with fp32 islands                     ORT (CPU runs it through casts)
    encoder.ort.int8      static QDQ, Conv only                      ORT
    encoder.openvino.*    IR fp32 / fp16, NNCF INT8                  OpenVINO (explicit precision hint)

— and `evsam_export.bench.run_bench` times them all *alternated*, with the PyTorch eager and plain-export
baselines, and writes bench.json / bench.png / bench.md per variant. The INT8 and fp16 artifacts here are
built WITHOUT the parity gate (`fallback=False`): this measures what each precision costs; which artifact
passes its gate is what the recipe runs in docs/benchmarks.md record. `--int8-fp32-groups` builds the ORT
INT8 graph a gated fallback ended with instead (e.g. encoder-neck-pointwise for l0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(folder: Path, threads: int, calibration_images: int, int8_groups: list[str], skip: set[str]) -> dict:
    from evsam_export.manifest import read_manifest
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.precision import fp16, ort_int8
    from evsam_export.progress import Reporter
    from evsam_export.steps.step import StepContext
    from evsam_export.targets import openvino, ort

    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant(manifest.variant),
                      reporter=Reporter(interactive=False), threads=threads, gating=ParityGate())
    encoder, decoder = manifest.artifact("encoder.onnx.fp32"), manifest.artifact("decoder.onnx.fp32")
    groups = {g.name: g for g in ort_int8.INT8_GROUPS}
    kept = tuple(r.name for name in int8_groups for r in groups[name].regions)
    seconds = {}
    jobs = [
        ("ort-fp32", lambda: ort.build(ctx, encoder, ort.Settings()) + ort.build(ctx, decoder, ort.Settings())),
        ("onnx-fp16", lambda: fp16.build(ctx, encoder, fp16.Settings(fallback=False))),
        ("ort-int8", lambda: ort_int8.build(ctx, encoder, ort_int8.Settings(
            fallback=False, calibration_images=calibration_images, fp32_regions=ort_int8.FP32_REGIONS + kept))),
        ("openvino-fp32", lambda: openvino.build(ctx, encoder, openvino.Settings(precision="fp32"))
         + openvino.build(ctx, decoder, openvino.Settings(precision="fp32"))),
        ("openvino-fp16", lambda: openvino.build(ctx, encoder, openvino.Settings(precision="fp16"))),
        ("openvino-int8", lambda: openvino.build(ctx, encoder, openvino.Settings(
            precision="int8", fallback=False, calibration_images=calibration_images))),
    ]
    for name, job in jobs:
        if name in skip:
            continue
        started = time.perf_counter()
        try:
            for artifact in job():
                manifest.add(artifact)
        except Exception as exc:  # one failed build (e.g. calibration memory at 1024 px) must not stop the table
            seconds[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"{folder.name} {name}: {seconds[name]}", flush=True)
            continue
        seconds[name] = round(time.perf_counter() - started, 1)
        manifest.write(folder)
    return seconds


def markdown(result, build_s: dict) -> str:
    torch = {t.workload: t.median_ms for t in result.timings if t.subject == "pytorch-eager"}
    plain = {t.workload: t.median_ms for t in result.timings if t.subject == "plain-onnx"}
    lines = [f"| {result.variant} artifact | workload | median ms | p90 | items/s | vs PyTorch | vs plain export | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in result.timings:
        vs_torch = f"{torch[t.workload] / t.median_ms:.2f}x" if t.workload in torch else "-"
        vs_plain = f"{plain[t.workload] / t.median_ms:.2f}x" if t.component == "encoder" and t.workload in plain else "-"
        lines.append(f"| {t.subject} | {t.component} {t.workload} | {t.median_ms:.1f} | {t.p90_ms:.1f} | {t.per_second:.2f} | "
                     f"{vs_torch} | {vs_plain} | {t.peak_rss_mb if t.peak_rss_mb is not None else '-'} |")
    lines.append(f"\nbuild seconds: {json.dumps(build_s)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("/tmp/bench-all"))
    parser.add_argument("--variants", default="l0,l1,l2,xl0,xl1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration-images", type=int, default=8,
                        help="INT8 calibration images (ORT's percentile calibration holds every image's activations)")
    parser.add_argument("--int8-fp32-groups", default="")
    parser.add_argument("--skip", default="", help="build jobs to skip, comma-separated (e.g. onnx-fp16,openvino-int8)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-artifact peak-RSS subprocesses")
    parser.add_argument("--memory-only", action="store_true",
                        help="re-measure peak RSS of the artifacts of an earlier run (its bench.json) and rewrite bench.json/bench.md")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="also write result files (encoder-latency, prompts, build-steps) under DIR, e.g. docs/results "
                             "(default $EVSAM_RESULTS_DIR, unset: none)")
    args = parser.parse_args()
    from evsam_export.measurements import record_measurement, results_dir

    record_dir = results_dir(args.record)

    from evsam_export.bench.run import run_bench
    from evsam_export.bench.tables import chart, table
    from evsam_export.bench.timing import BenchResult, Timing, peak_rss_mb

    for variant in args.variants.split(","):
        folder = args.output / variant
        if args.memory_only:
            data = json.loads((folder / "bench.json").read_text())
            fields = set(Timing.__dataclass_fields__)
            result = BenchResult(folder, data["variant"], data["threads"], machine=data["machine"],
                                 timings=[Timing(**{k: v for k, v in t.items() if k in fields}) for t in data["timings"]])
            peaks = {}
            for timing in result.timings:
                if timing.peak_rss_mb is not None or timing.subject.startswith("encoder.") or timing.subject.startswith("decoder."):
                    if timing.subject not in peaks:
                        peaks[timing.subject] = peak_rss_mb(folder, timing.subject, args.threads)
                    timing.peak_rss_mb = peaks[timing.subject]
            (folder / "bench.json").write_text(json.dumps({**result.to_json(), "build_s": data.get("build_s", {})}, indent=2) + "\n")
            text = markdown(result, data.get("build_s", {}))
            (folder / "bench.md").write_text(text + "\n")
            print(text, flush=True)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evsam_export.cli", "export", "--variant", variant, "--output", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
        build_s = {"export": round(time.perf_counter() - started, 1)}
        build_s.update(build(folder, args.threads, args.calibration_images,
                             [g for g in args.int8_fp32_groups.split(",") if g], set(filter(None, args.skip.split(",")))))
        result = run_bench(folder, threads=args.threads, runs=args.runs, warmup=args.warmup, memory=not args.no_memory)
        (folder / "bench.json").write_text(json.dumps({**result.to_json(), "build_s": build_s}, indent=2) + "\n")
        chart(result, folder / "bench.png")
        text = markdown(result, build_s)
        (folder / "bench.md").write_text(text + "\n")
        print(table(result), flush=True)
        print(text, flush=True)
        if record_dir is not None:
            from evsam_export.bench.tables import result_rows, weights_label

            for table_name, key, values in result_rows(result):
                ungated = ".int8" in key or ".fp16" in key
                record_measurement(record_dir, table_name, key, values, note="ungated fp16/INT8 builds" if ungated else "")
            record_measurement(record_dir, "build-steps", variant, {"variant": variant, "weights": weights_label(result.weights),
                                                                    **{f"{step}_s": seconds for step, seconds in build_s.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
