"""L0 encoder latency and embedding SNR: OpenVINO fp32 / fp16 / INT8 IR vs ONNX Runtime fp32 vs PyTorch eager.

    python scripts/bench_openvino.py /tmp/ov-l0 --runs 12 --json /tmp/ov-bench.json

FOLDER is an `evsam-export export` folder (fp32 ONNX). Missing OpenVINO IRs are built into FOLDER/bench-openvino/
(the ONNX files are symlinked there; the export's own manifest is not touched). INT8 is built without the
build-time gate, with the base ignored scope plus the fallback groups named by --int8-fp32-groups (default: the
group the parity gate asked for on L0, see evsam_export/targets/openvino.py); its facts are printed.

Method: 2 threads everywhere (INFERENCE_NUM_THREADS=2, PERFORMANCE_HINT=LATENCY, INFERENCE_PRECISION_HINT=f32
for every IR; ORT intra_op=2; torch.set_num_threads(2)); one input (a synthetic scene through the common
preprocessing, not a calibration or suite image); `evsam_export.bench`'s alternation (warm-up, then --runs
rounds in which every runner runs once, the order reversed every other round, so machine noise hits all
alike); median and min per runner. SNR is of the embeddings vs PyTorch fp32. An extra row "openvino fp32
IR, no hint" shows what the CPU plugin picks by itself (bf16 on AVX512_BF16/AMX CPUs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="export folder with encoder.fp32.onnx and manifest.json")
    parser.add_argument("--runs", type=int, default=12, help="alternated timed rounds (>= 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8-subset", type=int, default=16, help="NNCF calibration samples")
    parser.add_argument("--int8-fp32-groups", default="litemla-qkv",
                        help="comma-separated ENCODER_GROUPS kept fp32 on top of the base scope ('' = base scope only)")
    parser.add_argument("--no-unhinted", action="store_true", help="skip the 'no INFERENCE_PRECISION_HINT' row")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def build_irs(folder: Path, args) -> dict:
    """{precision: Artifact} of the encoder IRs, built into folder/bench-openvino when missing."""
    from evsam_export.files import sha256_file
    from evsam_export.manifest import Artifact, read_manifest
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.precision import nncf_int8
    from evsam_export.progress import Reporter
    from evsam_export.steps.step import StepContext
    from evsam_export.targets import openvino as target

    manifest = read_manifest(folder)
    parent = manifest.artifact("encoder.onnx.fp32")
    work = folder / "bench-openvino"
    work.mkdir(exist_ok=True)
    link = work / parent.path
    if not link.exists():
        link.symlink_to((folder / parent.path).resolve())
    ctx = StepContext(folder=work, manifest=manifest, variant=get_variant(manifest.variant), reporter=Reporter(), threads=args.threads,
                      gating=ParityGate())
    groups = [g for g in nncf_int8.ENCODER_GROUPS if g.name in [n.strip() for n in args.int8_fp32_groups.split(",") if n.strip()]]
    import openvino

    # Fallback groups reach NNCF as node names: pass those as exact-name patterns.
    scope = nncf_int8.round_scope(target.Settings(), tuple(groups),
                                  nncf_int8.model_nodes(openvino.Core().read_model(str(folder / parent.path))), "encoder")
    int8_patterns = scope.patterns + tuple(f"^{re.escape(name)}$" for name in scope.names)
    wanted = {
        "fp32": target.Settings(precision="fp32"),
        "fp16": target.Settings(precision="fp16"),
        "int8": target.Settings(precision="int8", calibration_images=args.int8_subset, fp32_patterns=int8_patterns, fallback=False),
    }
    built = {}
    cache = work / "bench-artifacts.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}

    for precision, settings in wanted.items():
        entry = known.get(precision)
        same_settings = entry and entry["settings"] == json.loads(json.dumps(asdict(settings)))
        if same_settings and (work / entry["path"]).is_file() and sha256_file(work / entry["path"]) == entry["sha256"]:
            built[precision] = Artifact.from_json(entry)
            continue
        (artifact,) = target.build(ctx, parent, settings)
        built[precision] = artifact
        known[precision] = artifact.to_json()
        cache.write_text(json.dumps(known, indent=1, default=str))
    return {"work": work, "artifacts": built, "manifest": manifest}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.runs < 10:
        print("--runs must be >= 10", file=sys.stderr)
        return 2
    import openvino as ov
    import torch

    from evsam_export.bench.timing import alternate_calls, latency_summary
    from evsam_export.data.scenes import synthetic_scene
    from evsam_export.environment import cpu_flags, cpu_model, package_versions
    from evsam_export.metrics import compare_tensors
    from evsam_export.model.checkpoint import load_model
    from evsam_export.model.processing import preprocess_image
    from evsam_export.model.sam import EncoderGraph
    from evsam_export.model.variants import get_variant
    from evsam_export.runners.ort_runner import OrtRunner

    irs = build_irs(args.folder, args)
    manifest, work = irs["manifest"], irs["work"]
    variant = get_variant(manifest.variant)
    image = preprocess_image(synthetic_scene(4242, 480, 640).rgb, variant.encoder_size)[0]

    torch.set_num_threads(args.threads)
    model, _ = load_model(variant, manifest.weights["spec"])
    encoder = EncoderGraph(model).eval()
    tensor = torch.from_numpy(image)

    def torch_call():
        with torch.inference_mode():
            return encoder(tensor).numpy()

    core = ov.Core()
    calls = {}
    compiled_precision = {}
    for precision, artifact in irs["artifacts"].items():
        config = {**artifact.facts["compile_config"], "INFERENCE_NUM_THREADS": args.threads}
        compiled = core.compile_model(core.read_model(str(work / artifact.path)), "CPU", config)
        compiled_precision[f"openvino {precision} IR"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        request = compiled.create_infer_request()
        calls[f"openvino {precision} IR"] = (lambda r: lambda: np.asarray(r.infer({"input_image": image})[0]).copy())(request)
    if not args.no_unhinted:
        artifact = irs["artifacts"]["fp32"]
        compiled = core.compile_model(core.read_model(str(work / artifact.path)), "CPU",
                                      {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads})
        compiled_precision["openvino fp32 IR, no hint"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        request = compiled.create_infer_request()
        calls["openvino fp32 IR, no hint"] = (lambda r: lambda: np.asarray(r.infer({"input_image": image})[0]).copy())(request)
    onnx_artifact = manifest.artifact("encoder.onnx.fp32")
    ort_runner = OrtRunner(args.folder / onnx_artifact.path, onnx_artifact.inputs, onnx_artifact.outputs, threads=args.threads).load()
    calls["onnxruntime fp32 ONNX"] = lambda: ort_runner.infer({"input_image": image})["image_embeddings"]
    calls["pytorch eager fp32"] = torch_call

    reference = torch_call()
    outputs = {name: call() for name, call in calls.items()}
    times = alternate_calls(calls, args.runs, args.warmup)
    summary = {name: latency_summary(values) for name, values in times.items()}

    torch_median = summary["pytorch eager fp32"]["median"]
    ort_median = summary["onnxruntime fp32 ONNX"]["median"]
    ov_fp32_median = summary["openvino fp32 IR"]["median"]
    rows = []
    for name in calls:
        median = summary[name]["median"]
        rows.append({
            "runner": name,
            "compiled_precision": compiled_precision.get(name, "-"),
            "median_ms": round(median, 1),
            "min_ms": round(summary[name]["min"], 1),
            "speedup_vs_torch": round(torch_median / median, 2),
            "speedup_vs_ort": round(ort_median / median, 2),
            "speedup_vs_ov_fp32": round(ov_fp32_median / median, 2),
            "snr_db_vs_torch": round(compare_tensors(reference, outputs[name]).snr_db, 2),
        })
    int8 = irs["artifacts"]["int8"]
    result = {
        "command": " ".join(["python", "scripts/bench_openvino.py"] + (argv if argv is not None else sys.argv[1:])),
        "variant": manifest.variant,
        "weights": manifest.weights["spec"],
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "runs": args.runs,
        "packages": package_versions(),
        "int8": {"fake_quantize": int8.facts["fake_quantize"], "ignored_scope": int8.facts["ignored_scope"],
                 "fp32_groups": [n.strip() for n in args.int8_fp32_groups.split(",") if n.strip()],
                 "overflow_fix": int8.facts["overflow_fix"], "calibration_feeds": int8.facts["calibration"]["feeds"]},
        "rows": rows,
        "times_ms": {name: [round(t, 1) for t in values] for name, values in times.items()},
    }
    print(f"{manifest.variant} encoder, {args.threads} threads, {args.runs} alternated runs; CPU {result['cpu']} {result['cpu_flags']}")
    print(f"{'runner':<28} {'precision':>9} {'median ms':>10} {'min ms':>8} {'x torch':>8} {'x ORT':>6} {'x OVfp32':>8} {'SNR dB':>7}")
    for row in rows:
        print(
            f"{row['runner']:<28} {row['compiled_precision']:>9} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} "
            f"{row['speedup_vs_torch']:>8.2f} {row['speedup_vs_ort']:>6.2f} {row['speedup_vs_ov_fp32']:>8.2f} "
            f"{row['snr_db_vs_torch']:>7.1f}"
        )
    print(f"INT8: {result['int8']['fake_quantize']} FakeQuantize, fp32 groups {result['int8']['fp32_groups'] or 'none (base scope)'}, "
          f"overflow_fix {result['int8']['overflow_fix']['resolved']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
