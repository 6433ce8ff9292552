"""Deterministic synthetic weights (`synthetic:SEED`): no download, same tensors on every machine.

Every tensor is drawn from a counter-based generator seeded by (seed, key), so a value depends only on
the seed and its key, never on construction order or thread count. Scales keep activations in a sane
range through the deep backbone (fan-in scaled convs, BatchNorm near identity), so masks and embeddings
respond to the image. These are NOT trained weights: they exercise the export and parity machinery only.
"""

from __future__ import annotations

import hashlib
import math

from evsam_export.model.signature import variant_signature
from evsam_export.model.variants import Variant


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def _draw(seed: int, key: str, shape: tuple[int, ...], kind: str):
    import numpy as np
    import torch

    rng = np.random.default_rng(_key_seed(seed, key))
    count = int(np.prod(shape)) if shape else 1
    if kind == "normal":
        values = rng.standard_normal(count)
    else:
        values = rng.uniform(0.0, 1.0, count)
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def _fan_in(shape: tuple[int, ...]) -> int:
    return max(1, int(math.prod(shape[1:]))) if len(shape) > 1 else max(1, shape[0])


def synthetic_state_dict(variant: Variant, seed: int) -> dict:
    import torch

    state = {}
    for key, shape in variant_signature(variant.name).items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            state[key] = torch.tensor(0, dtype=torch.int64)
        elif leaf == "running_mean":
            state[key] = 0.05 * _draw(seed, key, shape, "normal")
        elif leaf == "running_var":
            state[key] = 0.75 + 0.5 * _draw(seed, key, shape, "uniform")
        elif key.endswith("positional_encoding_gaussian_matrix"):
            state[key] = _draw(seed, key, shape, "normal")  # SAM: scale 1.0 * randn
        elif len(shape) == 1 and leaf == "weight":  # BatchNorm / LayerNorm gains
            state[key] = 1.0 + 0.1 * _draw(seed, key, shape, "normal")
        elif leaf == "bias":
            state[key] = 0.02 * _draw(seed, key, shape, "normal")
        elif "embed" in key or key.endswith("tokens.weight") or key.endswith("token.weight"):
            state[key] = _draw(seed, key, shape, "normal")  # nn.Embedding: N(0, 1)
        else:
            state[key] = _draw(seed, key, shape, "normal") / math.sqrt(_fan_in(shape))
    return state


def state_dict_sha256(state_dict: dict) -> str:
    """Content hash of a state dict: keys, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
