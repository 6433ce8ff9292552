"""Export memory: the PyTorch model is gone before the ONNX-only phases run (the xl1 peak, docs/benchmarks.md)."""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

from evsam_export import api
from evsam_export.model import checkpoint
from evsam_export.progress import Reporter


class ModelWatch(Reporter):
    """Records, at the start of every step, whether any parameter of the loaded PyTorch model is still alive
    (the graph wrappers hold submodules, not the model object, so the model itself says nothing)."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.parameter_refs: list[weakref.ref] = []
        self.alive_at: dict[str, bool] = {}

    @contextmanager
    def step(self, description: str):
        if self.parameter_refs:
            gc.collect()
            self.alive_at[description] = any(ref() is not None for ref in self.parameter_refs)
        with super().step(description):
            yield


def test_export_frees_the_model_before_the_onnx_only_phases(tmp_path, monkeypatch):
    reporter = ModelWatch()
    real_load_model = checkpoint.load_model

    def watched_load_model(*args, **kwargs):
        model, weights = real_load_model(*args, **kwargs)
        reporter.parameter_refs = [weakref.ref(p) for p in model.parameters()]
        return model, weights

    monkeypatch.setattr(checkpoint, "load_model", watched_load_model)
    # Without simplification or passes the export is only tracing and the PyTorch check, the cheapest run
    # in which the check still needs the PyTorch outputs.
    options = api.ExportOptions(simplify="none", graph_passes=())
    result = api.export("l0", tmp_path / "out", options=options, reporter=reporter)

    assert reporter.alive_at["trace decoder to ONNX (opset 17)"] is True
    for component in ("encoder", "decoder"):
        assert reporter.alive_at[f"check {component} against PyTorch"] is False, reporter.alive_at
    for artifact in result.artifacts:
        assert artifact.facts["max_abs_diff_vs_torch"] <= 1e-4, artifact.facts  # the check still compares with PyTorch
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "decoder.fp32.onnx", "decoder_image.fp32.onnx", "decoder_prompt.fp32.onnx", "encoder.fp32.onnx", "manifest.json"]
