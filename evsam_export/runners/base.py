"""One Runner contract for every runtime, so validators and benchmarks compare any two.

    with runner:                       # load() ... close()
        runner.input_metadata()        # the IO contract it was built for (TensorSpec list)
        outputs = runner.infer(feeds)  # dict name -> np.ndarray, after the base class checked the feeds
        runner.infer(feeds, outputs=["low_res_masks"])  # only the outputs the caller reads

The base class checks every feed against the declared inputs (names, dtype, rank, fixed dims), as
Polygraphy's runners do, so a wrong prompt shape fails with one line instead of deep inside a runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from evsam_export.contract import APP_IMAGE_SHAPE, TensorSpec
from evsam_export.errors import UsageError


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # why not, when unavailable ("No module named 'tensorrt'", "no CUDA GPU")
    version: str | None = None


class Runner(ABC):
    runtime: str = "?"

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], label: str) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.label = label
        self.loaded = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def load(self) -> Runner:
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def close(self) -> None:
        if self.loaded:
            self._close()
            self.loaded = False

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inference ---------------------------------------------------------------------------------
    def input_metadata(self) -> list[TensorSpec]:
        return list(self.inputs)

    def infer(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on checked feeds; `outputs` names the outputs wanted (default all), so a runtime that can skip
        fetching the others (ONNX Runtime) does not hand them back."""
        if not self.loaded:
            self.load()
        declared = [t.name for t in self.outputs]
        wanted = declared if outputs is None else list(outputs)
        unknown = [name for name in wanted if name not in declared]
        if unknown:
            raise UsageError(f"{self.label}: no output named {unknown}", hint=f"outputs are {declared}")
        checked = check_feeds(self.inputs, feeds, self.label)
        results = self._infer(checked) if outputs is None else self._infer_outputs(checked, wanted)
        missing = [name for name in wanted if name not in results]
        if missing:
            raise RuntimeError(f"{self.label}: runtime returned no {missing}")
        return {name: np.asarray(results[name]) for name in wanted}

    def infer_staged(self, feeds: dict[str, np.ndarray], first: str, rows_needed: Callable[[np.ndarray], np.ndarray],
                     window: dict[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
        """Every output, `first` computed before the rest: rows_needed(first's value) -> bool per row (dim 0)
        says for which rows the other outputs are wanted; rows not wanted may hold zeros. window: for an output
        name, (rows, cols) of its last two axes that the caller reads ([..., :rows, :cols]); outside them it may
        hold zeros. Runtimes that cannot run part of a graph compute every row and pixel (the default)."""
        if not self.loaded:
            self.load()
        if first not in [t.name for t in self.outputs]:
            raise UsageError(f"{self.label}: no output named {first!r}", hint=f"outputs are {[t.name for t in self.outputs]}")
        unknown = sorted(set(window or {}) - {t.name for t in self.outputs})
        if unknown:
            raise UsageError(f"{self.label}: window for unknown outputs {unknown}", hint=f"outputs are {[t.name for t in self.outputs]}")
        results = self._infer_staged(check_feeds(self.inputs, feeds, self.label), first, rows_needed, window or {})
        return {t.name: np.asarray(results[t.name]) for t in self.outputs}

    def _infer_staged(self, feeds: dict[str, np.ndarray], first: str, rows_needed, window: dict) -> dict[str, np.ndarray]:
        return self._infer(feeds)

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _infer_outputs(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Only `names`: runtimes that can fetch a subset override this; the others compute everything."""
        return self._infer(feeds)

    def concurrent(self) -> Runner | None:
        """A runner of the same graph that several threads may call at once, each call computing on its
        caller's thread (N callers keep N cores busy without a shared thread pool handing work between them),
        or None where the runtime has no such mode. The caller loads and closes it."""
        return None

    def _close(self) -> None:  # noqa: B027 - optional hook: most runtimes free everything on garbage collection
        pass


def describe_layout(spec: TensorSpec) -> str:
    """The spec's shape, with the layout named for a raw image input ("[image_height, image_width, 3] (HWC RGB, no batch)")."""
    shape = str(list(spec.shape))
    return shape + " (HWC RGB, no batch axis)" if tuple(spec.shape) == APP_IMAGE_SHAPE else shape


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    """Feeds in spec order with the declared dtype; one UsageError line for the first mismatch."""
    names = [spec.name for spec in specs]
    unknown = sorted(set(feeds) - set(names))
    missing = [name for name in names if name not in feeds]
    if missing or unknown:
        raise UsageError(
            f"{label}: feed names do not match (missing {missing}, unexpected {unknown})",
            hint=f"inputs are {names}",
        )
    checked = {}
    for spec in specs:
        array = np.asarray(feeds[spec.name])
        if spec.dtype == "uint8" and array.dtype != np.uint8:
            # Casting would wrap or truncate: a preprocessed float image fed to an app encoder must be refused.
            raise UsageError(
                f"{label}: {spec.name} has dtype {array.dtype} {list(array.shape)}, expected uint8 {describe_layout(spec)}",
                hint="feed the raw RGB pixels (HWC uint8); the graph resizes, normalises and pads itself",
            )
        if array.ndim != len(spec.shape):
            raise UsageError(
                f"{label}: {spec.name} has shape {list(array.shape)}, expected rank {len(spec.shape)} {describe_layout(spec)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise UsageError(f"{label}: {spec.name} has shape {list(array.shape)}, expected {describe_layout(spec)} (axis {axis})")
        if array.dtype != np.dtype(spec.dtype):
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise UsageError(f"{label}: {spec.name} has dtype {array.dtype}, expected {spec.dtype}")
            array = array.astype(spec.dtype)
        checked[spec.name] = np.ascontiguousarray(array)
    return checked
