"""`run cpu-auto`: candidates this machine supports, gated, timed, the fastest gated pair recommended; the
Predictor follows the recommendation; a precision the CPU cannot compute is refused before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evsam_export.environment import HIDE_CPU_FLAGS_ENV, cpu_flags
from evsam_export.errors import ArtifactError, RecipeError
from evsam_export.manifest import read_manifest
from evsam_export.pipeline.auto import AUTO_JSON, AUTO_MD, is_auto_recipe, load_auto_recipe
from evsam_export.pipeline.recipe import load_recipe, recipes_dir
from evsam_export.runtime import Predictor
from evsam_export.runtime.choice import choose_artifact

BF16_FLAGS = "avx512_bf16,amx_bf16"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "CI": "1", **(env or {})})


def test_the_shipped_auto_recipe_names_every_cpu_recipe_and_loads_them():
    auto = load_auto_recipe("cpu-auto")
    assert is_auto_recipe("cpu-auto") and auto.suite == "default"
    assert set(auto.candidates) == {"cpu-ort-fp32", "cpu-ort-int8", "cpu-openvino-fp32", "cpu-openvino-bf16", "cpu-openvino-int8"}
    assert "validate.suite=default" in auto.candidate_overrides
    with pytest.raises(RecipeError, match="auto recipe"):
        load_recipe(recipes_dir() / "cpu-auto.toml")


@pytest.mark.parametrize("body, message", [
    ('[recipe]\nname = "a"\n[auto]\ncandidates = []\n', "non-empty list"),
    ('[recipe]\nname = "a"\n[auto]\ncandidates = ["cpu-ort-fp33"]\n', "recipe not found"),
    ('[recipe]\nname = "a"\n[auto]\ncandidates = ["a100-trt-fp16"]\n', "not a CPU target"),
    ('[recipe]\nname = "a"\n[auto]\ncandidates = ["cpu-ort-fp32"]\nruns = 0\n', "runs: must be at least 1"),
    ('[recipe]\nname = "a"\n[auto]\ncandidates = ["cpu-ort-fp32"]\n[export]\nopset = 18\n', "only [recipe], [auto] and [validate]"),
])
def test_bad_auto_recipes_are_refused_before_any_build(tmp_path, body, message):
    path = tmp_path / "auto.toml"
    path.write_text(body)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_auto_recipe(path)


def test_hidden_cpu_flags_are_absent(monkeypatch):
    monkeypatch.setenv(HIDE_CPU_FLAGS_ENV, "avx2, fma")
    flags = cpu_flags()
    assert "avx2" not in flags and "fma" not in flags


def test_bf16_recipe_is_refused_in_one_line_on_a_cpu_without_bf16(tmp_path):
    proc = _cli("run", "cpu-openvino-bf16", "-o", str(tmp_path / "out"), env={HIDE_CPU_FLAGS_ENV: BF16_FLAGS})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "bf16 needs a CPU with avx512_bf16 or amx_bf16" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any export


def test_doctor_says_what_each_recipe_needs_from_the_cpu():
    report = json.loads(_cli("doctor", "--json", env={HIDE_CPU_FLAGS_ENV: BF16_FLAGS}).stdout)
    bf16 = report["recipes"]["cpu-openvino-bf16"]
    assert bf16["cpu_needs"] == "avx512_bf16 or amx_bf16" and not bf16["ready"] and "amx_bf16" in bf16["why_not"]
    assert report["recipes"]["cpu-ort-fp32"]["ready"] and report["recipes"]["cpu-ort-fp32"]["cpu_needs"] == ""
    assert "cpu-openvino-bf16" not in report["recipes"]["cpu-auto"]["candidates_ready"]


def _recommend(folder: Path, encoder: str, decoder: str) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data["recommended"] = {"encoder": encoder, "decoder": decoder}
    path.write_text(json.dumps(data))


def test_predictor_follows_the_recommended_pair_and_says_so(copy_export):
    folder = copy_export("recommended")
    with Predictor(folder) as plain:
        assert plain.info["choice"] == {"encoder": "ranked", "decoder": "ranked"}
    _recommend(folder, "encoder.onnx.fp32", "decoder.onnx.fp32")
    with Predictor(folder) as predictor:
        assert predictor.info["encoder"] == "encoder.onnx.fp32" and predictor.info["choice"]["encoder"] == "recommended"
    manifest = read_manifest(folder)  # a recommendation outside `prefer` is not used, and the reason is kept
    openvino = dataclasses.replace(manifest.artifact("encoder.onnx.fp32"), id="encoder.openvino.fp32", target="openvino")
    manifest.add(openvino)
    manifest.recommended = {"encoder": openvino.id}
    why: dict = {}
    assert choose_artifact(manifest, "encoder", None, ("onnx",), {}, why).id == "encoder.onnx.fp32"
    assert why["encoder"] == "ranked (recommended encoder.openvino.fp32 not usable: target not in prefer)"


def test_a_recommendation_naming_no_artifact_is_a_broken_manifest(copy_export):
    folder = copy_export("bad-recommendation")
    _recommend(folder, "encoder.ort.int8", "decoder.onnx.fp32")
    with pytest.raises(ArtifactError, match="recommended.encoder"):
        read_manifest(folder)


@pytest.mark.full
def test_auto_run_gates_times_and_recommends_a_pair_the_predictor_uses(tmp_path, gate_suite):
    """Two fp32 candidates (the cheapest to build), one timing round: the folder holds both, the fastest gated
    pair passed its own end-to-end gate, and the Predictor runs it."""
    recipe = tmp_path / "auto.toml"
    recipe.write_text(f'[recipe]\nname = "auto-two"\n[auto]\ncandidates = ["cpu-ort-fp32", "cpu-openvino-fp32"]\n'
                      f'runs = 1\nwarmup = 0\n[validate]\nsuite = "{gate_suite}"\n')
    out = tmp_path / "out"
    proc = _cli("run", str(recipe), "-o", str(out), env={"EVSAM_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Recommended:" in proc.stdout and "| cpu-openvino-fp32 | passed |" in proc.stdout
    manifest = read_manifest(out)
    ids = {a.id for a in manifest.artifacts}
    assert {"encoder.ort.fp32", "decoder.ort.fp32", "encoder.openvino.fp32", "decoder.openvino.fp32"} <= ids
    decision = json.loads((out / AUTO_JSON).read_text())
    pair = (manifest.recommended["encoder"], manifest.recommended["decoder"])
    assert decision["pairs_tried"][-1] == {"encoder": pair[0], "decoder": pair[1], "passed": True}
    times = decision["median_ms"]
    assert times[pair[0]]["1 image"] == min(v["1 image"] for k, v in times.items() if k.startswith("encoder"))
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is True
    assert (out / AUTO_MD).is_file() and (out / "candidates" / "cpu-ort-fp32" / "parity.md").is_file()
    with Predictor(out) as predictor:
        assert (predictor.info["encoder"], predictor.info["decoder"]) == pair
        assert predictor.info["choice"] == {"encoder": "recommended", "decoder": "recommended"}
