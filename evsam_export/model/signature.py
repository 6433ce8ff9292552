"""The state-dict signature of a variant (key -> shape), shared by checkpoint checks and synthetic weights.

It lives apart from both so that `checkpoint` (which builds synthetic weights) and `synthetic` (which
draws one tensor per signature key) each import it without importing each other.
"""

from __future__ import annotations

import functools

from evsam_export.model.variants import VARIANTS


@functools.cache
def variant_signature(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of the variant's state dict, built on the meta device (no memory, no compute)."""
    import torch

    from evsam_export.model.sam import EfficientViTSam

    with torch.device("meta"):
        model = EfficientViTSam(VARIANTS[name])
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}
