"""PyTorch runner: the reference. Wraps the same export components (EncoderGraph / DecoderGraph) that
were traced, so a difference against another runner is the runtime's, not a wrapper's."""

from __future__ import annotations

import numpy as np

from evsam_export.runners.base import Availability, Runner


def torch_availability() -> Availability:
    """Checked without importing torch (the torch-free runtime asks this too)."""
    import importlib.util
    from importlib import metadata

    if importlib.util.find_spec("torch") is None:
        return Availability(False, "No module named 'torch' (pip install torch==2.13.0)")
    return Availability(True, version=metadata.version("torch"))


class TorchRunner(Runner):
    runtime = "torch"

    def __init__(self, module, spec, label: str | None = None, threads: int | None = None) -> None:
        super().__init__(list(spec.inputs), list(spec.outputs), label or f"torch:{spec.component}")
        self.module = module
        self.spec = spec
        self.threads = threads

    def _load(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.module.eval()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # Read-only feeds (cached or memory-mapped arrays) are copied: torch warns on tensors it cannot write.
        with torch.inference_mode():
            result = self.module(*[torch.from_numpy(np.require(feeds[t.name], requirements="W")) for t in self.inputs])
        result = result if isinstance(result, tuple) else (result,)
        return {t.name: value.numpy() for t, value in zip(self.outputs, result)}


def torch_reference_runners(model, variant, decoder_profile: str = "sam", single_mask: bool = False):
    """(encoder runner, decoder runner) for the PyTorch model, with the same IO specs as the export."""
    from evsam_export.contract import decoder_spec, encoder_spec
    from evsam_export.model.sam import DecoderGraph, EncoderGraph

    encoder = TorchRunner(EncoderGraph(model), encoder_spec(variant), "torch:encoder")
    decoder = TorchRunner(
        DecoderGraph(model, decoder_profile, single_mask), decoder_spec(decoder_profile, single_mask), "torch:decoder"
    )
    return encoder, decoder
