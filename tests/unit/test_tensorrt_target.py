"""TensorRT target without TensorRT: profiles from the declared IO, the trtexec build kit (run end to end with
a fake trtexec), refusal of the SAM decoder profile, and the Python API build path against a stub `tensorrt`
module that records every call (what CI can check without a GPU)."""

from __future__ import annotations

import enum
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from evsam_export.errors import ExportError, RecipeError
from evsam_export.export.onnx_export import decoder_spec, encoder_spec
from evsam_export.files import sha256_file
from evsam_export.manifest import Artifact, Manifest, TensorSpec, read_manifest, verify_artifact_file
from evsam_export.model.variants import get_variant
from evsam_export.parity.gate import ParityGate
from evsam_export.progress import Reporter
from evsam_export.runners.base import Availability
from evsam_export.steps.step import StepContext
from evsam_export.targets import tensorrt as trt_target
from evsam_export.targets import tensorrt_engine as trt_engine

VARIANT = get_variant("l0")
SHAPE_FLAGS = ("--minShapes", "--optShapes", "--maxShapes")


# -- fixtures ----------------------------------------------------------------------------------------------------
def tiny_onnx(path: Path) -> None:
    """Any small valid ONNX: the kit only copies it, the fake trtexec never reads it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y]))
    onnx.save(model, str(path))


def onnx_artifact(folder: Path, spec, precision: str = "fp32", path: Path | None = None) -> Artifact:
    path = path or folder / f"{spec.component}.{precision}.onnx"
    if not path.exists():
        tiny_onnx(path)
    return Artifact(
        id=f"{spec.component}.onnx.{precision}", component=spec.component, target="onnx", precision=precision,
        path=path.relative_to(folder).as_posix(), sha256=sha256_file(path), size_bytes=path.stat().st_size,
        inputs=list(spec.inputs), outputs=list(spec.outputs),
    )


def make_ctx(folder: Path) -> StepContext:
    manifest = Manifest(variant=VARIANT.name, encoder_size=VARIANT.encoder_size, weights={}, model={})
    return StepContext(folder=folder, manifest=manifest, variant=VARIANT, reporter=Reporter(quiet=True), gating=ParityGate())


@pytest.fixture()
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, as on CI


@pytest.fixture()
def kit_folder(tmp_path, no_tensorrt) -> Path:
    """Encoder and tensorrt-profile decoder both kit-only, the way the recipe runner drives the step."""
    ctx = make_ctx(tmp_path)
    for spec in (encoder_spec(VARIANT), decoder_spec("tensorrt")):
        parent = onnx_artifact(tmp_path, spec)
        ctx.manifest.add(parent)
        for artifact in trt_target.build(ctx, parent, trt_target.Settings()):
            ctx.manifest.add(artifact)
    ctx.manifest.write(tmp_path)
    return tmp_path


FAKE_TRTEXEC = r"""#!/usr/bin/env bash
# records its argv, writes the --saveEngine file, prints trtexec-like banner lines
if [[ "${1:-}" == "--help" ]]; then
  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_CODE}] [b1] # trtexec --help"
  exit 0
fi
engine=""
for arg in "$@"; do
  case "$arg" in --saveEngine=*) engine="${arg#--saveEngine=}" ;; esac
