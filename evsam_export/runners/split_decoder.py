"""The split decoder as one Runner with the single graph's contract (docs/design.md, "The split decoder").

The image half (`decoder_image`) computes what depends on the image and the mask prompt only; the prompt half
(`decoder_prompt`) takes its outputs and the point tokens. `SplitDecoderRunner` chains them behind the decoder's
`tensorrt` contract (image_embeddings, point_coords, point_labels, mask_input, has_mask_input -> iou_predictions,
low_res_masks), so the Predictor, the parity gate and the export's check feed it exactly as they feed the
single graph. Without a mask prompt the image half's outputs depend on the embeddings alone: they are computed
once (`prepare`, or the first call) and reused while the same embeddings come back; a mask prompt runs the image
half on every call, with that mask.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.manifest import Artifact
from evsam_export.runners.base import Runner

# What `evsam-export targets` says about the split decoder (docs/design.md "The split decoder").
SPLIT_DECODER_SUMMARY = (
    f"{contract.DECODER_IMAGE:<26} once per image (or mask prompt): image tokens, layer 0's image-side q/k/v projections",
    f"{contract.DECODER_PROMPT:<26} per decoder call: the rest; checked against the single graph at export and by the parity gate",
)


class SplitDecoderRunner(Runner):
    runtime = "split"

    def __init__(self, image_runner: Runner, prompt_runner: Runner, label: str | None = None) -> None:
        spec = contract.split_decoder_spec(image_runner, prompt_runner)
        super().__init__(list(spec.inputs), list(spec.outputs), label or f"{image_runner.label}+{prompt_runner.label}")
        self.image_runner = image_runner
        self.prompt_runner = prompt_runner
        self.runtime = prompt_runner.runtime
        self._embeddings: np.ndarray | None = None  # a private read-only copy of what the cached image side is of
        self._given: np.ndarray | None = None  # the array the caller passed for it (identity shortcut)
        self._image_side: dict[str, np.ndarray] | None = None
        self.image_side_runs = 0  # how often the image half ran (a test sees the cache work)
        self._image_side_lock = threading.Lock()  # concurrent() callers share the cached image side

    def _load(self) -> None:
        self.image_runner.load()
        self.prompt_runner.load()

    def _close(self) -> None:
        self.image_runner.close()
        self.prompt_runner.close()
        self._embeddings = self._given = self._image_side = None

    def prepare(self, image_embeddings: np.ndarray) -> None:
        """Run the image half for these embeddings without a mask prompt now (Predictor.set_image), so the first
        prompt pays only the prompt half."""
        self.load()
        self._cached_image_side(np.asarray(image_embeddings, dtype=np.float32))

    def _cached_image_side(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        with self._image_side_lock:
            # A read-only array the caller gave before cannot have changed; anything else is compared by value.
            same = self._given is embeddings and not embeddings.flags.writeable
            if self._image_side is None or not (same or np.array_equal(self._embeddings, embeddings)):
                mask_input, has_mask_input = contract.no_mask_input()
                feeds = contract.decoder_feeds(self.image_runner, embeddings, None, None, mask_input, has_mask_input)
                self._image_side = self.image_runner.infer(feeds)
                self.image_side_runs += 1
                self._embeddings = np.array(embeddings, copy=True)
                self._embeddings.flags.writeable = False
                self._given = embeddings
            return self._image_side

    def _image_side_for(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        has_mask = feeds[contract.HAS_MASK_INPUT]
        # With has_mask_input 0 the mask's values drop out (0 * finite), so every such call shares one image side.
        if not np.any(has_mask) and np.all(np.isfinite(feeds[contract.MASK_INPUT])):
            return self._cached_image_side(feeds[contract.IMAGE_EMBEDDINGS])
        self.image_side_runs += 1
        return self.image_runner.infer(contract.decoder_feeds(
            self.image_runner, feeds[contract.IMAGE_EMBEDDINGS], None, None, feeds[contract.MASK_INPUT], has_mask))

    def _prompt_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**self._image_side_for(feeds), contract.POINT_COORDS: feeds[contract.POINT_COORDS],
                contract.POINT_LABELS: feeds[contract.POINT_LABELS]}

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.prompt_runner.infer(self._prompt_feeds(feeds))

    def _infer_outputs(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return self.prompt_runner.infer(self._prompt_feeds(feeds), outputs=names)

    def _infer_staged(self, feeds: dict[str, np.ndarray], first: str, rows_needed, window: dict) -> dict[str, np.ndarray]:
        return self.prompt_runner.infer_staged(self._prompt_feeds(feeds), first, rows_needed, window)

    def concurrent(self) -> Runner | None:
        """The prompt half's concurrent runner behind this pair's image side (one image half, one cache)."""
        prompt = self.prompt_runner.concurrent()
        return None if prompt is None else _ConcurrentPromptHalf(self, prompt)


class _ConcurrentPromptHalf(Runner):
    """SplitDecoderRunner.concurrent(): the pair's contract and image side, the prompt half on a runner that
    several threads may call at once."""

    def __init__(self, pair: SplitDecoderRunner, prompt_runner: Runner) -> None:
        super().__init__(pair.inputs, pair.outputs, prompt_runner.label)
        self.runtime = pair.runtime
        self.pair = pair
        self.prompt_runner = prompt_runner

    def _load(self) -> None:
        self.pair.load()
        self.prompt_runner.load()

    def _close(self) -> None:
        self.prompt_runner.close()

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.prompt_runner.infer(self.pair._prompt_feeds(feeds))

    def _infer_outputs(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        return self.prompt_runner.infer(self.pair._prompt_feeds(feeds), outputs=names)

    def _infer_staged(self, feeds: dict[str, np.ndarray], first: str, rows_needed, window: dict) -> dict[str, np.ndarray]:
        return self.prompt_runner.infer_staged(self.pair._prompt_feeds(feeds), first, rows_needed, window)


def split_pair_of(artifacts, decoder: Artifact) -> tuple[Artifact, Artifact] | None:
    """(image half, prompt half) exported beside `decoder` (their parent), or None."""
    halves = {a.component: a for a in artifacts if a.parent == decoder.id and a.component in contract.SPLIT_DECODER}
    if set(halves) != set(contract.SPLIT_DECODER):
        return None
    return halves[contract.DECODER_IMAGE], halves[contract.DECODER_PROMPT]


def split_artifact(image: Artifact, prompt: Artifact) -> Artifact:
    """A manifest-style entry for the pair as one decoder (id `decoder_image+decoder_prompt.onnx.fp32`: the halves
    share target and precision), as the parity gate reports it."""
    from dataclasses import replace

    spec = contract.split_decoder_spec(image, prompt)
    return replace(prompt, id=f"{image.component}+{prompt.id}", component=contract.DECODER, inputs=list(spec.inputs),
                   outputs=list(spec.outputs), settings={**prompt.settings, "split_decoder": [image.id, prompt.id]})


def is_split_decoder(artifact: Artifact) -> bool:
    """Whether `artifact` is a split_artifact entry (the pair as one decoder)."""
    return bool(artifact.settings.get("split_decoder"))


def split_runner(folder: Path, image: Artifact, prompt: Artifact, threads: int | None = None) -> SplitDecoderRunner:
    """The pair's runner from an artifact folder (each half by its own target's runner)."""
    from evsam_export.runners import runner_for_artifact

    return SplitDecoderRunner(runner_for_artifact(folder, image, threads), runner_for_artifact(folder, prompt, threads),
                              f"{image.component}+{prompt.id}")
