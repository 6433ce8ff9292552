"""A realistic test checkpoint of our own: the prompt encoder and mask decoder of a variant trained for a few
minutes on synthetic scenes with ground truth, over the FROZEN synthetic-weight encoder.

Synthetic weights give tiny logits (median |logit| 0.04-0.28) and masks that follow the prompt, not the
image, so precision steps tuned on them say little about a trained model. Training only the
decoder side gives image-dependent masks and logits of several units in minutes on two CPU cores:

1. draw seeded scenes (data.scenes.synthetic_scene: shapes of varied form and colour on textured
   backgrounds, with ground-truth masks), disjoint from the parity suites' and the calibration seeds;
2. run the frozen encoder once per scene and keep the embeddings;
3. start the decoder's cross attentions "aligned" (k_proj := q_proj, so the prompt token and the image
   positions near it attend to each other from step 0; with random q/k the decoder never learned to follow
   the prompt in this budget), then train prompt_encoder + mask_decoder (AdamW, BCE + dice on the low-res logits against the ground truth,
   min-over-tokens for the multimask tokens as SAM does plus a smaller share for every token, MSE for the IoU
   head) on the prompts the parity suites use (data.scenes.prompts_for), up to four objects of one
   window of the embedding grid per step (a window costs a fraction of the full grid, and several objects
   of one image make a prompt-independent mask expensive), a quarter of the steps as a mask refinement
   (the first pass's low-res mask fed back as mask_input);
4. save the whole model's state dict in the official format (the encoder keeps its synthetic weights), so
   `--checkpoint` loads it like an efficientvit_sam_*.pt, and report train / held-out mIoU against the
   ground truth and the logit statistics.

Deterministic: fixed seeds, `torch.use_deterministic_algorithms`, and a fixed thread count (1 by default:
CPU reductions split across threads sum in another order). The same code, settings and torch build give
the same bytes; another CPU may round differently. `ensure_checkpoint` caches the file under
`$EVSAM_CACHE_DIR/realistic/<key>/`, keyed by this module's code (and what it imports), the settings and
the torch version, so tests and the CLI (`--checkpoint realistic`) pay the training once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from evsam_export.data.scenes import prompts_for, synthetic_scene
from evsam_export.model import processing
from evsam_export.model.variants import LOW_RES_MASK_SIZE, Variant, get_variant

# `--checkpoint realistic` (or `realistic:STEPS`) means: this module's checkpoint for the chosen variant.
REALISTIC_SPEC = "realistic"
# Scene seeds far from the parity suites' (0-5) and the calibration scenes' (data.calibration), so no gate
# or calibration image was trained on; held-out scenes are disjoint from the training scenes.
TRAIN_SEED_BASE = 500_000
HELD_OUT_SEED_BASE = 600_000
# Unseen scenes for independent checks (e.g. tests/check of lower precision); never trained or gated on.
UNSEEN_SEED_BASE = 700_000
# Scene shapes (fractions of the encoder size for height, width): landscape, portrait, square, wide, tall,
# so the decoder sees both padding directions.
SCENE_SHAPES = ((0.75, 1.0), (1.0, 0.625), (1.0, 1.0), (0.5, 1.0), (1.0, 0.75), (0.625, 1.0))
# Prompt kinds trained on: the single-object kinds of the parity suites (boxes16 and multimask reuse them:
# every object gets its own prompt set, and the multimask tokens are trained on every prompt).
TRAIN_KINDS = ("point", "points_neg", "box", "box_point")
REFINE_FRACTION = 0.25
# Loss weights: every multimask token's share (beside the best one's), and the IoU head's MSE.
MULTIMASK_SHARE = 0.25
IOU_HEAD_WEIGHT = 4.0


# Attention layers of the decoder's two-way transformer (module paths under mask_decoder.transformer) per
# `TrainSettings.aligned` choice: "cross" is every token<->image attention, "all" adds the token self-attention.
ALIGNED_LAYERS = {
    "none": (),
    "cross": ("layers.0.cross_attn_token_to_image", "layers.0.cross_attn_image_to_token",
              "layers.1.cross_attn_token_to_image", "layers.1.cross_attn_image_to_token", "final_attn_token_to_image"),
}
ALIGNED_LAYERS["all"] = ("layers.0.self_attn", "layers.1.self_attn", *ALIGNED_LAYERS["cross"])


@dataclass(frozen=True)
class TrainSettings:
    """Everything that changes the checkpoint's bytes (with the code and the torch version)."""

    variant: str = "l0"
    # The frozen encoder (and the decoder's starting point): synthetic weights of this seed.
    encoder_seed: int = 0
    # 64 scenes: with 32 the held-out mIoU trailed the training scenes' by 0.1-0.13.
    train_scenes: int = 64
    held_out_scenes: int = 8
    # Optimizer steps; each step is up to `objects_per_step` objects of one window of a scene, one prompt kind.
    # 1200: at 300 the loss is still falling and whether the masks follow the prompt depends on rounding
    # noise (docs/precision.md "The realistic test checkpoint").
    steps: int = 1200
    objects_per_step: int = 4
    # Each step decodes a window of this many embedding cells square (of 64) around its objects: a 40-cell
    # window costs ~40 % of the full grid, so the same minutes buy 2.5x the steps (every op of the decoder
    # is per position or attention, and the window keeps its own positional encoding).
    window_cells: int = 40
    # With several objects of one window per step a prompt-independent mask costs more, so the higher rate no
    # longer collapses to one (it did with 2 full-grid objects per step, docs/precision.md).
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # Intra-op threads for the whole run: the result depends on it (reduction order), so it is in the key.
    threads: int = 2
    # The decoder's attention layers that start "aligned" (k_proj := q_proj, both scaled by `aligned_gain`), see
    # ALIGNED_LAYERS; "none" keeps the random synthetic start, under which the masks ignore the prompt.
    aligned: str = "cross"
    aligned_gain: float = 1.5


