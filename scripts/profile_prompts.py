"""Prompt latency as an app waits for it: `Predictor.predict` against the plain upstream decoder graph.

    python scripts/profile_prompts.py out/l0 --threads 2 --runs 10 [--single-graph]

One process, one 1024x768 photo, one click (multimask) and 16 boxes in one call (one mask each); the
predictor and the plain decoder graph (`evsam_export.bench.plain_decoder_export` of the folder's weights)
are alternated on the same embeddings and tokens, so the ratios hold even on a shared machine. The
predictor rows split into its decoder call and its host post-processing (`Prediction.meta`). The predictor runs
the split decoder when the folder has it; --single-graph alternates a second one on the single graph.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    from evsam_export.bench.baselines import plain_decoder_export
    from evsam_export.bench.run import PREDICTOR, PREDICTOR_SINGLE_GRAPH, prompt_bench, prompt_ratios
    from evsam_export.environment import cpu_flags
    from evsam_export.manifest import read_manifest
    from evsam_export.model.checkpoint import load_model
    from evsam_export.model.variants import get_variant

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decoder", help="decoder artifact id for the predictor (default: its own choice)")
    parser.add_argument("--single-graph", action="store_true",
                        help="also alternate a predictor forced onto the single-graph decoder (split_decoder=False)")
    args = parser.parse_args()
    manifest = read_manifest(args.folder)
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = load_model(get_variant(manifest.variant), manifest.weights["spec"])
        plain = plain_decoder_export(model, Path(scratch))
        del model
        options = {"decoder": args.decoder} if args.decoder else {}
        predictors = {PREDICTOR: options}
        if args.single_graph:
            predictors[PREDICTOR_SINGLE_GRAPH] = {**options, "split_decoder": False}
        timings = prompt_bench(args.folder, plain, args.threads, args.runs, args.warmup, predictors=predictors)
    print(f"{manifest.variant}, {args.threads} threads, median of {args.runs} alternated runs; cpu flags {' '.join(cpu_flags())}")
    print("| workload | subject | median ms | p90 ms | prompt sets/s |")
    print("|---|---|---:|---:|---:|")
    for t in timings:
        print(f"| {t.workload} | {t.subject} | {t.median_ms:.1f} | {t.p90_ms:.1f} | {t.per_second:.1f} |")
    for workload, ratio in prompt_ratios(timings).items():
        for name in predictors:
            prefix = "" if name == PREDICTOR else f"{name}:"
            print(f"{workload}: {name} {ratio[prefix + 'predictor_vs_plain']:.2f}x the plain decoder graph's speed; "
                  f"host post-processing {100 * ratio[prefix + 'host_share']:.0f}% of its time")


if __name__ == "__main__":
    main()
