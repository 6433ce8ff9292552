"""TensorRT target: a strongly typed engine from the precision-prepared ONNX, or a trtexec build kit.

Precision lives in the ONNX graph (fp16 casts with fp32 islands, explicit symmetric Q/DQ for INT8), never in
builder flags: TensorRT 11 removed BuilderFlag.FP16/INT8 and trtexec --fp16/--int8/--best.
The network is created strongly typed, so the graph's casts decide every layer's type; on 10.x that takes the
STRONGLY_TYPED creation flag (trtexec --stronglyTyped), on 11.x it is always on.

Engines are tied to the GPU and TensorRT version that built them, and TensorRT cannot be pip-installed on
every machine (its libraries come from NVIDIA's index), so where `tensorrt_availability()` says no, this
step writes a build kit instead:

    OUT/tensorrt-kit/build_engines.sh          driver: checks trtexec, picks the 10.x/11.x flags, builds all
    OUT/tensorrt-kit/<id>.trtexec.sh           one trtexec command per component (sourced by the driver)
    OUT/tensorrt-kit/<component>.<prec>.onnx   hardlinks (or copies) of the prepared ONNX files
    OUT/tensorrt-kit/README.md                 what it is, how to run it, how to validate afterwards

The driver's and the README's text are templates in tensorrt_kit/ (package data), filled by `_render_template`.
The kit's manifest entry (facts["kit_only"]) has the driver as its path; the validator skips it until
`evsam-export register-engines OUT` replaces it with the engine built on the GPU.

The driver's text is the same whichever components are in the kit: each component's command lives in its
own file. The recipe runner caches every step's files and restores them on a hit, so a shared script
rewritten by each step would come back from the cache describing another run's components, and the first
entry's recorded sha256 would go stale. A constant driver plus one file per step cannot.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from evsam_export import __version__
from evsam_export.errors import ArtifactError, ExportError
from evsam_export.files import sha256_file
from evsam_export.manifest import Artifact, read_manifest
from evsam_export.runners.tensorrt_runner import tensorrt_availability
from evsam_export.steps.settings import SettingValueError, StepSettings
from evsam_export.steps.step import StepContext, artifact_filename, artifact_id

KIT_DIR = "tensorrt-kit"
KIT_SCRIPT = "build_engines.sh"
KIT_README = "README.md"
ORIG_IM_SIZE_MESSAGE = "decoder has orig_im_size, which breaks TensorRT builds; export with --decoder-profile tensorrt"
HARDWARE_LEVELS = {"none": "none", "ampere_plus": "ampere+"}  # Settings value -> trtexec --hardwareCompatibilityLevel
MAX_OPTIMIZATION_LEVEL = 5

Shape = tuple[int, ...]
Profiles = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


PROFILE_AXES = ("encoder_batch", "decoder_prompts", "decoder_points", "mask_batch")


def _as_toml(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


@dataclass(frozen=True)
class Settings(StepSettings):
    # `batch` axis of input_image (min, opt, max). opt 1: one image per call (interactive use); max 16: the
    # batch at which upstream publishes A100 throughput, so the engine can reproduce those numbers.
    encoder_batch: tuple[int, int, int] = (1, 1, 16)
    # `num_prompts` axis of the decoder (prompt sets per call). opt 16: upstream's README decoder profile
    # (point_coords 16x2x2); max 64: SAM's automatic mask generator batch (points_per_batch=64).
    decoder_prompts: tuple[int, int, int] = (1, 16, 64)
    # `num_points` axis (points per prompt set; a box is its 2 corners, labels 2/3). opt 2: one box, or one
    # click plus PyTorch SAM's padding point; max 16: a box plus 14 clicks, or 15 clicks plus padding.
    decoder_points: tuple[int, int, int] = (1, 2, 16)
    # `mask_batch` axis of mask_input/has_mask_input: 1 (one mask broadcast to every prompt set, or none)
    # or one per prompt set. None: (1, 1, max of decoder_prompts).
    mask_batch: tuple[int, int, int] | None = None
    # builder scratch memory limit in GiB (MemoryPoolType.WORKSPACE, trtexec --memPoolSize=workspace:)
    workspace_gib: float = 8.0
    # 0..5; TensorRT's default 3. Higher searches more tactics: longer builds, sometimes faster engines.
    builder_optimization_level: int = 3
    # timing cache file (reused and updated by every build), relative to the artifact folder for Python API
    # builds and to tensorrt-kit/ for trtexec; None: no cache. Valid only for one GPU + TensorRT version.
    timing_cache: str | None = "tensorrt.timing.cache"
    # "none": the engine runs only on the GPU architecture that built it; "ampere_plus": on any Ampere or
    # newer GPU (an H100-built engine then runs on an A100), at some speed cost (fewer tactics, no cuDNN/cuBLAS).
    hardware_compatibility: str = "none"
    # True: later TensorRT releases of the same major can load the engine (lean runtime embedded; the
    # loading runtime must set engine_host_code_allowed). Version-compatible engines can be slower.
    version_compatible: bool = False
    # TF32 for fp32 layers (TensorRT's default on Ampere+). False for parity builds: fp32 graphs really run
    # fp32, so the fp32 parity gates hold.
    tf32: bool = False
    # GPU the build kit's README is written for (documentation only; the engine binds to whatever GPU builds it).
    device_name: str = "A100"

    def check(self) -> None:
        for name in PROFILE_AXES:
            value = getattr(self, name)
            if value is None and name == "mask_batch":
                continue
            if (
                not isinstance(value, tuple)
                or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                or not 1 <= value[0] <= value[1] <= value[2]
            ):
                raise SettingValueError(name, f"{_as_toml(value)} is not [min, opt, max] with 1 <= min <= opt <= max")
        if self.mask_batch is not None and self.mask_batch[2] > self.decoder_prompts[2]:
            limit = f"max {self.mask_batch[2]} exceeds decoder_prompts max {self.decoder_prompts[2]}"
            raise SettingValueError("mask_batch", limit,
                                    hint="mask_input holds one mask, or one per prompt set")
        self.require_one_of("hardware_compatibility", tuple(HARDWARE_LEVELS))
        self.require_between("builder_optimization_level", 0, MAX_OPTIMIZATION_LEVEL)
        if not self.workspace_gib > 0:
            raise SettingValueError("workspace_gib", f"{self.workspace_gib!r} must be > 0")
        if self.timing_cache is not None and not self.timing_cache.strip():
            raise SettingValueError("timing_cache", "empty file name", hint="name a file, or leave the key out for no cache")
        if not self.device_name.strip():
            raise SettingValueError("device_name", "empty name", hint="the GPU the kit's README is written for, e.g. \"A100\"")

    def axis_ranges(self) -> dict[str, tuple[int, int, int]]:
        """Named dynamic axis (as declared in the manifest IO) -> (min, opt, max)."""
        return {
            "batch": self.encoder_batch,
            "num_prompts": self.decoder_prompts,
            "num_points": self.decoder_points,
            "mask_batch": self.mask_batch or (1, 1, self.decoder_prompts[2]),
        }

    @property
    def workspace_mib(self) -> int:
        return int(round(self.workspace_gib * 1024))

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


# -- profiles and the trtexec command line -----------------------------------------------------------------
def profiles_for(artifact: Artifact, settings: Settings) -> Profiles:
    """Optimization profile of every input with a dynamic dim, from the artifact's declared IO: each named
    axis takes the settings' range for that name (so inputs sharing an axis share it), fixed dims stay as
    declared. Fully static inputs (the decoder's image_embeddings) need no profile and get none."""
    names = [spec.name for spec in artifact.inputs]
    if "orig_im_size" in names:
        raise ExportError(ORIG_IM_SIZE_MESSAGE)
    ranges = settings.axis_ranges()
    profiles: Profiles = {}
    for spec in artifact.inputs:
        if all(isinstance(dim, int) for dim in spec.shape):
            continue
        unknown = [dim for dim in spec.shape if isinstance(dim, str) and dim not in ranges]
        if unknown:
            raise ExportError(
                f"{artifact.id}: input {spec.name} has dynamic axis {unknown[0]!r} with no TensorRT profile range",
                hint=f"known axes: {', '.join(ranges)}",
            )
        profiles[spec.name] = tuple(
            tuple(ranges[dim][k] if isinstance(dim, str) else int(dim) for dim in spec.shape) for k in range(3)
        )
    return profiles


def profiles_json(profiles: Profiles) -> dict:
    return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in profiles.items()}


