"""The build gate a fallback round runs (fallback.gate_candidate -> StepContext.gate(only_candidates=True) ->
parity.compare(subjects=...)): only the candidate's stages are measured, and a candidate whose encoder stage
already failed gets no end-to-end stage."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

from evsam_export.files import sha256_file
from evsam_export.manifest import read_manifest
from evsam_export.model.variants import get_variant
from evsam_export.parity.gate import ParityGate
from evsam_export.progress import Reporter
from evsam_export.steps import fallback
from evsam_export.steps.step import StepContext


@pytest.fixture(scope="module")
def ctx(copy_export, gate_suite) -> StepContext:
    folder = copy_export("build-gate")
    return StepContext(folder=folder, manifest=read_manifest(folder), variant=get_variant("l0"), reporter=Reporter(quiet=True),
                       suite=str(gate_suite), threads=2, gating=ParityGate())


def candidate(ctx, name: str, scale: float | None):
    """The fp32 encoder under an fp16 id, its embedding multiplied by `scale` (None: unchanged)."""
    parent = ctx.manifest.artifact("encoder.onnx.fp32")
    model = onnx.load(str(ctx.path_of(parent)))
    if scale is not None:
        output = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}.raw" if o == output else o for o in node.output]
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"))
        model.graph.node.append(onnx.helper.make_node("Mul", [f"{output}.raw", "scale"], [output], name="scaled"))
    path = ctx.folder / name
    onnx.save(model, str(path))
    return replace(parent, id="encoder.onnx.fp16", precision="fp16", path=name, sha256=sha256_file(path), parent=parent.id)


def test_a_build_gate_measures_only_the_candidate(ctx):
    good = candidate(ctx, "encoder.same.onnx", None)
    report = ctx.gate([good], only_candidates=True)
    assert {(s.artifact, s.stage) for s in report.stages} == {("encoder.onnx.fp16", "encoder"), ("encoder.onnx.fp16", "end_to_end")}
    assert report.passed and fallback.gate_candidate(ctx, good, suite=ctx.suite).passed
    full = ctx.gate([good])  # the release-style report still measures the fp32 artifacts beside it
    assert {s.artifact for s in full.stages} >= {"encoder.onnx.fp32", "decoder.onnx.fp32", "encoder.onnx.fp16"}


def test_a_candidate_that_failed_its_encoder_stage_stops_there(ctx):
    bad = candidate(ctx, "encoder.scaled.onnx", 0.5)  # 6 dB: below every lower-precision SNR floor
    report = ctx.gate([bad], only_candidates=True)
    assert [(s.artifact, s.stage) for s in report.stages] == [("encoder.onnx.fp16", "encoder")]
    verdict = fallback.gate_candidate(ctx, bad, suite=ctx.suite)
    assert not verdict.passed and verdict.worst["metric"] == "embedding_snr_db.min"
