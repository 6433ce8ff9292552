"""Where the time goes: ONNX Runtime's per-node profiler, summed per op type, for encoder or decoder graphs.

    python scripts/profile_ort.py out/l0/encoder.fp32.onnx out/l0/encoder.ort.fp32.onnx --plain l0
    python scripts/profile_ort.py out/l0/decoder.fp32.onnx --plain-decoder l0     # one call of 16 boxes

`--plain VARIANT` adds the plain export of synthetic weights (torch.onnx.export, opset 17, no graph work;
evsam_export.bench.plain_export) as the first column of comparison. Sessions use ORT_ENABLE_ALL like an
app would, so the table shows ORT's own fusions and layout nodes (ReorderInput/ReorderOutput are NCHWc
conversions around ops without a blocked kernel). The graphs are timed alternated (`evsam_export.bench`),
so machine noise hits them alike; still, run it on a quiet machine. Numbers are per call (one image, or 16 boxes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from evsam_export import contract


def profiled_session(path: Path, threads: int, tag: str):
    """An ORT session that records every node's kernel time, and the random image its input takes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    # One prefix per session: ORT names a trace by prefix and start second, and these sessions start together.
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"evsam-profile-{os.getpid()}-{tag}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if contract.POINT_COORDS in names:  # a decoder: one call of 16 box prompt sets
        rng = np.random.default_rng(0)
        coords = np.sort(rng.uniform(0, 1000, (16, 2, 2)), axis=1).astype(np.float32)
        labels = np.tile(np.array([[contract.LABEL_BOX_TOP_LEFT, contract.LABEL_BOX_BOTTOM_RIGHT]], np.float32), (16, 1))
        embeddings = rng.standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32)
        return session, contract.decoder_feeds(names, embeddings, coords, labels, original_size=(768, 1024))
    spec = session.get_inputs()[0]
    size = spec.shape[-1]
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return session, {spec.name: image}


def per_op_times(session, calls: int) -> dict[str, tuple[float, int]]:
    """{op type: (ms per image, nodes)} from the session's profile of `calls` runs; ends the profiling."""
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            entry = per_op[event["args"]["op_name"]]
            entry[0] += event["dur"] / 1000 / calls
            entry[1] += 1
    return {op: (ms, n // calls) for op, (ms, n) in per_op.items()}


def profile(paths: list[Path], threads: int, runs: int, warmup: int) -> dict[str, tuple[float, dict[str, tuple[float, int]]]]:
    """{path: (median ms, per-op times)}, every graph timed by `evsam_export.bench`'s alternation."""
    from evsam_export.bench.timing import alternate_calls, latency_summary

    sessions = {str(path): profiled_session(path, threads, str(index)) for index, path in enumerate(paths)}
    times = alternate_calls({name: partial(session.run, None, feeds) for name, (session, feeds) in sessions.items()}, runs, warmup)
    return {name: (latency_summary(times[name])["median"], per_op_times(session, runs + warmup))
            for name, (session, _) in sessions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="*", type=Path)
    parser.add_argument("--plain", metavar="VARIANT", help="also profile the plain export of this variant (synthetic:0)")
    parser.add_argument("--plain-decoder", metavar="VARIANT", help="also profile upstream's decoder as traced (bench.plain_decoder_export)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per graph first (their kernel times are averaged in)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    graphs = list(args.graphs)
    scratch = tempfile.TemporaryDirectory()
    if args.plain_decoder:
        from evsam_export.bench.baselines import plain_decoder_export
        from evsam_export.model.checkpoint import load_model
        from evsam_export.model.variants import get_variant

        model, _ = load_model(get_variant(args.plain_decoder), "synthetic:0")
        graphs.insert(0, plain_decoder_export(model, Path(scratch.name)))
    if args.plain:
        from evsam_export.bench.baselines import plain_export
        from evsam_export.model.checkpoint import load_model
        from evsam_export.model.variants import get_variant

        variant = get_variant(args.plain)
        model, _ = load_model(variant, "synthetic:0")
        graphs.insert(0, plain_export(model, variant, Path(scratch.name)))
    results = profile(graphs, args.threads, args.runs, args.warmup)
    ops = collections.Counter()
    for _, per_op in results.values():
        for op, (ms, _) in per_op.items():
            ops[op] = max(ops[op], ms)
    names = [Path(p).name if Path(p).parent.name != Path(scratch.name).name else "plain export" for p in results]
    print(f"ONNX Runtime per-op profile, {args.threads} threads, median of {args.runs} runs, ms per call; cores {os.cpu_count()}")
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
