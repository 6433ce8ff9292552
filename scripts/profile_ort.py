"""Where the time goes: ONNX Runtime's per-node profiler, summed per op type, for encoder graphs.

    python scripts/profile_ort.py out/l0/encoder.fp32.onnx out/l0/encoder.ort.fp32.onnx --plain l0

`--plain VARIANT` adds the plain export of synthetic weights (torch.onnx.export, opset 17, no graph work;
evsam_export.bench.plain_export) as the first column of comparison. Sessions use ORT_ENABLE_ALL like an
app would, so the table shows ORT's own fusions and layout nodes (ReorderInput/ReorderOutput are NCHWc
conversions around ops without a blocked kernel). Run it on a quiet machine; numbers are per image.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def profile(path: Path, threads: int, runs: int, warmup: int = 3) -> tuple[float, dict[str, tuple[float, int]]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "evsam-profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    size = spec.shape[-1]
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(warmup):
        session.run(None, {spec.name: image})
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {spec.name: image})
        latencies.append(time.perf_counter() - started)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            entry = per_op[event["args"]["op_name"]]
            entry[0] += event["dur"] / 1000 / (runs + warmup)
            entry[1] += 1
    return statistics.median(latencies) * 1000, {op: (ms, n // (runs + warmup)) for op, (ms, n) in per_op.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="*", type=Path)
    parser.add_argument("--plain", metavar="VARIANT", help="also profile the plain export of this variant (synthetic:0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    graphs = list(args.graphs)
    scratch = tempfile.TemporaryDirectory()
    if args.plain:
        from evsam_export.bench import plain_export
        from evsam_export.model.checkpoint import load_model
        from evsam_export.model.variants import get_variant

        variant = get_variant(args.plain)
        model, _ = load_model(variant, "synthetic:0")
        graphs.insert(0, plain_export(model, variant, Path(scratch.name)))
    results = {str(path): profile(path, args.threads, args.runs) for path in graphs}
    ops = collections.Counter()
    for _, per_op in results.values():
        for op, (ms, _) in per_op.items():
            ops[op] = max(ops[op], ms)
    names = [Path(p).name if Path(p).parent.name != Path(scratch.name).name else "plain export" for p in results]
    print(f"ONNX Runtime per-op profile, {args.threads} threads, median of {args.runs} runs, ms per image; cores {os.cpu_count()}")
    print("| op type | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for op, _ in ops.most_common(args.top):
        cells = []
        for _, per_op in results.values():
            ms, count = per_op.get(op, (0.0, 0))
            cells.append(f"{ms:.1f} ({count})" if count else "-")
        print(f"| {op} | " + " | ".join(cells) + " |")
    print("| **total (median latency)** | " + " | ".join(f"**{latency:.1f}**" for latency, _ in results.values()) + " |")
    scratch.cleanup()


if __name__ == "__main__":
    main()