done
printf '%s\n' "$@" > "$FAKE_TRTEXEC_RECORD/$engine.argv"
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_CODE}] [b1] # trtexec $*"
echo "[11/25/2026-10:00:00] [I] Selected Device: NVIDIA A100-SXM4-80GB"
echo "[11/25/2026-10:00:00] [I] Compute Capability: 8.0"
if [[ -n "${FAKE_TRTEXEC_FAIL:-}" ]]; then echo "[E] Error[4]: simulated parser failure"; exit 3; fi
printf 'ENGINE' > "$engine"
"""


def run_kit(folder: Path, tmp_path: Path, code: str = "101601", *args: str, fail: bool = False, with_trtexec: bool = True):
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    (bindir / "trtexec").write_text(FAKE_TRTEXEC)
    (bindir / "trtexec").chmod(0o755)
    record = tmp_path / f"record-{code}"
    record.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TRTEXEC", "FAKE_TRTEXEC_FAIL")}
    env.update(FAKE_TRT_CODE=code, FAKE_TRTEXEC_RECORD=str(record), PATH=(f"{bindir}:" if with_trtexec else "") + "/usr/bin:/bin")
    if fail:
        env["FAKE_TRTEXEC_FAIL"] = "1"
    result = subprocess.run(["bash", str(folder / "tensorrt-kit" / "build_engines.sh"), *args],
                            env=env, capture_output=True, text=True)
    return result, record


def fragment_command(path: Path) -> list[str]:
    """The trtexec argv of a *.trtexec.sh file, parsed back with shlex (line continuations joined)."""
    text = path.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("run_build "))
    tokens = shlex.split(line)
    return tokens[tokens.index("$TRTEXEC"):]


def shape_flags(argv: list[str]) -> dict[str, dict[str, list[int]]]:
    """{'--minShapes': {name: dims}, ...} from a trtexec argv."""
    found = {}
    for token in argv:
        flag, _, value = token.partition("=")
        if flag in SHAPE_FLAGS:
            pairs = (item.rsplit(":", 1) for item in value.split(","))
            found[flag] = {name: [int(d) for d in dims.split("x")] for name, dims in pairs}
    return found


# -- (a) profiles from the declared IO -----------------------------------------------------------------------------
def test_encoder_profile_from_declared_io(tmp_path):
    profiles = trt_target.profiles_for(onnx_artifact(tmp_path, encoder_spec(VARIANT)), trt_target.Settings())
    size = VARIANT.encoder_size
    assert profiles == {"input_image": ((1, 3, size, size), (1, 3, size, size), (16, 3, size, size))}


def test_decoder_profiles_share_named_axes_and_keep_fixed_dims(tmp_path):
    spec = decoder_spec("tensorrt")
    settings = trt_target.Settings()
    profiles = trt_target.profiles_for(onnx_artifact(tmp_path, spec), settings)
    # every input with a named axis has a profile; the fully static image_embeddings needs none
    dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
    assert set(profiles) == dynamic == {"point_coords", "point_labels", "mask_input", "has_mask_input"}
    for k in range(3):
        coords, labels = profiles["point_coords"][k], profiles["point_labels"][k]
        assert coords[:2] == labels  # same B (prompt sets) and N (points) for both inputs
        assert coords[0] == settings.decoder_prompts[k] and coords[1] == settings.decoder_points[k]
        assert profiles["mask_input"][k][0] == profiles["has_mask_input"][k][0]  # one mask_batch axis
    assert [profiles["mask_input"][k][0] for k in range(3)] == [1, 1, settings.decoder_prompts[2]]
    # fixed dims are exactly the declared ones
    by_name = {t.name: t.shape for t in spec.inputs}
    for name, shapes in profiles.items():
        for shape in shapes:
            assert len(shape) == len(by_name[name])
            assert all(got == want for got, want in zip(shape, by_name[name], strict=True) if isinstance(want, int))


def test_settings_normalise_toml_lists_and_refuse_bad_ranges():
    settings = trt_target.Settings(encoder_batch=[1, 4, 8], mask_batch=[1, 1, 8])
    assert settings.encoder_batch == (1, 4, 8) and settings.axis_ranges()["mask_batch"] == (1, 1, 8)
    for bad in ({"encoder_batch": (4, 2, 8)}, {"decoder_points": (0, 2, 4)}, {"hardware_compatibility": "turing"},
                {"builder_optimization_level": 6}, {"workspace_gib": 0}):
        with pytest.raises(RecipeError) as caught:
            trt_target.Settings(**bad)
        assert caught.value.field == next(iter(bad))  # the field path reaches the recipe's message


def test_unknown_dynamic_axis_is_refused(tmp_path):
    artifact = onnx_artifact(tmp_path, encoder_spec(VARIANT))
    artifact.inputs = [TensorSpec("input_image", "float32", ("images", 3, 512, 512))]
    with pytest.raises(ExportError, match="'images'"):
        trt_target.profiles_for(artifact, trt_target.Settings())


# -- (b) the build kit -----------------------------------------------------------------------------------------------
def test_kit_commands_match_manifest_profiles(kit_folder):
    manifest = read_manifest(kit_folder)
    kits = [a for a in manifest.artifacts if a.target == "tensorrt"]
    assert [a.id for a in kits] == ["encoder.tensorrt.fp32", "decoder.tensorrt.fp32"]
    for entry in kits:
        assert entry.facts["kit_only"] is True and entry.path == "tensorrt-kit/build_engines.sh"
        verify_artifact_file(kit_folder, entry)  # the recorded sha256 is the file's
        argv = fragment_command(kit_folder / entry.facts["script"])
        stored = shlex.split(entry.facts["commands"][0])
        # the script runs the stored command, except trtexec -> $TRTEXEC and the 10.x/11.x strong-typing switch
        assert argv[1:] == ["$STRONGLY_TYPED_FLAG" if t == "--stronglyTyped" else t for t in stored[1:]]
        flags = shape_flags(argv)
        assert set(flags) == set(SHAPE_FLAGS)
        profiles = entry.facts["profiles"]
        for flag, key in zip(SHAPE_FLAGS, ("min", "opt", "max"), strict=True):
            assert flags[flag] == {name: p[key] for name, p in profiles.items()}
        dynamic = {t.name for t in entry.inputs if any(isinstance(d, str) for d in t.shape)}
        assert set(profiles) == dynamic
        for banned in ("--fp16", "--int8", "--best"):
            assert banned not in argv
        assert "--noTF32" in argv and "--skipInference" in argv
        assert f"--saveEngine={Path(entry.facts['engine']).name}" in argv


def test_kit_scripts_pass_bash_syntax_check(kit_folder):
    kit = kit_folder / "tensorrt-kit"
    for script in [kit / "build_engines.sh", *kit.glob("*.trtexec.sh")]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(kit / "build_engines.sh", os.X_OK)


def test_kit_driver_is_the_same_for_any_set_of_components(tmp_path, no_tensorrt):
    """The recipe runner caches and restores each step's files; a driver that differed per component set
    would come back from one step's cache describing another run, and stale sha256s would fail validate."""
    texts = []
    for name, spec in (("enc", encoder_spec(VARIANT)), ("dec", decoder_spec("tensorrt"))):
        folder = tmp_path / name
        folder.mkdir()
        trt_target.build(make_ctx(folder), onnx_artifact(folder, spec), trt_target.Settings())
        texts.append((folder / "tensorrt-kit" / "build_engines.sh").read_bytes())
    assert texts[0] == texts[1]


