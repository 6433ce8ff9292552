"""A TensorRT engine built here through TensorRT's Python API: a strongly typed network parsed from the
precision-prepared ONNX, one optimisation profile per dynamic input, and the facts of the GPU it runs on."""

from __future__ import annotations

import re
import time
from pathlib import Path

from evsam_export.errors import ExportError
from evsam_export.files import write_atomic
from evsam_export.targets.tensorrt_settings import Profiles, Settings, profiles_json


# -- the Python API build ------------------------------------------------------------------------------------
def _trt_major(trt) -> int:
    match = re.match(r"(\d+)", str(getattr(trt, "__version__", "0")))
    return int(match.group(1)) if match else 0


def gpu_properties() -> dict:
    """Name and compute capability of CUDA device 0 (the device TensorRT builds on), from torch when it has
    CUDA, else from the CUDA driver library; empty when neither answers."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    except ImportError:
        pass
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {}
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), 0) != 0 or lib.cuDeviceGetName(name, 256, device) != 0:
        return {}
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
    return {"gpu": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def runs_on(facts: dict, settings: Settings) -> str:
    where = (
        "any Ampere or newer GPU (compute capability >= 8.0)"
        if settings.hardware_compatibility == "ampere_plus"
        else f"{facts.get('gpu') or 'the building GPU'} (compute capability {facts.get('compute_capability') or '?'}) only"
    )
    version = facts.get("tensorrt_version") or "?"
    later = " or a later release of the same major" if settings.version_compatible else " only"
    return f"{where}, with TensorRT {version}{later}"


def build_engine(onnx_path, engine_path, profiles: Profiles, settings: Settings, timing_cache: Path | None = None) -> dict:
    """Build a strongly typed engine from `onnx_path` with the TensorRT 10/11 Python API; return build facts.

    `timing_cache` is the cache file (loaded when present, saved after the build); None: no cache."""
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    major = _trt_major(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags = 1 << int(strongly_typed)  # 10.x: the graph's casts/Q-DQ decide precision; 11.x: accepted, always on
        typing = "STRONGLY_TYPED network flag" + (" (always on in TensorRT 11+)" if major >= 11 else "")
    elif major >= 11:
        flags, typing = 0, "always on (TensorRT 11+)"
    else:
        raise ExportError(f"TensorRT {trt.__version__} cannot build strongly typed networks", hint="use TensorRT 10.x or 11.x")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(
            f"TensorRT {trt.__version__} could not parse {onnx_path.name}: "
            + " | ".join(" ".join(e.split()) for e in errors or ["(no parser error reported)"]),
            hint="the ONNX graph has an op or pattern this TensorRT does not support",
        )
    _check_profiles_against_network(network, profiles, onnx_path.name)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)  # same bytes as the trtexec line
    config.builder_optimization_level = settings.builder_optimization_level
    if not settings.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if settings.hardware_compatibility == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(f"TensorRT rejected the optimization profile for {onnx_path.name}: {profiles_json(profiles)}")

    cache_facts = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        loaded = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(loaded)
        reused = bool(loaded)
        if not config.set_timing_cache(cache, ignore_mismatch=False):  # cache from another GPU/TensorRT: start fresh
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
            reused = False
        cache_facts = {"path": timing_cache.name, "reused": reused}

    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name}",
                          hint="the TensorRT log above says why")
    write_atomic(engine_path, bytes(plan))  # a path hardlinked from the step cache is replaced, not edited
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))

    facts = {"tensorrt_version": trt.__version__, **gpu_properties(), "build_time_s": round(seconds, 2), "strongly_typed": typing}
    facts.setdefault("gpu", None)
    facts.setdefault("compute_capability", None)
    facts.update(
        workspace_mib=settings.workspace_mib,
        builder_optimization_level=settings.builder_optimization_level,
        hardware_compatibility=settings.hardware_compatibility,
        version_compatible=settings.version_compatible,
        tf32=settings.tf32,
        timing_cache=cache_facts,
    )
    facts["runs_on"] = runs_on(facts, settings)
    return facts


def _check_profiles_against_network(network, profiles: Profiles, label: str) -> None:
    """Every dynamic network input has a profile, every profile names an input, fixed dims agree."""
    problems = []
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes[tensor.name] = tuple(tensor.shape)
    for name, shape in shapes.items():
        if any(d < 0 for d in shape) and name not in profiles:
            problems.append(f"dynamic input {name} {list(shape)} has no profile")
    for name, (lo, _opt, _hi) in profiles.items():
        if name not in shapes:
            problems.append(f"profile names {name}, which the network does not have")
        elif len(shapes[name]) != len(lo) or any(d >= 0 and d != m for d, m in zip(shapes[name], lo, strict=True)):
            problems.append(f"profile {name} {list(lo)} does not fit the network's {list(shapes[name])}")
    if problems:
        raise ExportError(f"{label}: the graph and its declared IO disagree: " + "; ".join(problems), hint="re-export the ONNX")
