"""Torch-free predictor over an artifact folder: PyTorch SAM's `SamPredictor` semantics on ONNX Runtime,
OpenVINO or TensorRT.

    from evsam_export.runtime import Predictor
    predictor = Predictor("out/l0")                      # reads manifest.json, checks sha256, picks artifacts
    predictor.set_image(rgb)                             # numpy HxW / HxWx3 / HxWx4 or a PIL image: encoder runs once
    prediction = predictor.predict(point_coords=[[320, 240]], point_labels=[1])
    mask = prediction.best()                             # HxW bool, highest-scoring candidate

Everything numeric goes through evsam_export.model.processing (the same pre/post-processing the parity
validators check): prompt tokens laid out like PyTorch SAM, low-res logits upscaled on the host for both
decoder profiles. Prompt sets run in chunks sized to a memory budget and are post-processed per chunk, so
memory grows with the number of prompt sets only by the results (docs/reliability-memory.md).
Needs numpy, Pillow and a runtime (onnxruntime, OpenVINO or TensorRT); never imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.errors import ArtifactError, UsageError
from evsam_export.manifest import Artifact, Manifest, artifact_file, read_manifest, verify_artifact_file
from evsam_export.model import processing
from evsam_export.model.processing import ImageGeometry
from evsam_export.model.variants import EMBEDDING_DIM, EMBEDDING_SIZE, LOW_RES_MASK_SIZE, NUM_MASK_TOKENS, PROMPT_FRAME
from evsam_export.runtime.choice import DEFAULT_PREFER, choose_artifact, choose_split_decoder, normalize_prefer
from evsam_export.runtime.prompts import as_flag, check_prompts, is_pil_image, mask_feed

# Memory per prompt-set chunk (docs/benchmarks.md "Memory"): the default budget runs an app's batch of 16
# boxes as one decoder call (1.12x faster than two calls of 8), far from a small machine's RAM.
DEFAULT_MEMORY_BUDGET_MIB = 1024
# The decoder's own working memory per prompt set (two-way transformer over the 64x64 image tokens and the
# upscaling convolutions), measured with ONNX Runtime on CPU; the same for every variant (one decoder design).
DECODER_MIB_PER_PROMPT_SET = 48
# Host post-processing per candidate mask: the 1024x1024 float32 upscale and its interpolation temporaries.
# The numpy path holds them for every candidate of a chunk, the OpenCV path for one mask at a time.
HOST_MIB_PER_CANDIDATE = 16
# The `sam` graph's upscaled `masks` output is never read, so it gets the smallest size consistent with the
# 1024 frame (one row): its crop and second resize shrink to one row instead of a full frame per token.
UNREAD_MASKS_SIZE = (1, PROMPT_FRAME)

# ------------------------------------------------------------------------------------------------ results


@dataclass
class Prediction:
    """Masks for B prompt sets with C candidates each (C = 3 with multimask_output, else 1).

    masks: bool [B,C,H,W] at the original image size (float32 logits with return_logits=True);
    scores: predicted IoU [B,C]; low_res_logits: [B,C,256,256] (feed one back as mask_input to refine)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    multimask_output: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return int(self.scores.shape[0])

    def best_index(self) -> np.ndarray:
        """Index of the highest-scoring candidate of each prompt set, [B] int."""
        return np.argmax(self.scores, axis=1)

    def best_scores(self) -> np.ndarray:
        """Score of the highest-scoring candidate of each prompt set, [B] float32."""
        return self.scores[np.arange(self.num_prompts), self.best_index()]

    def best(self, prompt: int = 0) -> np.ndarray:
        """The highest-scoring mask of prompt set `prompt` (default the first), [H,W]."""
        self._check_prompt(prompt)
        return self.masks[prompt, int(np.argmax(self.scores[prompt]))]

    def best_masks(self) -> np.ndarray:
        """The highest-scoring mask of every prompt set, [B,H,W]."""
        return self.masks[np.arange(self.num_prompts), self.best_index()]

    def best_low_res(self, prompt: int = 0) -> np.ndarray:
        """Low-res logits [1,256,256] of the best mask of `prompt`: pass as mask_input to refine it."""
        self._check_prompt(prompt)
        index = int(np.argmax(self.scores[prompt]))
        return self.low_res_logits[prompt, index : index + 1]

    def _check_prompt(self, prompt: int) -> None:
        if isinstance(prompt, (bool, np.bool_)) or not isinstance(prompt, (int, np.integer)):
            raise UsageError(f"prompt index must be an integer, got {type(prompt).__name__}")
        if not -self.num_prompts <= prompt < self.num_prompts:
            raise UsageError(f"prompt index {prompt} out of range: this prediction has {self.num_prompts} prompt set(s)")