@pytest.mark.parametrize("code, strongly_typed", [("101601", True), ("110400", False)])
def test_kit_runs_end_to_end_with_fake_trtexec(kit_folder, tmp_path, code, strongly_typed):
    result, record = run_kit(kit_folder, tmp_path, code)
    assert result.returncode == 0, result.stderr
    kit = kit_folder / "tensorrt-kit"
    manifest = read_manifest(kit_folder)
    for entry in (a for a in manifest.artifacts if a.target == "tensorrt"):
        engine = kit_folder / entry.facts["engine"]
        assert engine.read_bytes() == b"ENGINE"
        assert str(engine) in result.stdout
        argv = (record / f"{engine.name}.argv").read_text().splitlines()
        assert ("--stronglyTyped" in argv) is strongly_typed  # 10.x gets it; 11.x is always strongly typed
        expected = [t for t in shlex.split(entry.facts["commands"][0])[1:] if t != "--stronglyTyped" or strongly_typed]
        assert argv == expected
        assert (kit_folder / entry.facts["log"]).is_file()
    assert "register" in result.stdout and "evsam-export validate" in result.stdout
    assert not list(kit.glob(".*.tmp-*"))


def test_kit_builds_one_component_on_request(kit_folder, tmp_path):
    result, _ = run_kit(kit_folder, tmp_path, "101601", "decoder.tensorrt.fp32")
    assert result.returncode == 0, result.stderr
    kit = kit_folder / "tensorrt-kit"
    assert (kit / "decoder.tensorrt.fp32.engine").is_file() and not (kit / "encoder.tensorrt.fp32.engine").exists()
    result, _ = run_kit(kit_folder, tmp_path, "101601", "nope.tensorrt.fp32")
    assert result.returncode == 2 and "no nope.tensorrt.fp32.trtexec.sh" in result.stderr


