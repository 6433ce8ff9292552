"""The TensorRT target's settings and what follows from them alone: the optimisation profiles of each dynamic
input and the equivalent trtexec command line (shared by the engine build and the build kit)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from evsam_export.errors import ExportError
from evsam_export.manifest import Artifact
from evsam_export.steps.settings import SettingValueError, StepSettings

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