# ------------------------------------------------------------------------------------------ chunking by memory


def prompt_sets_per_chunk(memory_budget_mib: float, candidates: int) -> int:
    """How many prompt sets one decoder call plus its host post-processing of `candidates` masks each may take
    within the budget (>= 1)."""
    if candidates and processing.opencv() is not None:  # one mask's temporaries whatever the chunk size
        return max(1, int((memory_budget_mib - HOST_MIB_PER_CANDIDATE) // DECODER_MIB_PER_PROMPT_SET))
    per_prompt_set = DECODER_MIB_PER_PROMPT_SET + HOST_MIB_PER_CANDIDATE * candidates
    return max(1, int(memory_budget_mib // per_prompt_set))


# ------------------------------------------------------------------------------------------------ predictor


def _check_chunking(memory_budget_mib, max_prompt_batch) -> None:
    if isinstance(memory_budget_mib, bool) or not isinstance(memory_budget_mib, (int, float)) or not memory_budget_mib > 0:
        raise UsageError(f"memory_budget_mib must be a positive number, got {memory_budget_mib!r}"[:120])
    if max_prompt_batch is not None and (
        isinstance(max_prompt_batch, bool) or not isinstance(max_prompt_batch, int) or max_prompt_batch < 1
    ):
        raise UsageError(f"max_prompt_batch must be a positive integer, got {max_prompt_batch!r}"[:120])

# Prompt sets per call when several run at once: small calls keep the workers evenly loaded when staged
# decoding skips some rows' masks (docs/segment.md, "The algorithm", step 4).
CONCURRENT_PROMPT_SETS = 4


class Predictor:
    """SAM-style predictor over an evsam-export artifact folder (no torch).

    Predictor(folder, encoder=None, decoder=None, prefer=("ort", "onnx", "openvino", "tensorrt"), threads=None,
              memory_budget_mib=1024, max_prompt_batch=None)

    encoder / decoder: artifact ids from manifest.json (e.g. "encoder.ort.int8"); by default the folder's
    recommended pair (written by `run cpu-auto`), else the fp32 artifacts, by target in `prefer` order, skipping
    targets whose runtime is not installed or usable. `info["choice"]` says which.
    threads: intra-op threads for ONNX Runtime / OpenVINO (None: the runtime's default).
    memory_budget_mib: working memory for one chunk of prompt sets (decoder call and post-processing); the
    chunk size follows from it (at least one prompt set). max_prompt_batch: a fixed chunk size instead.
    Decoders exported with --static-prompts always run their fixed prompt-set count per call.
    split_decoder: run the split decoder exported beside the chosen decoder (decoder_image once per image in
    set_image, decoder_prompt per call; same outputs, checked at export and by the parity gate) instead of the
    single graph. None (default): when the folder has it and its runtime is usable; False: never; True: required.
    `info["split_decoder"]` says which ran.
    """

    def __init__(
        self,
        folder: str | Path,
        encoder: str | None = None,
        decoder: str | None = None,
        prefer: Sequence[str] = DEFAULT_PREFER,
        threads: int | None = None,
        memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB,
        max_prompt_batch: int | None = None,
        split_decoder: bool | None = None,
    ) -> None:
        from evsam_export.runners import runner_for_artifact

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        _check_chunking(memory_budget_mib, max_prompt_batch)
        self.folder = Path(folder)
        self.threads = threads
        manifest = read_manifest(self.folder)
        prefer = normalize_prefer(prefer)
        cache: dict = {}
        self.choice: dict[str, str] = {}  # component -> named | recommended | ranked (...)
        encoder_artifact = choose_artifact(manifest, "encoder", encoder, prefer, cache, self.choice)
        decoder_artifact = choose_artifact(manifest, "decoder", decoder, prefer, cache, self.choice)
        split_why: dict[str, str] = {}
        split = choose_split_decoder(manifest, decoder_artifact, split_decoder, prefer, cache, self.folder, split_why)
        self.split_choice = split_why.get("split_decoder", "not wanted (split_decoder=False)")
        # The single graph is not loaded (nor needed) when its split pair runs in its place.
        for artifact in (encoder_artifact, *(split or (decoder_artifact,))):
            verify_artifact_file(self.folder, artifact)
            for extra in artifact.extra_files:
                if not artifact_file(self.folder, extra, artifact.id).is_file():
                    raise ArtifactError(f"{artifact.id}: file {extra} is missing", hint="re-run the export")
        self._attach(manifest, encoder_artifact, decoder_artifact, lambda artifact: runner_for_artifact(self.folder, artifact, threads),
                     memory_budget_mib, max_prompt_batch, split)

    @classmethod
    def from_runners(cls, manifest: Manifest, encoder_artifact: Artifact, decoder_artifact: Artifact, encoder_runner, decoder_runner,
                     memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB, max_prompt_batch: int | None = None) -> Predictor:
        """A predictor over runners the caller made (evaluate's PyTorch reference), described by artifact entries
        that carry their IO contract: the same contract checks, prompt chunking and post-processing as a folder's."""
        _check_chunking(memory_budget_mib, max_prompt_batch)
        predictor = cls.__new__(cls)
        predictor.folder = None
        predictor.threads = None
        predictor.choice = {"encoder": "named", "decoder": "named"}
        predictor.split_choice = "the caller's decoder runner"
        runners = {encoder_artifact.id: encoder_runner, decoder_artifact.id: decoder_runner}
        predictor._attach(manifest, encoder_artifact, decoder_artifact, lambda artifact: runners[artifact.id],
                          memory_budget_mib, max_prompt_batch)
        return predictor

    def _attach(self, manifest: Manifest, encoder_artifact: Artifact, decoder_artifact: Artifact, make_runner,
                memory_budget_mib: float, max_prompt_batch: int | None, split: tuple[Artifact, Artifact] | None = None) -> None:
        from evsam_export.runners.split_decoder import SplitDecoderRunner

        self.memory_budget_mib = float(memory_budget_mib)
        self.max_prompt_batch = max_prompt_batch
        self.manifest = manifest
        self.encoder_artifact = encoder_artifact
        self.decoder_artifact = decoder_artifact
        self.split_artifacts = split
        self._check_contract()
        self.encoder = make_runner(encoder_artifact).load()
        if split is None:
            self.decoder = make_runner(decoder_artifact).load()
        else:
            self.decoder = SplitDecoderRunner(make_runner(split[0]), make_runner(split[1])).load()
        self.geometry: ImageGeometry | None = None
        self.image_embeddings: np.ndarray | None = None
        self._concurrent_decoder = None  # the decoder's concurrent() runner, made on first use (predict_low_res)
        self._decoder_pool = None

    # -- contract ----------------------------------------------------------------------------------
    def _check_contract(self) -> None:
        enc, dec = self.encoder_artifact, self.decoder_artifact
        if not enc.inputs or not enc.outputs:
            raise ArtifactError(f"{enc.id}: the manifest declares no inputs/outputs", hint="re-run the export")
        self.encoder_spec = contract.artifact_spec(enc)
        split = self.split_artifacts
        if contract.missing_io(self.encoder_spec):
            raise ArtifactError(
                f"{enc.id}: not an evsam-export encoder (inputs {self.encoder_spec.input_names}, outputs {self.encoder_spec.output_names})",
                hint=f"expected the {contract.INPUT_IMAGE} input and the {contract.IMAGE_EMBEDDINGS} output",
            )
        size = self.encoder_spec.input(contract.INPUT_IMAGE).shape[-1]
        # An app encoder's input is a raw [H, W, 3] image: its size is the manifest's only.
        fixed = isinstance(size, int) and self.encoder_spec.profile != "app"
        self.encoder_size = int(size) if fixed else int(self.manifest.encoder_size)
        if self.encoder_size != int(self.manifest.encoder_size):
            raise ArtifactError(f"{enc.id}: input size {self.encoder_size} != manifest encoder_size {self.manifest.encoder_size}")
        # The chosen decoder is checked even when its split pair runs in its place, and so is each half.
        for artifact in (dec, *(split or ())):
            spec = contract.artifact_spec(artifact)
            if contract.missing_io(spec):
                raise ArtifactError(
                    f"{artifact.id}: not an evsam-export {artifact.component} (inputs {sorted(spec.input_names)})",
                    hint="expected SAM's decoder contract with low_res_masks and iou_predictions outputs",
                )
        # The split pair offers the single graph's `tensorrt` contract, and that is what the feeds are built for.
        self.decoder_spec = contract.artifact_spec(dec) if split is None else contract.split_decoder_spec(*split)
        # "sam" profile: the graph also wants orig_im_size (its upscaled `masks` output is not used: the
        # host upscales low-res logits for both profiles, exactly as the parity validators do).
        self.decoder_profile = contract.artifact_spec(dec).profile
        tokens = self.decoder_spec.mask_tokens
        if not isinstance(tokens, int):
            selection = self.manifest.model.get("mask_selection", {})
            tokens = 1 if selection.get("outputs") == contract.TOKEN0_ONLY else NUM_MASK_TOKENS
        if tokens not in (1, NUM_MASK_TOKENS):
            raise ArtifactError(f"{dec.id}: {tokens} mask tokens, expected 1 or {NUM_MASK_TOKENS}")
        self.num_tokens = int(tokens)
        prompt_batch = self.decoder_spec.prompt_batch
        self._prompt_batch_limit = int(prompt_batch) if isinstance(prompt_batch, int) else None

    def prompt_chunk_size(self, multimask_output: bool = True, upscaled: bool = True) -> int:
        """Prompt sets per decoder call: the static graph's fixed count, max_prompt_batch, or the budget's (with
        the host upscale of every candidate, or, `upscaled=False`, low-res logits only: predict_low_res)."""
        if self._prompt_batch_limit is not None:
            return self._prompt_batch_limit
        if self.max_prompt_batch is not None:
            return self.max_prompt_batch
        return prompt_sets_per_chunk(self.memory_budget_mib, (3 if multimask_output else 1) if upscaled else 0)

    @property
    def info(self) -> dict:
        return {
            "folder": str(self.folder),
            "variant": self.manifest.variant,
            "encoder": self.encoder_artifact.id,
            "decoder": self.decoder_artifact.id,
            "choice": dict(self.choice),  # why these two: named, the folder's recommended pair, or the default ranking
            # The split pair that runs in the decoder's place (image half once per image), or None: the single graph.
            "split_decoder": None if self.split_artifacts is None else [a.id for a in self.split_artifacts],
            "split_decoder_choice": self.split_choice,  # why that pair ran, or why none did
            "decoder_profile": self.decoder_profile,
            "mask_tokens": contract.ALL_TOKENS if self.num_tokens == NUM_MASK_TOKENS else contract.TOKEN0_ONLY,
            # Host upscaling: OpenCV when installed (within 4e-4 of the numpy reference), else numpy, bit-exact.
            "postprocess": "opencv" if processing.opencv() is not None else "numpy",
        }

    # -- image -------------------------------------------------------------------------------------
    def set_image(self, image, image_format: str = "RGB") -> None:
        """Run the encoder once on `image`: a numpy array HxW, HxWx3 RGB or HxWx4 RGBA (uint8, uint16 and other
        integers scaled like `evsam-export predict` reads 16-bit files, bool, or float in 0..1 / 0..255), or
        a PIL image in any mode, converted to RGB as `evsam-export predict` converts files (CMYK included)."""
        if not isinstance(image_format, str) or image_format not in ("RGB", "BGR"):
            raise UsageError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}"[:120])
        try:
            if isinstance(image, np.ndarray):
                rgb = processing.as_rgb_uint8(image)
            elif is_pil_image(image):
                if image_format == "BGR":
                    raise UsageError("image_format='BGR' is for numpy arrays: a PIL image is converted to RGB by its mode")
                rgb = processing.pil_to_rgb_uint8(image)
            else:
                raise UsageError(
                    f"image must be a numpy array or a PIL image, got {type(image).__name__}",
                    hint="load it first, e.g. np.asarray(PIL.Image.open(path))",
                )
        except (ValueError, OSError) as exc:
            raise UsageError(" ".join(str(exc).split())[:160] or f"cannot use the image ({type(exc).__name__})") from None
        if image_format == "BGR":
            rgb = np.ascontiguousarray(rgb[:, :, ::-1])
        self.set_embeddings(*self.encode(rgb))

    def encode(self, rgb: np.ndarray) -> tuple[np.ndarray, ImageGeometry]:
        """(image embeddings, geometry) of an HxWx3 uint8 RGB image: the encoder alone, without changing the
        image set here, so another thread can encode the next image while this one decodes (set_embeddings)."""
        input_image, geometry = processing.encoder_input(rgb, self.encoder_spec.profile, self.encoder_size)
        out = self.encoder.infer(contract.encoder_feeds(self.encoder_spec, input_image))[contract.IMAGE_EMBEDDINGS]
        embeddings = np.ascontiguousarray(out[:1], dtype=np.float32)
        if embeddings.shape != contract.EMBEDDINGS_SHAPE:
            raise ArtifactError(
                f"{self.encoder_artifact.id}: embeddings of shape {list(out.shape)}, "
                f"expected [1,{EMBEDDING_DIM},{EMBEDDING_SIZE},{EMBEDDING_SIZE}]"
            )
        # Read-only: the split decoder keeps the image half's outputs for exactly these embeddings.
        embeddings.flags.writeable = False
        return embeddings, geometry

    def set_embeddings(self, embeddings: np.ndarray, geometry: ImageGeometry) -> None:
        """Make the image that encode() returned `embeddings` and `geometry` for the current one."""
        if self.split_artifacts is not None:
            self.decoder.prepare(embeddings)
        self.image_embeddings = embeddings
        self.geometry = geometry

    def reset_image(self) -> None:
        self.image_embeddings = None
        self.geometry = None

    @property
    def is_image_set(self) -> bool:
        return self.image_embeddings is not None

    # -- prompts -----------------------------------------------------------------------------------
    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
        best_only: bool = False,
    ) -> Prediction:
        """PyTorch SAM's predict() in original-image pixels.

        point_coords [N,2] (x, y) or [B,N,2] with point_labels [N] / [B,N] (1 foreground, 0 background);
        box [4] (x0, y0, x1, y1) or boxes [B,4] (one prompt set per box; points are shared or given per box);
        mask_input: low-res logits [1,256,256] or [B,1,256,256] from an earlier prediction.
        multimask_output: 3 candidates (tokens 1..3) instead of 1 (token 0).
        best_only: keep only each prompt set's highest-scoring candidate (C = 1), so only it is upscaled to the
        original size (the point protocol of `evsam-export evaluate`)."""
        if self.image_embeddings is None or self.geometry is None:
            raise UsageError("no image set: call set_image(image) before predict()")
        multimask_output = as_flag(multimask_output, "multimask_output")
        return_logits = as_flag(return_logits, "return_logits")
        best_only = as_flag(best_only, "best_only")
        if multimask_output and self.num_tokens == 1:
            raise UsageError(
                f"{self.decoder_artifact.id} returns only token 0 (exported with --single-mask), so multimask_output=True is not available",
                hint="call predict(..., multimask_output=False), or export without --single-mask",
            )
        geometry = self.geometry
        points, labels, box_array = check_prompts(geometry.original_size, point_coords, point_labels, box, boxes)
        tokens = processing.build_prompt_tokens(geometry, points, labels, box_array)
        batch = tokens.point_coords.shape[0]
        mask, has_mask = mask_feed(mask_input, batch)
        candidates = 3 if multimask_output and not best_only else 1
        height, width = geometry.original_size
        low = LOW_RES_MASK_SIZE
        # Only these grow with the whole batch; everything else lives for one chunk.
        masks = np.empty((batch, candidates, height, width), np.float32 if return_logits else bool)
        scores = np.empty((batch, candidates), np.float32)
        low_res = np.empty((batch, candidates, low, low), np.float32)
        chunk = self.prompt_chunk_size(multimask_output)
        decoder_s = postprocess_s = 0.0
        for start in range(0, batch, chunk):
            prompt_sets = slice(start, min(start + chunk, batch))
            feeds = contract.decoder_feeds(
                self.decoder_spec,
                image_embeddings=self.image_embeddings,
                point_coords=tokens.point_coords[prompt_sets],
                point_labels=tokens.point_labels[prompt_sets],
                mask_input=mask if mask.shape[0] == 1 else mask[prompt_sets],
                has_mask_input=has_mask if has_mask.shape[0] == 1 else has_mask[prompt_sets],
                # The "sam" graph's own upscaled `masks` output is never read (the host upscales the low-res logits).
                original_size=UNREAD_MASKS_SIZE,
            )
            started = time.perf_counter()
            out = self._run_decoder(feeds, prompt_sets.stop - prompt_sets.start)
            decoder_s += time.perf_counter() - started
            chunk_low_res, chunk_scores = processing.select_masks(
                out[contract.LOW_RES_MASKS], out[contract.IOU_PREDICTIONS], multimask_output
            )
            if best_only:
                rows, best = np.arange(chunk_scores.shape[0]), np.argmax(chunk_scores, axis=1)
                chunk_low_res, chunk_scores = chunk_low_res[rows, best][:, None], chunk_scores[rows, best][:, None]
            low_res[prompt_sets] = chunk_low_res
            scores[prompt_sets] = chunk_scores
            del out, chunk_low_res
            started = time.perf_counter()
            processing.postprocess_into(low_res[prompt_sets], geometry, masks[prompt_sets])
            postprocess_s += time.perf_counter() - started
        # Where the time went, so an app (and `bench`) can see the decoder / host split of each call.
        meta = {"decoder_ms": decoder_s * 1000, "postprocess_ms": postprocess_s * 1000}
        return Prediction(masks=masks, scores=scores, low_res_logits=low_res, multimask_output=multimask_output, meta=meta)

    def _run_decoder(self, feeds: dict[str, np.ndarray], batch: int, runner=None, iou_floor: float | None = None,
                     multimask_output: bool = True, low_res_window: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        wanted = (contract.LOW_RES_MASKS, contract.IOU_PREDICTIONS)
        runner = runner or self.decoder
        limit = self._prompt_batch_limit
        if (iou_floor is not None or low_res_window is not None) and limit is None:
            floor = None if iou_floor is None else np.float32(iou_floor)

            def rows_needed(iou: np.ndarray) -> np.ndarray:
                if floor is None:
                    return np.ones(iou.shape[0], bool)
                return (processing.select_masks(iou, iou, multimask_output)[1] > floor).any(axis=1)

            window = None if low_res_window is None else {contract.LOW_RES_MASKS: low_res_window}
            out = runner.infer_staged(feeds, contract.IOU_PREDICTIONS, rows_needed, window)
            return {name: out[name] for name in wanted}
        if limit is None or batch <= limit:
            return runner.infer(feeds, outputs=wanted)
        # Static-prompt decoders take `limit` prompt sets per call: run them in chunks.
        parts = []
        for start in range(0, batch, limit):
            chunk = dict(feeds)
            per_prompt_set = [contract.POINT_COORDS, contract.POINT_LABELS]
            if feeds[contract.MASK_INPUT].shape[0] == batch:
                per_prompt_set += [contract.MASK_INPUT, contract.HAS_MASK_INPUT]
            for name in per_prompt_set:
                chunk[name] = feeds[name][start : start + limit]
            parts.append(runner.infer(chunk, outputs=wanted))
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in wanted}

    # -- low-res logits only (the automatic mask generator upscales just the candidates it keeps) ---
    def predict_low_res(self, point_coords, point_labels, multimask_output: bool = True, workers: int = 1,
                        iou_floor: float | None = None, low_res_window: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(low-res logits [B,C,256,256], predicted IoU [B,C]) for B prompt sets of points, without the upscale
        to the image size that predict() does for every candidate.

        point_coords [B,N,2] / point_labels [B,N] in original-image pixels, as for predict(). Prompt sets go
        through the decoder in chunks of equal size: the static graph's fixed count, max_prompt_batch, or as
        many as the memory budget holds without host upscaling. workers > 1: that many chunks run at once, each
        on its own thread with one intra-op thread (the decoder's concurrent() runner; the memory budget is
        shared between them), where the runtime has that mode; elsewhere they run one after another.
        iou_floor: the caller reads only candidates whose predicted IoU is above it, so a prompt set with none
        gets no mask computed where the runtime can stop after the IoU head (Runner.infer_staged); its logits
        are then zeros. Predicted IoU is always computed for every prompt set. low_res_window (rows, cols): the
        caller reads only logits[..., :rows, :cols] (the generator: the part its crop's masks are upscaled from,
        the rest is padding); where the runtime can compute just that corner, the rest is zeros."""
        if self.image_embeddings is None or self.geometry is None:
            raise UsageError("no image set: call set_image(image) before predict_low_res()")
        multimask_output = as_flag(multimask_output, "multimask_output")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise UsageError(f"workers must be a positive integer, got {workers!r}"[:120])
        if iou_floor is not None and (isinstance(iou_floor, bool) or not isinstance(iou_floor, (int, float))
                                      or not math.isfinite(iou_floor)):
            raise UsageError(f"iou_floor must be a number or None, got {iou_floor!r}"[:120])
        if low_res_window is not None:
            window = tuple(low_res_window) if isinstance(low_res_window, (tuple, list)) else ()
            if len(window) != 2 or not all(isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0
                                            for size in window):
                raise UsageError(f"low_res_window must be (rows, cols) of positive integers, got {low_res_window!r}"[:120])
            low_res_window = (min(int(window[0]), LOW_RES_MASK_SIZE), min(int(window[1]), LOW_RES_MASK_SIZE))
        if multimask_output and self.num_tokens == 1:
            raise UsageError(f"{self.decoder_artifact.id} returns only token 0 (exported with --single-mask): use multimask_output=False")
        points, labels, _ = check_prompts(self.geometry.original_size, point_coords, point_labels)
        tokens = processing.build_prompt_tokens(self.geometry, points, labels)
        batch = tokens.point_coords.shape[0]
        runner = self._concurrent_runner() if workers > 1 and batch > 1 else None
        chunk = self.prompt_chunk_size(multimask_output, upscaled=False)
        if self._prompt_batch_limit is not None:  # a static graph's fixed count per call
            parts = [np.arange(start, min(start + chunk, batch)) for start in range(0, batch, chunk)]
        else:
            if runner is not None:
                chunk = max(1, min(chunk // workers, -(-batch // workers), CONCURRENT_PROMPT_SETS))
            # Equal parts: 64 prompt sets at a chunk of 21 run as 22 + 21 + 21, not 21 + 21 + 21 + 1.
            parts = np.array_split(np.arange(batch), -(-batch // chunk))

        # Each call writes its rows straight into the results (the one copy out of the runtime's outputs).
        candidates = 3 if multimask_output else 1
        low_res = np.empty((batch, candidates, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE), np.float32)
        scores = np.empty((batch, candidates), np.float32)

        def decode(part: np.ndarray) -> None:
            prompt_sets = slice(int(part[0]), int(part[-1]) + 1)
            feeds = contract.decoder_feeds(
                self.decoder_spec,
                image_embeddings=self.image_embeddings,
                point_coords=tokens.point_coords[prompt_sets],
                point_labels=tokens.point_labels[prompt_sets],
                original_size=UNREAD_MASKS_SIZE,
            )
            out = self._run_decoder(feeds, len(part), runner, iou_floor, multimask_output, low_res_window)
            low_res[prompt_sets], scores[prompt_sets] = processing.select_masks(
                out[contract.LOW_RES_MASKS], out[contract.IOU_PREDICTIONS], multimask_output)

        if runner is None or len(parts) == 1:
            for part in parts:
                decode(part)
        else:
            list(self._pool(workers).map(decode, parts))
        return low_res, scores

    def _concurrent_runner(self):
        """The decoder's concurrent() runner, loaded once (None where the runtime has none)."""
        if self._concurrent_decoder is None:
            runner = self.decoder.concurrent()
            self._concurrent_decoder = False if runner is None else runner.load()
        return self._concurrent_decoder or None

    def _pool(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        if self._decoder_pool is None or self._decoder_pool_workers != workers:
            if self._decoder_pool is not None:
                self._decoder_pool.shutdown()
            self._decoder_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evsam-decoder")
            self._decoder_pool_workers = workers
        return self._decoder_pool

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_decoder_pool", None) is not None:
            self._decoder_pool.shutdown()
            self._decoder_pool = None
        for runner in (getattr(self, "_concurrent_decoder", None), getattr(self, "encoder", None), getattr(self, "decoder", None)):
            if runner:
                runner.close()
        self._concurrent_decoder = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Predictor({str(self.folder)!r}, encoder={self.encoder_artifact.id!r}, decoder={self.decoder_artifact.id!r})"