def test_kit_reports_missing_trtexec_and_failed_builds(kit_folder, tmp_path):
    result, _ = run_kit(kit_folder, tmp_path, with_trtexec=False)
    assert result.returncode == 127 and "trtexec not found" in result.stderr and "PATH" in result.stderr
    result, _ = run_kit(kit_folder, tmp_path, fail=True)
    assert result.returncode == 1
    assert "trtexec failed" in result.stderr and "simulated parser failure" in result.stderr
    result, _ = run_kit(kit_folder, tmp_path, "8601")
    assert result.returncode == 2 and "TensorRT 10 or 11" in result.stderr


def test_register_replaces_kit_entries_with_engines(kit_folder, tmp_path):
    with pytest.raises(Exception, match="no engines"):
        trt_target.register_engines(kit_folder)
    result, _ = run_kit(kit_folder, tmp_path, "101601")
    assert result.returncode == 0, result.stderr
    registered = trt_target.register_engines(kit_folder)
    assert [a.id for a in registered] == ["encoder.tensorrt.fp32", "decoder.tensorrt.fp32"]
    manifest = read_manifest(kit_folder)
    for artifact in registered:
        entry = manifest.artifact(artifact.id)
        assert entry.path == f"tensorrt-kit/{artifact.id}.engine" and "kit_only" not in entry.facts
        verify_artifact_file(kit_folder, entry)
        assert entry.facts["tensorrt_version"] == "10.16.1"
        assert entry.facts["gpu"] == "NVIDIA A100-SXM4-80GB" and entry.facts["compute_capability"] == "8.0"
        assert entry.facts["profiles"] and entry.parent == f"{artifact.component}.onnx.fp32"
    assert manifest.history[-1]["step"] == "tensorrt-register"


def test_kit_carries_external_data_next_to_the_onnx(tmp_path, no_tensorrt):
    ctx = make_ctx(tmp_path)
    parent = onnx_artifact(tmp_path, encoder_spec(VARIANT))
    (tmp_path / "encoder.fp32.onnx.data").write_bytes(b"\0" * 16)
    parent.extra_files = ["encoder.fp32.onnx.data"]
    (entry,) = trt_target.build(ctx, parent, trt_target.Settings())
    assert (tmp_path / "tensorrt-kit" / "encoder.fp32.onnx.data").read_bytes() == b"\0" * 16
    assert "tensorrt-kit/encoder.fp32.onnx.data" in entry.extra_files


# -- (c) the SAM decoder profile is refused ------------------------------------------------------------------------
def test_sam_profile_decoder_is_refused_in_one_line(tmp_path, no_tensorrt):
    parent = onnx_artifact(tmp_path, decoder_spec("sam"))
    with pytest.raises(ExportError) as caught:
        trt_target.build(make_ctx(tmp_path), parent, trt_target.Settings())
    assert caught.value.one_line() == (
        "decoder has orig_im_size, which breaks TensorRT builds; export with --decoder-profile tensorrt")
    assert not (tmp_path / "tensorrt-kit").exists()


