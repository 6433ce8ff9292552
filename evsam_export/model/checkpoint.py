"""Build a model from an official checkpoint (`.pt`) or from deterministic synthetic weights.

A checkpoint is read with `torch.load(weights_only=True)`: it can never run code. Every way a checkpoint
can be wrong (missing, unreadable, truncated, not a state dict, another variant, missing or unexpected
keys, wrong shapes) becomes one CheckpointError line that says what and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evsam_export.errors import CheckpointError
from evsam_export.files import sha256_file
from evsam_export.model.signature import variant_signature
from evsam_export.model.variants import VARIANTS, Variant

SYNTHETIC_PREFIX = "synthetic:"
DEFAULT_SOURCE = "synthetic:0"


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights came from, as recorded in manifests: a file (with sha256) or a synthetic seed."""

    spec: str  # "synthetic:SEED" or the checkpoint path as given
    sha256: str  # of the file, or of the canonical synthetic state dict
    synthetic_seed: int | None

    @property
    def is_synthetic(self) -> bool:
        return self.synthetic_seed is not None


def parse_synthetic(spec: str) -> int | None:
    if not spec.startswith(SYNTHETIC_PREFIX):
        return None
    seed = spec[len(SYNTHETIC_PREFIX) :]
    if not seed.isdigit():
        raise CheckpointError(
            f"bad synthetic weights spec {spec!r}", hint="use synthetic:SEED with a non-negative integer seed"
        )
    return int(seed)


def identify_variant(state_dict: dict) -> str | None:
    """The variant whose keys and shapes the state dict has exactly, if any."""
    shapes = {key: tuple(getattr(value, "shape", ())) for key, value in state_dict.items()}
    for name in VARIANTS:
        if variant_signature(name) == shapes:
            return name
    return None


def read_state_dict(path: Path) -> dict:
    """The state dict inside an official checkpoint: raw, or under "state_dict" or "model"."""
    import pickle
    import re

    import torch

    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}", hint="check the path, or omit --checkpoint to use synthetic weights")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory: {path}", hint="pass the .pt file itself")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {path}", hint="download it again")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a refused class: the bytes themselves are broken
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated (unreadable pickle)",
                hint="download it again and compare its sha256 with the release",
            ) from exc
        raise CheckpointError(
            f"checkpoint {path} holds Python objects ({found.group(1)}), not only tensors",
            hint="we load with weights_only and never run checkpoint code; re-save it with torch.save(model.state_dict())",
        ) from exc
    # Broken bytes surface as whatever the unpickler trips on first (seen: RuntimeError, EOFError,
    # BadZipFile, ValueError, IndexError from a garbage legacy-format header): any of them means the same.
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})",
            hint="download it again and compare its sha256 with the release",
        ) from exc
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict",
            hint='expected a dict of tensors, or one under "state_dict" or "model"',
        )
    return loaded


def check_state_dict(state_dict: dict, variant: Variant, origin: str) -> None:
    expected = variant_signature(variant.name)
    got = {key: tuple(value.shape) for key, value in state_dict.items()}
    if got == expected:
        return
    actual = identify_variant(state_dict)
    if actual is not None:
        raise CheckpointError(
            f"this checkpoint is {actual}, not {variant.name} ({origin})",
            hint=f"pass --variant {actual}, or the efficientvit_sam_{variant.name}.pt checkpoint",
        )
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    if wrong_shape:
        key = wrong_shape[0]
        parts.append(f"{len(wrong_shape)} keys with wrong shapes (first: {key} {got[key]} != {expected[key]})")
    raise CheckpointError(
        f"checkpoint {origin} does not fit EfficientViT-SAM-{variant.name}: " + "; ".join(parts),
        hint="use an official efficientvit_sam_*.pt checkpoint of the same variant",
    )


def load_model(variant: Variant, source: str | Path | None = None):
    """(model in eval mode, WeightsSource). `source` is a .pt path or synthetic:SEED (default synthetic:0)."""
    import torch

    from evsam_export.model.sam import EfficientViTSam
    from evsam_export.model.synthetic import state_dict_sha256, synthetic_state_dict

    spec = str(source) if source is not None else DEFAULT_SOURCE
    seed = parse_synthetic(spec)
    if seed is not None:
        state_dict = synthetic_state_dict(variant, seed)
        weights = WeightsSource(spec=spec, sha256=state_dict_sha256(state_dict), synthetic_seed=seed)
    else:
        path = Path(spec).expanduser()
        state_dict = read_state_dict(path)
        check_state_dict(state_dict, variant, str(path))
        weights = WeightsSource(spec=str(path), sha256=sha256_file(path), synthetic_seed=None)
    model = EfficientViTSam(variant)
    model.load_state_dict({key: value.to(torch.float32) if value.is_floating_point() else value
                           for key, value in state_dict.items()})
    model.eval()
    return model, weights


def exported_model(manifest, folder: Path, reporter, checkpoint: str | None = None):
    """(model, variant, weights, source) of the PyTorch model rebuilt from the weights `folder` (a manifest's
    artifact folder) was exported from, or `checkpoint`; refused when those weights are not the exported ones.
    The reference of the parity gate and of `evaluate`."""
    from evsam_export.model.variants import get_variant

    spec = checkpoint or manifest.weights["spec"]
    variant = get_variant(manifest.variant)
    with reporter.step(f"rebuild the PyTorch reference ({spec})"):
        model, weights = load_model(variant, spec)
    if weights.sha256 != manifest.weights["sha256"]:
        raise CheckpointError(
            f"weights {spec} differ from the ones {folder} was exported from (sha256 mismatch)",
            hint="pass --checkpoint with the exported checkpoint",
        )
    return model, variant, weights, f"PyTorch ({spec})"