def scene_for(seed: int, encoder_size: int):
    """The seeded scene of a training, held-out or unseen seed, at one of SCENE_SHAPES (long side = encoder)."""
    shape = SCENE_SHAPES[seed % len(SCENE_SHAPES)]
    return synthetic_scene(seed, int(round(shape[0] * encoder_size)), int(round(shape[1] * encoder_size)))


def low_res_target(mask: np.ndarray) -> np.ndarray:
    """A ground-truth mask in the decoder's 256x256 low-res frame: resized like the image (long side 256),
    padded at the bottom/right, area-averaged into [0, 1]."""
    from PIL import Image

    height, width = mask.shape
    new_h, new_w = processing.resized_shape(height, width, LOW_RES_MASK_SIZE)
    resized = Image.fromarray(mask.astype(np.float32)).resize((new_w, new_h), Image.BOX)
    out = np.zeros((LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE), np.float32)
    out[:new_h, :new_w] = np.asarray(resized)
    return out


@dataclass
class _Scene:
    name: str
    masks: tuple
    rgb: np.ndarray
    geometry: object
    embedding: object  # torch [1,256,64,64]
    targets: object  # torch [objects,1,256,256]


def _prepare_scenes(model, seeds: list[int], encoder_size: int) -> list[_Scene]:
    import torch

    scenes = []
    for seed in seeds:
        scene = scene_for(seed, encoder_size)
        if not scene.masks:
            continue
        image, geometry = processing.preprocess_image(scene.rgb, encoder_size)
        with torch.inference_mode():
            embedding = model.image_encoder(torch.from_numpy(image)).clone()
        targets = torch.from_numpy(np.stack([low_res_target(m) for m in scene.masks])[:, None])
        scenes.append(_Scene(scene.name, scene.masks, scene.rgb, geometry, embedding, targets))
    return scenes


def _prompt_batch(scene: _Scene, kind: str, seed: int, objects=None):
    """Coords [B,N,2] and labels [B,N] (torch) for one prompt of `kind` per chosen object (default: all)."""
    import torch

    coords, labels = [], []
    for index in range(len(scene.masks)) if objects is None else objects:
        prompt = prompts_for(kind, scene.rgb, (scene.masks[index],), seed=seed * 64 + index)
        tokens = processing.build_prompt_tokens(scene.geometry, prompt.points, prompt.labels, prompt.boxes)
        coords.append(tokens.point_coords)
        labels.append(tokens.point_labels)
    return torch.from_numpy(np.concatenate(coords)), torch.from_numpy(np.concatenate(labels))