# -- (d) TensorRT absent: a kit entry, no exception ----------------------------------------------------------------
def test_without_tensorrt_the_step_returns_a_kit_entry(tmp_path, no_tensorrt):
    parent = onnx_artifact(tmp_path, decoder_spec("tensorrt"), precision="fp16")
    (entry,) = trt_target.build(make_ctx(tmp_path), parent, trt_target.Settings())
    assert entry.id == "decoder.tensorrt.fp16" and entry.target == "tensorrt" and entry.precision == "fp16"
    assert entry.parent == "decoder.onnx.fp16" and entry.path == "tensorrt-kit/build_engines.sh"
    assert entry.facts["kit_only"] is True and "tensorrt" in entry.facts["reason"]
    assert entry.facts["engine"] == "tensorrt-kit/decoder.tensorrt.fp16.engine"
    assert len(entry.facts["commands"]) == 1
    assert set(entry.facts["profiles"]) == {"point_coords", "point_labels", "mask_input", "has_mask_input"}
    assert entry.settings["decoder_prompts"] == [1, 16, 64]
    readme = (tmp_path / "tensorrt-kit" / "README.md").read_text()
    assert "A100" in readme and "register" in readme and "evsam-export validate" in readme


def test_trtexec_command_flags_follow_settings():
    profiles = {"input_image": ((1, 3, 512, 512), (1, 3, 512, 512), (16, 3, 512, 512))}
    settings = trt_target.Settings(tf32=True, hardware_compatibility="ampere_plus", version_compatible=True,
                                   workspace_gib=2, builder_optimization_level=5, timing_cache=None)
    argv = trt_target.trtexec_command("e.onnx", "e.engine", profiles, settings)
    assert argv[:3] == ["trtexec", "--onnx=e.onnx", "--saveEngine=e.engine"]
    assert "--memPoolSize=workspace:2048M" in argv and "--builderOptimizationLevel=5" in argv
    assert "--hardwareCompatibilityLevel=ampere+" in argv and "--versionCompatible" in argv
    assert "--noTF32" not in argv and not any(a.startswith("--timingCacheFile") for a in argv)
    static = trt_target.trtexec_command("e.onnx", "e.engine", {}, trt_target.Settings())
    assert not shape_flags(static)  # trtexec refuses shapes for a static model


