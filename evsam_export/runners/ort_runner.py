"""ONNX Runtime runner (CPU by default; any provider list)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evsam_export.manifest import TensorSpec
from evsam_export.runners.base import Availability, Runner


def ort_availability() -> Availability:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Availability(False, f"{exc} (pip install onnxruntime)")
    return Availability(True, version=ort.__version__)


class OrtRunner(Runner):
    runtime = "onnxruntime"

    def __init__(
        self,
        path: Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        label: str | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        optimization: str = "all",
    ) -> None:
        super().__init__(inputs, outputs, label or Path(path).name)
        self.path = Path(path)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.optimization = optimization
        self.session = None

    def _load(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.path), self._options(), providers=self.providers)
        self._pruned: dict[tuple[str, ...], object] = {}

    def _options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        levels = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options.graph_optimization_level = levels[self.optimization]
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return options

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))

    def _infer_outputs(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        # ORT runs every node of a session whatever outputs are fetched (measured: the `sam` decoder's in-graph
        # upscale of 4 tokens to 1024x1024 still ran), so a strict subset runs on a session of only its nodes.
        return dict(zip(names, self.session_for(names).run(names, feeds)))

    def session_for(self, names) -> object:
        """The session that computes `names`: the whole graph's, or one pruned to the nodes `names` depend on
        (same nodes, same weights, so the same values), built once per output set. Pruning needs the `onnx`
        package; without it, or when nothing would be pruned, the whole graph runs."""
        key = tuple(names)
        if key not in self._pruned:
            all_outputs = [o.name for o in self.session.get_outputs()]
            pruned = None
            if set(key) != set(all_outputs):
                model = outputs_subgraph(self.path, key)
                if model is not None:
                    import onnxruntime as ort

                    pruned = ort.InferenceSession(model.SerializeToString(), self._options(), providers=self.providers)
            self._pruned[key] = pruned or self.session
        return self._pruned[key]

    def _close(self) -> None:
        self.session = None
        self._pruned = {}


# Graphs above this size are never pruned in memory: a ModelProto cannot serialize past 2 GB, and only the
# decoder (~20 MB) is ever asked for a subset of its outputs.
PRUNE_MAX_BYTES = 1 << 30


def outputs_subgraph(path: Path, names) -> object | None:
    """The model at `path` keeping only the outputs `names` and the nodes they depend on (inputs unchanged,
    so the same feeds work); None when `onnx` is not installed, the file is too large, or nothing is pruned."""
    try:
        import onnx
    except ImportError:
        return None
    if Path(path).stat().st_size > PRUNE_MAX_BYTES:
        return None
    model = onnx.load(str(path))
    graph = model.graph
    needed = set(names)
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    if len(kept) == len(graph.node):
        return None
    kept_outputs = [o for o in graph.output if o.name in set(names)]
    del graph.output[:]
    graph.output.extend(sorted(kept_outputs, key=lambda o: list(names).index(o.name)))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = {name for node in kept for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model