def _shape_list(profiles: Profiles, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profiles.items())


def trtexec_command(onnx_path, engine_path, profiles: Profiles, settings: Settings) -> list[str]:
    """The trtexec argv equivalent to `build_engine` (TensorRT 10/11 flags; never --fp16/--int8/--best).

    --stronglyTyped is needed on 10.x so the graph's casts and Q/DQ decide precision; 11.x is always strongly
    typed and documents the flag as no longer needed, so the kit driver drops it there. Paths are used as
    given (the kit passes names relative to tensorrt-kit/, where its driver runs)."""
    command = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if profiles:  # a static model takes no shapes: trtexec refuses them
        command += [f"--{kind}Shapes={_shape_list(profiles, which)}" for which, kind in enumerate(("min", "opt", "max"))]
    command += [f"--memPoolSize=workspace:{settings.workspace_mib}M",
                f"--builderOptimizationLevel={settings.builder_optimization_level}"]
    if settings.timing_cache:
        command.append(f"--timingCacheFile={settings.timing_cache}")
    command.append("--stronglyTyped")
    if not settings.tf32:
        command.append("--noTF32")
    if settings.hardware_compatibility != "none":
        command.append(f"--hardwareCompatibilityLevel={HARDWARE_LEVELS[settings.hardware_compatibility]}")
    if settings.version_compatible:
        command.append("--versionCompatible")
    command.append("--skipInference")  # build only; benchmark separately (trtexec --loadEngine=...)
    return command


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