def qdq_onnx(path: Path, zero_point: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(zero_point, "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], inits)), str(path))


def test_int8_graph_needs_symmetric_int8_qdq(tmp_path, no_tensorrt):
    spec = encoder_spec(VARIANT)
    qdq_onnx(tmp_path / "encoder.int8.onnx", np.array(128, np.uint8))  # ORT's default asymmetric uint8
    with pytest.raises(ExportError, match="not symmetric int8"):
        trt_target.build(make_ctx(tmp_path), onnx_artifact(tmp_path, spec, "int8"), trt_target.Settings())
    qdq_onnx(tmp_path / "encoder.int8.onnx", np.array(0, np.int8))
    (entry,) = trt_target.build(make_ctx(tmp_path), onnx_artifact(tmp_path, spec, "int8"), trt_target.Settings())
    assert entry.id == "encoder.tensorrt.int8" and entry.facts["qdq_nodes"] == 2


# -- (e) the Python API build against a stub tensorrt module ---------------------------------------------------------
def fake_tensorrt(version="10.16.1.11", strongly_typed=True, parse_errors=(), plan=b"PLAN", network_inputs=None):
    """A stub of the TensorRT 10/11 Python API surface build_engine uses, recording every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    calls = trt.calls
    members = {"EXPLICIT_BATCH": 0, **({"STRONGLY_TYPED": 1} if strongly_typed else {})}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", members)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            calls.append(("Logger", severity))

    class Network:
        def __init__(self):
            self.inputs = [types.SimpleNamespace(name=n, shape=s) for n, s in (network_inputs or [])]

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            self.num_errors = len(parse_errors)
            return not parse_errors

        def get_error(self, i):
            return parse_errors[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"CACHE"

    class Config:
        def __init__(self):
            self.builder_optimization_level = None
            self.hardware_compatibility_level = "NONE"
            trt.config = self

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", config.builder_optimization_level))
            return plan

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    return trt


def network_inputs_of(spec):
    return [(t.name, tuple(-1 if isinstance(d, str) else d for d in t.shape)) for t in spec.inputs]


@pytest.fixture()
def fake_gpu(monkeypatch):
    monkeypatch.setattr(trt_engine, "gpu_properties", lambda: {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})


def test_build_engine_calls_match_profiles_and_settings(tmp_path, monkeypatch, fake_gpu):
    spec = decoder_spec("tensorrt")
    trt = fake_tensorrt(network_inputs=network_inputs_of(spec))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    profiles = trt_target.profiles_for(onnx_artifact(tmp_path, spec), trt_target.Settings())
    cache = tmp_path / "tc.bin"
    facts = trt_engine.build_engine(tmp_path / "decoder.fp32.onnx", tmp_path / "d.engine", profiles, trt_target.Settings(),
                                    timing_cache=cache)

    assert ("create_network", 1 << 1) in trt.calls  # STRONGLY_TYPED
    assert ("parse_from_file", str(tmp_path / "decoder.fp32.onnx")) in trt.calls
    assert [c[1:] for c in trt.calls if c[0] == "set_shape"] == [(name, *shapes) for name, shapes in profiles.items()]
    assert ("set_memory_pool_limit", "WORKSPACE", 8 << 30) in trt.calls
    assert ("clear_flag", "TF32") in trt.calls and not any(c[0] == "set_flag" for c in trt.calls)
    assert trt.config.hardware_compatibility_level == "NONE"
    assert ("build_serialized_network", 3) in trt.calls
    assert ("create_timing_cache", b"") in trt.calls and ("set_timing_cache", False) in trt.calls
    assert (tmp_path / "d.engine").read_bytes() == b"PLAN" and cache.read_bytes() == b"CACHE"
    assert facts["tensorrt_version"] == "10.16.1.11" and facts["gpu"] == "NVIDIA A100-SXM4-80GB"
    assert facts["compute_capability"] == "8.0" and facts["build_time_s"] >= 0
    assert facts["strongly_typed"] == "STRONGLY_TYPED network flag"
    assert facts["timing_cache"] == {"path": "tc.bin", "reused": False}
    assert "A100" in facts["runs_on"]

    # a second build reuses the saved timing cache
    trt.calls.clear()
    trt_engine.build_engine(tmp_path / "decoder.fp32.onnx", tmp_path / "d.engine", profiles, trt_target.Settings(),
                            timing_cache=cache)
    assert ("create_timing_cache", b"CACHE") in trt.calls


def test_build_engine_optional_settings(tmp_path, monkeypatch, fake_gpu):
    spec = encoder_spec(VARIANT)
    trt = fake_tensorrt(version="11.4.0.106", strongly_typed=False, network_inputs=network_inputs_of(spec))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    settings = trt_target.Settings(tf32=True, hardware_compatibility="ampere_plus", version_compatible=True,
                                   builder_optimization_level=5)
    profiles = trt_target.profiles_for(onnx_artifact(tmp_path, spec), settings)
    facts = trt_engine.build_engine(tmp_path / "encoder.fp32.onnx", tmp_path / "e.engine", profiles, settings)
    assert ("create_network", 0) in trt.calls  # 11.x without the enum member: strongly typed anyway
    assert facts["strongly_typed"] == "always on (TensorRT 11+)"
    assert not any(c == ("clear_flag", "TF32") for c in trt.calls)
    assert ("set_flag", "VERSION_COMPATIBLE") in trt.calls
    assert trt.config.hardware_compatibility_level == "AMPERE_PLUS" and trt.config.builder_optimization_level == 5
    assert not any(c[0] == "create_timing_cache" for c in trt.calls)
    assert "Ampere or newer" in facts["runs_on"] and "same major" in facts["runs_on"]


def test_build_engine_failures_are_one_line_errors(tmp_path, monkeypatch, fake_gpu):
    spec = encoder_spec(VARIANT)
    profiles = trt_target.profiles_for(onnx_artifact(tmp_path, spec), trt_target.Settings())
    onnx_path = tmp_path / "encoder.fp32.onnx"

    parse_errors = ("In node 3: Unsupported op Foo", "In node 9:\n bad Resize")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(parse_errors=parse_errors))
    with pytest.raises(ExportError) as caught:
        trt_engine.build_engine(onnx_path, tmp_path / "e.engine", profiles, trt_target.Settings())
    assert "Unsupported op Foo" in caught.value.one_line() and "bad Resize" in caught.value.one_line()
    assert "\n" not in caught.value.one_line()

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(plan=None, network_inputs=network_inputs_of(spec)))
    with pytest.raises(ExportError, match="failed to build"):
        trt_engine.build_engine(onnx_path, tmp_path / "e.engine", profiles, trt_target.Settings())
    assert not (tmp_path / "e.engine").exists()

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(network_inputs=[("input_image", (-1, 3, 1024, 1024))]))
    with pytest.raises(ExportError, match="does not fit"):
        trt_engine.build_engine(onnx_path, tmp_path / "e.engine", profiles, trt_target.Settings())

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(strongly_typed=False, network_inputs=network_inputs_of(spec)))
    with pytest.raises(ExportError, match="strongly typed"):
        trt_engine.build_engine(onnx_path, tmp_path / "e.engine", profiles, trt_target.Settings())


def test_step_builds_an_engine_where_tensorrt_is_available(tmp_path, monkeypatch, fake_gpu):
    spec = encoder_spec(VARIANT)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(network_inputs=network_inputs_of(spec)))
    monkeypatch.setattr(trt_target, "tensorrt_availability", lambda: Availability(True, version="10.16.1.11"))
    parent = onnx_artifact(tmp_path, spec, precision="fp16")
    (engine,) = trt_target.build(make_ctx(tmp_path), parent, trt_target.Settings())
    assert engine.id == "encoder.tensorrt.fp16" and engine.path == "encoder.tensorrt.fp16.engine"
    assert engine.parent == "encoder.onnx.fp16" and "kit_only" not in engine.facts
    assert engine.facts["gpu"] == "NVIDIA A100-SXM4-80GB" and engine.facts["tensorrt_version"] == "10.16.1.11"
    assert shape_flags(shlex.split(engine.facts["trtexec_equivalent"]))["--maxShapes"] == {"input_image": [16, 3, 512, 512]}
    assert (tmp_path / "tensorrt.timing.cache").is_file() and not (tmp_path / "tensorrt-kit").exists()


def test_runner_allows_engine_host_code_only_when_asked(tmp_path, monkeypatch):
    from evsam_export.runners.tensorrt_runner import TensorRTRunner

    trt = fake_tensorrt()
    runtimes = []

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False
            runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            return None  # as TensorRT does for an engine from another GPU / TensorRT version

    trt.Runtime = Runtime
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "e.engine").write_bytes(b"PLAN")
    spec = encoder_spec(VARIANT)
    for allow in (False, True):
        with pytest.raises(RuntimeError, match="GPU and TensorRT version that built them"):
            TensorRTRunner(tmp_path / "e.engine", list(spec.inputs), list(spec.outputs), allow_host_code=allow).load()
        assert runtimes[-1].engine_host_code_allowed is allow