def _decode(model, scene: _Scene, coords, labels, mask_input=None, window=None):
    """Low-res logits and IoU predictions of every prompt set; `window` (top, left, cells) decodes only that
    square of the embedding grid (with its positional encoding), whose masks cover the same square."""
    import torch

    embedding, image_pe = scene.embedding, model.prompt_encoder.dense_pe()
    if window is not None:
        top, left, cells = window
        embedding = embedding[..., top:top + cells, left:left + cells]
        image_pe = image_pe[..., top:top + cells, left:left + cells]
    side = 4 * embedding.shape[-1]
    sparse = model.prompt_encoder.embed_point_tokens(coords, labels)
    if mask_input is None:
        dense = model.prompt_encoder.embed_dense(torch.zeros(1, 1, side, side), torch.zeros(1))
    else:
        dense = model.prompt_encoder.embed_dense(mask_input, torch.ones(mask_input.shape[0]))
    return model.mask_decoder.predict_masks(embedding, image_pe, sparse, dense, token_layout=True)


def _mask_losses(logits, target):
    """Per (prompt, token) BCE + dice of logits [B,T,256,256] against target [B,1,256,256]."""
    import torch.nn.functional as F

    target = target.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3))
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1)
    return bce + dice


def _hard_iou(logits, target):
    import torch

    pred = logits > 0
    truth = target.expand_as(logits) > 0.5
    inter = (pred & truth).sum(dim=(2, 3)).float()
    union = (pred | truth).sum(dim=(2, 3)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _window_for(scene: _Scene, anchor: int, cells: int, rng) -> tuple[tuple[int, int, int], list[int]]:
    """A random `cells`-square of the 64x64 embedding grid around object `anchor`, and the objects with at
    least 80 % of their low-res area inside it (the anchor always: an object larger than the window is cut)."""
    grid = scene.targets.shape[-1] // 4
    if cells >= grid:
        return (0, 0, grid), list(range(len(scene.masks)))
    rows, cols = np.nonzero(scene.targets[anchor, 0].numpy() > 0.5)
    origin = []
    for low, high in ((rows.min() // 4, rows.max() // 4), (cols.min() // 4, cols.max() // 4)):
        first, last = max(0, high - cells + 1), min(low, grid - cells)
        origin.append(int(rng.integers(min(first, last), max(first, last) + 1)))
    top, left = origin
    inside = scene.targets[:, 0, 4 * top:4 * (top + cells), 4 * left:4 * (left + cells)].sum(dim=(1, 2))
    objects = [i for i in range(len(scene.masks)) if i == anchor or inside[i] >= 0.8 * scene.targets[i].sum()]
    return (top, left, cells), objects


def _train_step(model, scene: _Scene, kind: str, refine: bool, seed: int, objects: list[int], window):
    import torch

    coords, labels = _prompt_batch(scene, kind, seed, objects)
    top, left, cells = window
    targets = scene.targets[objects][..., 4 * top:4 * (top + cells), 4 * left:4 * (left + cells)]
    mask_input = None
    if refine:
        with torch.no_grad():
            first, _ = _decode(model, scene, coords, labels, window=window)
        mask_input = first[:, :1].detach()
    logits, iou_pred = _decode(model, scene, coords, labels, mask_input, window)
    losses = _mask_losses(logits, targets)
    # token 0 answers every prompt; tokens 1..3 are SAM's ambiguity-aware multimask: the best one learns
    # most, and a smaller share for every token keeps the ones SAM would not select reasonable masks too.
    multimask = losses[:, 1:]
    loss = losses[:, 0].mean() + multimask.min(dim=1).values.mean() + MULTIMASK_SHARE * multimask.mean()
    iou_true = _hard_iou(logits.detach(), targets)
    return loss + IOU_HEAD_WEIGHT * torch.nn.functional.mse_loss(iou_pred, iou_true)


def evaluate(model, scenes: list[_Scene], kinds=TRAIN_KINDS, seed: int = 1) -> dict:
    """Against the ground truth at the original size (shared post-processing), over every object of `scenes`
    under each prompt kind: mIoU of token 0 and of each token, and how much the token-0 masks of two objects
    of one scene overlap (mean IoU between them: near 1 when the masks ignore the prompt); plus the |logit|
    statistics of the token-0 low-res masks."""
    import torch

    ious: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    cross: dict[str, list[float]] = {kind: [] for kind in kinds}
    magnitudes = []
    with torch.inference_mode():
        for scene in scenes:
            for kind in kinds:
                coords, labels = _prompt_batch(scene, kind, seed)
                logits, _ = _decode(model, scene, coords, labels)
                magnitudes.append(np.abs(logits[:, 0].numpy()).ravel()[::7])
                masks = processing.binarize(processing.postprocess_masks(logits.numpy(), scene.geometry))
                for tokens, truth in zip(masks, scene.masks):
                    ious[kind].append(np.array([_iou(mask, truth) for mask in tokens]))
                cross[kind] += [_iou(masks[i, 0], masks[j, 0]) for i in range(len(masks)) for j in range(i)]
    everything = np.concatenate(magnitudes)
    return {
        "miou": {kind: round(float(np.mean([v[0] for v in values])), 4) for kind, values in ious.items()},
        "miou_per_token": {kind: [round(float(x), 4) for x in np.mean(values, axis=0)] for kind, values in ious.items()},
        "miou_best_token": {kind: round(float(np.mean([v.max() for v in values])), 4) for kind, values in ious.items()},
        "same_mask_iou": {kind: round(float(np.mean(values)), 4) if values else None for kind, values in cross.items()},
        "objects": len(ious[kinds[0]]),
        "abs_logit": {"median": round(float(np.median(everything)), 3),
                      "p99": round(float(np.percentile(everything, 99)), 3),
                      "max": round(float(everything.max()), 3)},
    }


def _iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(mask | truth)
    return np.count_nonzero(mask & truth) / union if union else 1.0


def align_attention(model, aligned: str, gain: float) -> None:
    """Set k_proj := q_proj (weights and biases, both times `gain`) in the attention layers named by `aligned`.

    With random q/k projections the prompt token's Fourier encoding and the image's dense positional encoding
    do not meet, and the decoder settles on one image-dependent blob for every prompt; with k = q, q.k is a
    positive similarity of the token and image features, peaking at the prompt from step 0 (docs/precision.md)."""
    import torch

    if aligned not in ALIGNED_LAYERS:
        from evsam_export.errors import CheckpointError

        raise CheckpointError(f"unknown aligned-attention choice {aligned!r}", hint=f"use one of {', '.join(ALIGNED_LAYERS)}")
    transformer = model.mask_decoder.transformer
    with torch.no_grad():
        for name in ALIGNED_LAYERS[aligned]:
            attention = transformer.get_submodule(name)
            attention.q_proj.weight.mul_(gain)
            attention.q_proj.bias.mul_(gain)
            attention.k_proj.weight.copy_(attention.q_proj.weight)
            attention.k_proj.bias.copy_(attention.q_proj.bias)


def _seed_torch(seed: int, threads: int) -> None:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def train(settings: TrainSettings, log: Callable[[str], None] = lambda line: None):
    """(trained model, stats): the frozen-encoder model with its prompt encoder and mask decoder trained."""
    import torch

    from evsam_export.model.sam import EfficientViTSam
    from evsam_export.model.synthetic import synthetic_state_dict

    variant = get_variant(settings.variant)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    _seed_torch(settings.seed, settings.threads)
    try:
        started = time.perf_counter()
        # What load_model(variant, "synthetic:SEED") builds (that module resolves `realistic` specs through this one).
        model = EfficientViTSam(variant)
        model.load_state_dict(synthetic_state_dict(variant, settings.encoder_seed))
        align_attention(model, settings.aligned, settings.aligned_gain)
        model.eval()
        model.image_encoder.requires_grad_(False)
        train_scenes = _prepare_scenes(model, [TRAIN_SEED_BASE + i for i in range(settings.train_scenes)], variant.encoder_size)
        held_out = _prepare_scenes(model, [HELD_OUT_SEED_BASE + i for i in range(settings.held_out_scenes)], variant.encoder_size)
        embed_s = time.perf_counter() - started
        log(f"embedded {len(train_scenes)} training and {len(held_out)} held-out scenes in {embed_s:.0f} s")
        trained = [p for p in (*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                       total_steps=settings.steps, pct_start=0.1)
        rng = np.random.default_rng([settings.seed, 0x5A4])
        model.prompt_encoder.train()
        model.mask_decoder.train()
        running = []
        for step in range(settings.steps):
            scene = train_scenes[int(rng.integers(len(train_scenes)))]
            kind = TRAIN_KINDS[int(rng.integers(len(TRAIN_KINDS)))]
            refine = bool(rng.random() < REFINE_FRACTION)
            anchor = int(rng.integers(len(scene.masks)))
            window, candidates = _window_for(scene, anchor, settings.window_cells, rng)
            others = [i for i in candidates if i != anchor]
            extra = rng.choice(others, size=min(settings.objects_per_step - 1, len(others)), replace=False)
            objects = sorted([anchor, *(int(i) for i in extra)])
            loss = _train_step(model, scene, kind, refine, step, objects, window)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, max_norm=1.0)
            optimizer.step()
            schedule.step()
            running.append(float(loss.detach()))
            if (step + 1) % 50 == 0:
                log(f"step {step + 1}/{settings.steps}: loss {np.mean(running[-50:]):.3f} "
                    f"({time.perf_counter() - started:.0f} s)")
        model.eval()
        train_s = time.perf_counter() - started - embed_s
        stats = {
            "settings": asdict(settings),
            "train": evaluate(model, train_scenes[: settings.held_out_scenes]),
            "held_out": evaluate(model, held_out),
            "final_loss": round(float(np.mean(running[-100:])), 4),
            "embed_s": round(embed_s, 1),
            "train_s": round(train_s, 1),
            "torch": torch.__version__,
        }
        return model, stats
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


# ------------------------------------------------------------------------------------------------ cache


def realistic_cache_root() -> Path:
    from evsam_export.cache import cache_root

    return cache_root("realistic")


# The code that shapes the checkpoint's bytes: this module with the model and the scene generator it imports
# (transitively); helpers it also reaches (errors, the step cache) do not change what is trained.
_KEY_PACKAGES = ("evsam_export.realistic", "evsam_export.model", "evsam_export.data.scenes")


def checkpoint_key(settings: TrainSettings) -> str:
    """sha256 of the code that shapes the checkpoint (_KEY_PACKAGES), the settings and the torch version."""
    import torch

    from evsam_export.cache import cache_key, module_code_files

    digest = hashlib.sha256()
    for name, path in sorted(module_code_files(__name__).items()):
        if name.startswith(_KEY_PACKAGES):
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    payload = {"code": digest.hexdigest(), "settings": asdict(settings), "torch": torch.__version__}
    return cache_key(payload)


def checkpoint_filename(variant: str) -> str:
    return f"efficientvit_sam_{variant}_realistic.pt"


def ensure_checkpoint(settings: TrainSettings = TrainSettings(), root: Path | None = None,
                      log: Callable[[str], None] = lambda line: None) -> Path:
    """The cached checkpoint for `settings`, trained and stored first if absent (with stats.json beside it).
    The file and its stats are written to a temporary folder and renamed into place, so a crash or a
    concurrent run never leaves a half-written checkpoint under the key."""
    import shutil
    import tempfile

    import torch

    root = root or realistic_cache_root()
    folder = root / checkpoint_key(settings)
    path = folder / checkpoint_filename(settings.variant)
    if path.is_file() and (folder / "stats.json").is_file():
        return path
    log(f"training the realistic {settings.variant} checkpoint (cached in {folder})")
    model, stats = train(settings, log)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        torch.save(model.state_dict(), scratch / path.name)
        stats["sha256"] = hashlib.sha256((scratch / path.name).read_bytes()).hexdigest()
        (scratch / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        try:
            scratch.rename(folder)
        except OSError:  # another process placed the same key first: its bytes are ours
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def read_stats(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint).parent / "stats.json").read_text())


def parse_realistic(spec: str) -> TrainSettings | None:
    """TrainSettings for a `realistic` or `realistic:STEPS` spec (variant filled in by the caller), else None."""
    if spec != REALISTIC_SPEC and not spec.startswith(REALISTIC_SPEC + ":"):
        return None
    steps = spec[len(REALISTIC_SPEC) + 1:]
    if steps and not steps.isdigit():
        from evsam_export.errors import CheckpointError

        raise CheckpointError(f"bad realistic weights spec {spec!r}", hint="use realistic or realistic:STEPS")
    return TrainSettings(steps=int(steps)) if steps else TrainSettings()


def resolve_realistic(spec: str, variant: Variant) -> str:
    """`realistic` / `realistic:STEPS` -> the path of our trained-decoder test checkpoint for `variant`
    (trained on first use and cached), any other spec unchanged."""
    import sys
    from dataclasses import replace

    settings = parse_realistic(spec)
    if settings is None:
        return spec
    log = lambda line: print(f"realistic checkpoint: {line}", file=sys.stderr, flush=True)  # noqa: E731
    return str(ensure_checkpoint(replace(settings, variant=variant.name), log=log))
