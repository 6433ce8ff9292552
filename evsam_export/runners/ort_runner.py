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
        self._pruned: dict[tuple[str, ...], object] = {}  # outputs fetched -> the session that computes them
        self._staged: dict[str, tuple | None] = {}  # infer_staged's first output -> (head, tail, cut) sessions

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

    def _infer_staged(self, feeds: dict[str, np.ndarray], first: str, rows_needed) -> dict[str, np.ndarray]:
        staged = self._staged_sessions(first)
        if staged is None:
            return self._infer(feeds)
        head, tail, boundary = staged
        head_names = [o.name for o in head.get_outputs()]
        head_out = dict(zip(head_names, head.run(head_names, {i.name: feeds[i.name] for i in head.get_inputs()})))
        gate = head_out[first]
        rows = np.asarray(rows_needed(gate), dtype=bool).reshape(-1)
        batch = gate.shape[0]
        available = {**feeds, **head_out}
        tail_feeds = {name: available[name] for name in boundary}
        if rows.shape != (batch,) or any(value.shape[:1] != (batch,) for value in tail_feeds.values()):
            rows = np.ones(batch, bool)  # a cut tensor without the rows on axis 0: compute every row
        tail_names = [o.name for o in tail.get_outputs()]
        results = {first: gate}
        if rows.all():
            results.update(zip(tail_names, tail.run(tail_names, tail_feeds)))
            return results
        kept = np.flatnonzero(rows)
        computed = tail.run(tail_names, {name: value[kept] for name, value in tail_feeds.items()}) if len(kept) else None
        for index, name in enumerate(tail_names):
            spec = next(o for o in self.outputs if o.name == name)
            out = computed[index] if computed is not None else None
            full = np.zeros((batch, *(out.shape[1:] if out is not None else self._row_shape(name, spec.shape))),
                            out.dtype if out is not None else np.dtype(spec.dtype))
            if out is not None:
                full[kept] = out
            results[name] = full
        return results

    def _staged_sessions(self, first: str):
        """(head, tail, cut tensors) sessions for infer_staged, built once per `first` (None: not split)."""
        if first not in self._staged:
            parts = staged_subgraphs(self.path, first)
            sessions = None
            if parts is not None:
                import onnxruntime as ort

                head, tail, boundary = parts
                sessions = (ort.InferenceSession(head.SerializeToString(), self._options(), providers=self.providers),
                            ort.InferenceSession(tail.SerializeToString(), self._options(), providers=self.providers),
                            boundary)
            self._staged[first] = sessions
        return self._staged[first]

    @staticmethod
    def _row_shape(name: str, shape) -> tuple[int, ...]:
        """One row's shape of a declared output when no row was computed (every other axis fixed)."""
        row = tuple(shape[1:])
        if not all(isinstance(dim, int) for dim in row):
            raise RuntimeError(f"{name}: no row computed and its row shape {list(row)} is not fixed")
        return row

    def concurrent(self) -> OrtRunner | None:
        # One session's run() is thread-safe; with one intra-op thread each call computes on its caller's thread.
        if self.providers != ["CPUExecutionProvider"]:
            return None
        return OrtRunner(self.path, self.inputs, self.outputs, f"{self.label} (one thread per call)", self.providers, 1,
                         self.optimization)

    def _close(self) -> None:
        self.session = None
        self._pruned = {}
        self._staged = {}


# Graphs above this size are never pruned in memory: a ModelProto cannot serialize past 2 GB, and only the
# decoder (~20 MB) is ever asked for a subset of its outputs.
PRUNE_MAX_BYTES = 1 << 30


def _model_to_cut(path: Path):
    """The ONNX model at `path` to take apart in memory, or None without `onnx` or past PRUNE_MAX_BYTES."""
    try:
        import onnx
    except ImportError:
        return None
    if Path(path).stat().st_size > PRUNE_MAX_BYTES:
        return None
    return onnx.load(str(path))


def outputs_subgraph(path: Path, names) -> object | None:
    """The model at `path` keeping only the outputs `names` and the nodes they depend on (inputs unchanged,
    so the same feeds work); None when `onnx` is not installed, the file is too large, or nothing is pruned."""
    model = _model_to_cut(path)
    if model is None:
        return None
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


def staged_subgraphs(path: Path, first: str) -> tuple[object, object, list[str]] | None:
    """The model at `path` cut in two for Runner.infer_staged: a head computing `first` (and every tensor the rest
    reads from it), a tail computing the other outputs from the cut tensors, whose rows (axis 0) can then be
    a subset. Shape arithmetic that crosses the cut is recomputed in the tail from its own inputs, so a tail
    run on fewer rows reshapes for them. None when `onnx` is not installed, the file is too large, nothing is
    left for the tail, or a cut tensor is not a float tensor of known rank."""
    model = _model_to_cut(path)
    if model is None:
        return None
    import onnx
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}

    def ancestors(names) -> set[int]:
        found, stack, seen = set(), list(names), set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            index = producer.get(name)
            if index is not None and index not in found:
                found.add(index)
                stack.extend(i for i in nodes[index].input if i)
        return found

    rest = [o.name for o in graph.output if o.name != first]
    head = ancestors([first])
    tail = ancestors(rest) - head
    if not tail or len(rest) == len(graph.output):
        return None
    typed = {v.name: v for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input, *graph.output)}

    def is_float(name: str) -> bool:
        return name in typed and typed[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    initializers = {i.name for i in graph.initializer}
    # The tail takes over the producers of every non-float tensor it reads from the head, up to float tensors,
    # and its own copy of each constant the head shares with it.
    stack = [name for index in tail for name in nodes[index].input]
    while stack:
        name = stack.pop()
        index = producer.get(name)
        if index is not None and index not in tail and (not is_float(name) or not nodes[index].input):
            tail.add(index)
            stack.extend(nodes[index].input)
    boundary: list[str] = []
    for index in sorted(tail):
        for name in nodes[index].input:
            if name and name not in initializers and producer.get(name) not in tail and name not in boundary:
                boundary.append(name)
    for name in boundary:
        shape = typed[name].type.tensor_type.shape if name in typed else None
        if not is_float(name) or shape is None or len(shape.dim) == 0:
            return None

    def part(indices: set[int], inputs: list[str], outputs: list[str]):
        kept = [nodes[i] for i in sorted(indices)]
        used = {name for node in kept for name in node.input}
        part_graph = helper.make_graph(kept, graph.name, [typed[n] for n in inputs], [typed[n] for n in outputs],
                                       [i for i in graph.initializer if i.name in used])
        return helper.make_model(part_graph, opset_imports=model.opset_import, ir_version=model.ir_version)

    graph_inputs = [i.name for i in graph.input]
    head_used = {name for i in head for name in nodes[i].input}
    head_model = part(head, [n for n in graph_inputs if n in head_used],
                      [first, *(n for n in boundary if producer.get(n) in head and n != first)])
    return head_model, part(tail, boundary, rest), boundary
