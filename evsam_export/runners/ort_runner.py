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
        self._windowed: dict[tuple[str, str], tuple | None] = {}  # (first, output) -> (session, grid, scale, rows only)
        self._tail_models: dict[str, object] = {}  # first -> the staged tail's ModelProto (windowed_subgraph rewrites it)

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

    def _infer_staged(self, feeds: dict[str, np.ndarray], first: str, rows_needed, window: dict) -> dict[str, np.ndarray]:
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
        kept = np.flatnonzero(rows)
        if len(kept) < batch:
            tail_feeds = {name: value[kept] for name, value in tail_feeds.items()}
        windowed = self._windowed_tail(first, window, tail_feeds) if len(kept) else None
        computed = None
        if len(kept) and windowed is not None:
            session, name, grid_window = windowed
            tail_feeds[WINDOW_INPUT] = np.asarray(grid_window, np.int64)
            computed = dict(zip(tail_names, session.run(tail_names, tail_feeds)))
        elif len(kept):
            computed = dict(zip(tail_names, tail.run(tail_names, tail_feeds)))
        for name in tail_names:
            out = None if computed is None else computed[name]
            spec = next(o for o in self.outputs if o.name == name)
            if out is not None and len(kept) == batch and out.shape[1:] == self._declared_row(spec, out.shape[1:]):
                results[name] = out
                continue
            row = self._row_shape(name, spec.shape) if out is None else self._declared_row(spec, out.shape[1:])
            full = np.zeros((batch, *row), spec.dtype if out is None else out.dtype)
            if out is not None and out.shape[1:] == row:
                full[kept] = out
            elif out is not None:  # the windowed output: its top-left corner
                full[(kept, ..., slice(0, out.shape[-2]), slice(0, out.shape[-1]))] = out
            results[name] = full
        return results

    def _windowed_tail(self, first: str, window: dict, tail_feeds: dict[str, np.ndarray]) -> tuple | None:
        """(session, output, grid window) computing only `window` of the tail's one output it names, or None:
        no window asked, the whole output asked, or the tail has no windowed form (windowed_subgraph) whose
        window matches the whole tail's (checked once per graph, on the first call's tail_feeds)."""
        staged = self._staged.get(first)
        if not window or staged is None:
            return None
        tail = staged[1]
        names = [name for name in window if name in {o.name for o in tail.get_outputs()}]
        if len(names) != 1:
            return None
        name = names[0]
        key = (first, name)
        if key not in self._windowed:
            self._windowed[key] = self._build_windowed_tail(first, name, tail_feeds)
        built = self._windowed[key]
        if built is None:
            return None
        session, grid, scale, rows_only = built
        rows, cols = (int(size) for size in window[name])
        grid_window = (min(grid[0], -(-rows // scale)), grid[1] if rows_only else min(grid[1], -(-cols // scale)))
        return None if grid_window == tuple(grid) else (session, name, grid_window)

    def _build_windowed_tail(self, first: str, name: str, feeds: dict[str, np.ndarray]):
        import onnxruntime as ort

        shaped = windowed_subgraph(self._tail_models[first], name)
        if shaped is None:
            return None
        model, grid, scale = shaped
        session = ort.InferenceSession(model.SerializeToString(), self._options(), providers=self.providers)
        # The rewrite holds only if every op from the grid to the output is local to its grid cell: compare a
        # window short of the grid's edges with the whole tail's output, on this call's inputs. A graph whose
        # later reshapes fix the number of columns (a simplifier folds them to constants) windows rows only.
        tail = self._staged[first][1]
        feeds = {name: value[:1] for name, value in feeds.items()}
        whole = dict(zip([o.name for o in tail.get_outputs()], tail.run(None, feeds)))[name]
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failing probe is an answer, not an error to print
        for probe, rows_only in (((max(1, grid[0] - 3), max(1, grid[1] - 5)), False), ((max(1, grid[0] - 3), grid[1]), True)):
            try:
                probe_feeds = {**feeds, WINDOW_INPUT: np.asarray(probe, np.int64)}
                part = dict(zip([o.name for o in session.get_outputs()], session.run(None, probe_feeds, quiet)))[name]
            except Exception:  # noqa: BLE001, S112 - e.g. a Reshape to a constant number of columns
                continue
            expected = whole[..., : probe[0] * scale, : probe[1] * scale]
            if part.shape == expected.shape and np.allclose(part, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max())):
                return session, grid, scale, rows_only
        return None

    @staticmethod
    def _declared_row(spec: TensorSpec, computed: tuple[int, ...]) -> tuple[int, ...]:
        """One row's shape as declared (fixed axes) or as computed (named axes)."""
        return tuple(dim if isinstance(dim, int) else size for dim, size in zip(spec.shape[1:], computed))

    def _staged_sessions(self, first: str):
        """(head, tail, cut tensors) sessions for infer_staged, built once per `first` (None: not split)."""
        if first not in self._staged:
            parts = staged_subgraphs(self.path, first)
            sessions = None
            if parts is not None:
                import onnxruntime as ort

                head, tail, boundary = parts
                self._tail_models[first] = tail
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
        self._windowed = {}
        self._tail_models = {}


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


# The int64 [2] input a windowed tail takes: the grid rows and columns to compute (windowed_subgraph).
WINDOW_INPUT = "evsam_grid_window"


def windowed_subgraph(tail, output: str) -> tuple[object, tuple[int, int], int] | None:
    """A copy of the staged tail `tail` that computes only a top-left window of `output`'s last two axes:
    (model, grid (S1, S2), scale k), or None when the tail has not this shape: it lays exactly one of its inputs,
    a token tensor [B, S1*S2, C], out with one Reshape as a grid [B, S1, S2, C'] or with the rows merged into
    the batch, [B*S1, S2, C'], and `output` is a Reshape to [..., k*S1, k*S2]. The copy slices the grid to
    WINDOW_INPUT's (rows, cols), or the merged layout's tokens to the first rows (cols must then be S2), and
    reshapes `output` to k times them. Its window equals the whole tail's only if every op between is local
    to its grid cell, as in SAM's mask upscaling (stride-2 2x2 transposed convolutions, per-pixel LayerNorm
    and GELU, per-pixel mask dot products); the graph does not say so, so OrtRunner compares the two on its
    first call's inputs before using it."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(tail)
    graph = model.graph
    typed = {v.name: v for v in (*onnx.shape_inference.infer_shapes(model, data_prop=True).graph.value_info,
                                 *graph.input, *graph.output)}

    def dims(name: str) -> list:
        if name not in typed or not typed[name].type.tensor_type.HasField("shape"):
            return []
        return [d.dim_value if d.HasField("dim_value") else None for d in typed[name].type.tensor_type.shape.dim]

    nodes = list(graph.node)
    inputs = {i.name for i in graph.input}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t) for node in nodes
                      if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
    producers = {name: node for node in nodes for name in node.output}

    def target(reshape) -> list:
        """A Reshape's output dims: inferred, else read from a Concat of constants (None where not known)."""
        inferred = dims(reshape.output[0])
        if inferred and None not in inferred[1:]:
            return inferred
        concat = producers.get(reshape.input[1])
        if concat is None or concat.op_type != "Concat":
            return inferred
        parts = [constants[name].reshape(-1).tolist() if name in constants else [None] for name in concat.input]
        return [value for part in parts for value in part]

    grids, merged = [], []
    for node in nodes:
        if node.op_type == "Reshape" and node.input[0] in inputs:
            tokens, laid_out = dims(node.input[0]), target(node)
            if len(tokens) != 3 or tokens[1] is None:
                continue
            if len(laid_out) == 4 and None not in laid_out[1:3] and laid_out[1] * laid_out[2] == tokens[1]:
                grids.append(node)  # [B, S1, S2, C]
            elif len(laid_out) == 3 and laid_out[1] and tokens[1] % laid_out[1] == 0:
                merged.append(node)  # [B*S1, S2, C]: the rows merged into the batch (a simplifier's fused Reshapes)
    ends = [node for node in nodes if output in node.output]
    out_dims = dims(output)
    if len(grids) + len(merged) != 1 or len(ends) != 1 or ends[0].op_type != "Reshape" or len(out_dims) < 3 or None in out_dims[-2:]:
        return None
    end_node = ends[0]
    if grids:
        grid_node = grids[0]
        grid = tuple(target(grid_node)[1:3])
    else:
        grid_node = merged[0]
        cols = target(grid_node)[1]
        grid = (dims(grid_node.input[0])[1] // cols, cols)
    scale = out_dims[-1] // grid[1]
    if out_dims[-2] != scale * grid[0] or out_dims[-1] != scale * grid[1] or scale < 1:
        return None
    if any(opset.domain in ("", "ai.onnx") and opset.version < 13 for opset in model.opset_import):
        return None  # Slice with tensor starts/ends and Reshape as used below

    def const(name: str, values: list[int]):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    prefix = "evsam_window/"
    sliced = prefix + "grid"
    if grids:  # slice the grid's rows and columns
        for node in nodes:
            for index, name in enumerate(node.input):
                if name == grid_node.output[0]:
                    node.input[index] = sliced
        cut = [const(prefix + "zeros", [0, 0]), const(prefix + "axes", [1, 2]),
               helper.make_node("Slice", [grid_node.output[0], prefix + "zeros", WINDOW_INPUT, prefix + "axes"], [sliced])]
    else:  # rows only: the first rows*S2 tokens (WINDOW_INPUT's columns must be S2)
        tokens_name = grid_node.input[0]
        grid_node.input[0] = sliced
        cut = [const(prefix + "zero", [0]), const(prefix + "one", [1]), const(prefix + "row_tokens", [grid[1]]),
               helper.make_node("Slice", [WINDOW_INPUT, prefix + "zero", prefix + "one"], [prefix + "rows"]),
               helper.make_node("Mul", [prefix + "rows", prefix + "row_tokens"], [prefix + "tokens"]),
               helper.make_node("Slice", [tokens_name, prefix + "zero", prefix + "tokens", prefix + "one"], [sliced])]
    reshaped = [const(prefix + "scale", [scale]), const(prefix + "start", [0]), const(prefix + "lead_end", [-2]),
                helper.make_node("Mul", [WINDOW_INPUT, prefix + "scale"], [prefix + "size"]),
                helper.make_node("Slice", [end_node.input[1], prefix + "start", prefix + "lead_end"], [prefix + "lead"]),
                helper.make_node("Concat", [prefix + "lead", prefix + "size"], [prefix + "shape"], axis=0)]
    end_node.input[1] = prefix + "shape"
    ordered = []
    for node in nodes:
        if node is end_node:
            ordered.extend(reshaped)
        if node is grid_node and not grids:
            ordered.extend(cut)
        ordered.append(node)
        if node is grid_node and grids:
            ordered.extend(cut)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.input.append(helper.make_tensor_value_info(WINDOW_INPUT, TensorProto.INT64, [2]))
    for value in graph.output:
        if value.name == output:
            shape = value.type.tensor_type.shape.dim
            shape[-2].dim_param, shape[-1].dim_param = "window_rows", "window_cols"
    return model, grid, scale