def _runs_on(facts: dict, settings: Settings) -> str:
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
    _write_bytes(engine_path, plan)
    if timing_cache is not None:
        _write_bytes(timing_cache, config.get_timing_cache().serialize())

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
    facts["runs_on"] = _runs_on(facts, settings)
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


# -- INT8 graphs must carry TensorRT-style Q/DQ ------------------------------------------------------------
def check_trt_qdq(onnx_path: Path) -> int:
    """Number of Q/DQ nodes; raise when a zero point is not int8 zero (TensorRT's Q/DQ are symmetric int8:
    "x_zero_point must be zero", onnx-tensorrt; ORT's default uint8 asymmetric QDQ fails there)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    count, bad = 0, []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        if len(node.input) < 3 or not node.input[2]:
            continue
        tensor = constants.get(node.input[2])
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.uint8 or np.any(values != 0):
            bad.append(f"{node.name or node.output[0]} (zero point {values.dtype} {values.ravel()[:3].tolist()})")
    if bad:
        raise ExportError(
            f"{onnx_path.name}: {len(bad)} Q/DQ nodes are not symmetric int8, which TensorRT requires: {', '.join(bad[:3])}",
            hint="quantize with int8 activations and weights, symmetric (zero point 0), e.g. ModelOpt ONNX PTQ",
        )
    return count


# -- the step ---------------------------------------------------------------------------------------------------
def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    """Engine `<component>.tensorrt.<precision>.engine` where TensorRT and a GPU are here, else a build kit."""
    started = time.perf_counter()
    if not parent.path.endswith(".onnx"):
        raise ExportError(f"{parent.id}: the TensorRT target builds from an ONNX graph, not {parent.path}")
    profiles = profiles_for(parent, settings)
    precision = parent.precision  # fp32 ONNX -> fp32 engine, fp16 islands -> fp16, Q/DQ -> int8
    qdq_nodes = check_trt_qdq(ctx.path_of(parent)) if precision == "int8" else None
    common = {"profiles": profiles_json(profiles), "precision_source": "the ONNX graph (strongly typed build)"}
    if qdq_nodes is not None:
        common["qdq_nodes"] = qdq_nodes
    availability = tensorrt_availability()
    if availability.available:
        engine = ctx.folder / artifact_filename(parent.component, "tensorrt", precision, "engine")
        cache = ctx.folder / settings.timing_cache if settings.timing_cache else None
        facts = build_engine(ctx.path_of(parent), engine, profiles, settings, timing_cache=cache)
        command = trtexec_command(parent.path, engine.name, profiles, settings)
        facts.update(common, trtexec_equivalent=shlex.join(command), run_in=".")
        return [ctx.new_artifact(parent, engine, "tensorrt", precision, "tensorrt", settings.to_json(), facts, started)]
    return [_build_kit(ctx, parent, settings, profiles, availability.reason, common, started)]


def _build_kit(
    ctx: StepContext, parent: Artifact, settings: Settings, profiles: Profiles, reason: str, common: dict, started: float
) -> Artifact:
    kit = ctx.folder / KIT_DIR
    kit.mkdir(parents=True, exist_ok=True)
    ident = artifact_id(parent.component, "tensorrt", parent.precision)
    engine_name = artifact_filename(parent.component, "tensorrt", parent.precision, "engine")
    parent_dir = Path(parent.path).parent
    onnx_name = Path(parent.path).name
    copied = [f"{KIT_DIR}/{onnx_name}"]
    _link_or_copy(ctx.path_of(parent), kit / onnx_name)
    for extra in parent.extra_files:  # external data must keep its path relative to the .onnx
        relative = Path(extra).relative_to(parent_dir) if Path(extra).is_relative_to(parent_dir) else Path(Path(extra).name)
        (kit / relative).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(ctx.folder / extra, kit / relative)
        copied.append(f"{KIT_DIR}/{relative.as_posix()}")
    command = trtexec_command(onnx_name, engine_name, profiles, settings)
    fragment = f"{ident}.trtexec.sh"
    _write_text(kit / fragment, render_fragment(ident, engine_name, command, parent, profiles, ctx.variant.name))
    _write_text(kit / KIT_SCRIPT, render_driver(), executable=True)
    _write_text(kit / KIT_README, render_readme(ctx.variant.name, settings))
    why = reason.split(" (")[0]
    ctx.reporter.line(f"TensorRT unavailable here ({why}): wrote the trtexec build kit for {ident} to {KIT_DIR}/")
    facts = {
        "kit_only": True,
        "reason": reason,
        "commands": [shlex.join(command)],
        "run_in": KIT_DIR,
        "script": f"{KIT_DIR}/{fragment}",
        "engine": f"{KIT_DIR}/{engine_name}",
        "log": f"{KIT_DIR}/{ident}.trtexec.log",
        "onnx": copied[0],
        "target_device": settings.device_name,
        "strongly_typed": "--stronglyTyped passed to trtexec 10.x; dropped by build_engines.sh on 11.x (always on)",
        **common,
    }
    return ctx.new_artifact(
        parent, kit / KIT_SCRIPT, "tensorrt", parent.precision, "tensorrt-kit", settings.to_json(), facts, started,
        extra_files=[f"{KIT_DIR}/{fragment}", *copied, f"{KIT_DIR}/{KIT_README}"],
    )


# -- kit files ---------------------------------------------------------------------------------------------------
def render_fragment(ident: str, engine_name: str, command: list[str], parent: Artifact, profiles: Profiles, variant: str) -> str:
    """One component's trtexec call, sourced by build_engines.sh (which defines run_build, $TRTEXEC and
    $STRONGLY_TYPED_FLAG). The command is `command` token for token, except those two substitutions."""
    tokens = ['"$TRTEXEC"'] + [
        "$STRONGLY_TYPED_FLAG" if token == "--stronglyTyped" else shlex.quote(token) for token in command[1:]
    ]
    lines = [
        f"# {ident}: EfficientViT-SAM-{variant} {parent.component}, {parent.precision} ONNX ({Path(parent.path).name}) -> "
        f"{parent.precision} engine; precision comes from the graph, no precision flags.",
        *[f"# profile {name}: min {'x'.join(map(str, lo))}  opt {'x'.join(map(str, opt))}  max {'x'.join(map(str, hi))}"
          for name, (lo, opt, hi) in profiles.items()],
        f"# Generated by evsam-export {__version__}; sourced by {KIT_SCRIPT}. "
        f"Run `bash {KIT_SCRIPT} {ident}` to build only this one.",
        f"run_build {shlex.quote(ident)} {shlex.quote(engine_name)} \\",
        "    " + " \\\n    ".join(tokens),
        "",
    ]
    return "\n".join(lines)


def _render_template(name: str, **values: str) -> str:
    """A kit file from evsam_export/targets/tensorrt_kit/ with its `{{ key }}` placeholders filled."""
    text = resources.files("evsam_export.targets").joinpath(f"tensorrt_kit/{name}").read_text()
    for key, value in values.items():
        text = text.replace(f"{{{{ {key} }}}}", value)
    if leftover := re.search(r"\{\{ (\w+) \}\}", text):
        raise ExportError(f"TensorRT kit template {name} has no value for {leftover.group(1)}")
    return text


def render_driver() -> str:
    """build_engines.sh: the same text for every kit (see the module docstring for why)."""
    return _render_template(KIT_SCRIPT, version=__version__)


def render_readme(variant: str, settings: Settings) -> str:
    level = HARDWARE_LEVELS[settings.hardware_compatibility]
    return _render_template(
        KIT_README,
        variant=variant,
        version=__version__,
        device_name=settings.device_name,
        tf32="allowed" if settings.tf32 else "off (`--noTF32`), so fp32 layers really run in fp32 for the parity gate",
        hardware_level=level,
        hardware_note="the engine also runs on other Ampere-or-newer GPUs, somewhat slower" if level != "none"
        else "the engine runs only on the GPU architecture that built it",
        version_compatibility="on (`--versionCompatible`: later TensorRT releases of the same major can load it; the loader "
        "must allow engine host code)" if settings.version_compatible
        else "off (the engine loads only with the TensorRT version that built it)",
        timing_cache=settings.timing_cache or "(no timing cache)",
    )


# -- registering engines built from a kit --------------------------------------------------------------------
def facts_from_trtexec_log(text: str) -> dict:
    """TensorRT version, GPU and compute capability as trtexec reported them while building."""
    facts: dict = {}
    if match := re.search(r"TensorRT version:\s*([0-9][0-9.]*)", text):
        facts["tensorrt_version"] = match.group(1)
    elif match := re.search(r"\[TensorRT v(\d+)\]", text):
        code = int(match.group(1))
        facts["tensorrt_version"] = f"{code // 10000}.{code // 100 % 100}.{code % 100}" if code >= 100000 else str(code)
    if match := re.search(r"Selected Device:\s*(.+)", text):
        facts["gpu"] = match.group(1).strip()
    if match := re.search(r"Compute Capability:\s*([0-9]+\.[0-9]+)", text):
        facts["compute_capability"] = match.group(1)
    return facts


def register_engines(folder) -> list[Artifact]:
    """Replace each kit entry of `folder`'s manifest whose engine now exists with the engine's entry."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kits = [a for a in manifest.artifacts if a.target == "tensorrt" and a.facts.get("kit_only")]
    if not kits:
        raise ArtifactError(f"{folder} has no TensorRT build-kit entries", hint="export with the tensorrt target first")
    registered = []
    for kit in kits:
        engine = folder / kit.facts["engine"]
        if not engine.is_file():
            continue
        log = folder / kit.facts.get("log", "")
        facts = {k: v for k, v in kit.facts.items() if k not in ("kit_only", "reason", "script", "engine")}
        facts.update({"tensorrt_version": None, "gpu": None, "compute_capability": None})
        facts.update(facts_from_trtexec_log(log.read_text(errors="replace")) if log.is_file() else {})
        facts["built_by"] = "trtexec from the build kit"
        settings = Settings(**{k: v for k, v in kit.settings.items() if k in {f.name for f in fields(Settings)}})
        facts["runs_on"] = _runs_on(facts, settings)
        artifact = Artifact(
            id=kit.id, component=kit.component, target="tensorrt", precision=kit.precision,
            path=engine.relative_to(folder).as_posix(), sha256=sha256_file(engine), size_bytes=engine.stat().st_size,
            inputs=list(kit.inputs), outputs=list(kit.outputs), parent=kit.parent, step="tensorrt-kit",
            settings=dict(kit.settings), facts=facts,
        )
        manifest.artifacts = [artifact if a.id == kit.id else a for a in manifest.artifacts]
        registered.append(artifact)
    if not registered:
        raise ArtifactError(f"no engines in {folder / KIT_DIR} yet",
                            hint=f"run `bash {KIT_DIR}/{KIT_SCRIPT}` on the GPU machine first")
    manifest.history.append({"command": f"evsam-export register-engines {folder}", "step": "tensorrt-register",
                             "artifacts": [a.id for a in registered]})
    manifest.write(folder)
    return registered


# -- file helpers -------------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data) -> None:
    """Write via a temporary file and rename: a path hardlinked from the step cache is replaced, not edited."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _write_text(path: Path, text: str, executable: bool = False) -> None:
    _write_bytes(path, text.encode())
    if executable:
        os.chmod(path, 0o755)


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
