"""Simplify an exported graph with onnxsim (onnxslim as fallback), then prove it still computes the same.

onnxsim folds the exporter's shape arithmetic and no-op Casts (L0 encoder 860 -> ~470 nodes, docs/runtimes.md "onnxsim and onnxslim");
onnxslim is pure Python and takes over where onnxsim is missing or fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export.contract import ComponentSpec, sample_feeds, trace_feeds
from evsam_export.errors import ExportError
from evsam_export.export.onnx_export import check_contract

SIMPLIFIERS = ("onnxsim", "onnxslim")
EQUIVALENCE_ATOL = 1e-4


@dataclass(frozen=True)
class SimplifyResult:
    tool: str  # onnxsim | onnxslim | none
    nodes_before: int
    nodes_after: int
    max_abs_diff: float
    note: str = ""


def _run_onnxslim(model):
    import onnxslim

    return onnxslim.slim(model)


def ort_outputs(model_or_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model_or_path if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def equivalence_feeds(spec: ComponentSpec) -> list[dict[str, np.ndarray]]:
    """Feeds at more than one dynamic shape, so a simplifier that baked a traced shape is caught."""
    if spec.component == "encoder" or spec.static_prompts:  # --static-prompts: its one shape
        return [trace_feeds(spec, seed=11)]
    return [sample_feeds(spec, batch=1, num_points=2, seed=11), sample_feeds(spec, batch=3, num_points=5, seed=12)]


def max_abs_difference(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for ref_outputs, cand_outputs in zip(reference, candidate):
        for ref, cand in zip(ref_outputs, cand_outputs):
            if ref.shape != cand.shape:
                return float("inf")
            worst = max(worst, float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64)))) if ref.size else 0.0)
    return worst


def _simplify_and_run(name: str, path: Path, candidate_path: Path, spec: ComponentSpec, feeds) -> tuple[int, int, list]:
    """Simplify the graph at `path` with `name`, write it to `candidate_path` and run it there.

    Returns (nodes before, nodes after, outputs per feed). onnxsim goes file to file, so no Python copy of
    the input, no serialized bytes and no second ModelProto sit beside its C++ working copy (same output
    bytes as simplifying a loaded ModelProto); onnxslim needs a ModelProto and drops the original as soon
    as it returns. For xl1 each copy is 0.8 GB (docs/reliability.md, "Export memory")."""
    import gc

    import onnx

    nodes_before = len(onnx.load(str(path)).graph.node)
    gc.collect()
    if name == "onnxsim":
        from onnxsim import simplify

        simplified, ok = simplify(str(path), output_path=str(candidate_path))
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
    else:
        model = onnx.load(str(path))
        simplified = _run_onnxslim(model)
        del model
        gc.collect()
        onnx.save(simplified, str(candidate_path))
    check_contract(simplified, spec)
    nodes_after = len(simplified.graph.node)
    del simplified
    gc.collect()
    return nodes_before, nodes_after, [ort_outputs(candidate_path, f) for f in feeds]


def simplify_graph(path: Path, spec: ComponentSpec, tool: str = "auto") -> SimplifyResult:
    """Simplify the ONNX file at `path` in place; keep the original if no simplifier preserves outputs.

    Each simplifier starts from the file at `path`, which changes only when a candidate passes."""
    order = SIMPLIFIERS if tool == "auto" else (tool,)
    if tool not in ("auto",) + SIMPLIFIERS:
        raise ExportError(f"unknown simplifier {tool!r}", hint="use auto, onnxsim or onnxslim")
    feeds = equivalence_feeds(spec)
    reference = [ort_outputs(path, f) for f in feeds]
    candidate_path = path.with_name(path.name + ".simplified")
    failures = []
    nodes_before = None
    try:
        for name in order:
            try:
                nodes_before, nodes_after, candidate = _simplify_and_run(name, path, candidate_path, spec, feeds)
            except Exception as exc:  # a simplifier failing is expected on some graphs: try the next one
                failures.append(f"{name}: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
                continue
            diff = max_abs_difference(reference, candidate)
            if diff > EQUIVALENCE_ATOL:
                failures.append(f"{name}: outputs moved by {diff:.2e}")
                continue
            candidate_path.replace(path)
            return SimplifyResult(name, nodes_before, nodes_after, diff, "; ".join(failures))
    finally:
        candidate_path.unlink(missing_ok=True)
    if nodes_before is None:  # every simplifier failed before counting
        import onnx

        nodes_before = len(onnx.load(str(path)).graph.node)
    return SimplifyResult("none", nodes_before, nodes_before, 0.0, "; ".join(failures))
