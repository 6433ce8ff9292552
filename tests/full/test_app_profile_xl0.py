"""The app encoder profile at 1024 (xl0): raw uint8 images of several shapes in ONNX Runtime against the host
pipeline (preprocess_image + the PyTorch encoder), within the app-fp32 gate. Slow: the xl0
export takes minutes on 2 cores."""

from __future__ import annotations

import numpy as np

from evsam_export import api, metrics
from evsam_export.progress import Reporter
from evsam_export.runtime.predictor import Predictor

# Portrait larger than 1024 (downscale), landscape and portrait smaller than 1024 (upscale), odd sides.
XL0_SHAPES = ((1280, 720), (600, 800), (250, 181), (777, 1023))
# validators/default.toml's app-fp32 encoder gates, and the fp32 end-to-end mask-IoU floor.
MIN_SNR_DB, MIN_COSINE, MIN_MASK_IOU = 40.0, 0.9999, 0.99


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), ((x // 7 + y // 5) % 32) * 8], axis=2)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def compare_with_host(folder, shapes=XL0_SHAPES, checkpoint: str = "synthetic:0") -> list[dict]:
    """Per image shape: the app encoder (ORT, raw pixels) vs PyTorch's encoder on preprocess_image, embeddings
    and the end-to-end mask of one click and one box through the folder's decoder."""
    import torch

    from evsam_export.model.checkpoint import load_model
    from evsam_export.model.processing import preprocess_image
    from evsam_export.model.sam import EncoderGraph
    from evsam_export.model.variants import get_variant

    app = Predictor(folder, prefer=("onnx",))
    host = Predictor(folder, prefer=("onnx",))  # its embeddings are replaced by PyTorch's below
    model, _ = load_model(get_variant(app.manifest.variant), checkpoint)
    encoder = EncoderGraph(model).eval()
    rows = []
    for seed, (height, width) in enumerate(shapes):
        image = photo_like(height, width, seed)
        app.set_image(image)
        host.set_image(image)
        with torch.no_grad():
            host.image_embeddings = encoder(torch.from_numpy(preprocess_image(image, app.encoder_size)[0])).numpy()
        row = {"shape": f"{height}x{width}", "snr_db": float(metrics.snr_db(host.image_embeddings, app.image_embeddings)),
               "cosine": float(metrics.cosine(host.image_embeddings, app.image_embeddings))}
        prompts = {"point": {"point_coords": np.array([[width * 0.4, height * 0.5]]), "point_labels": np.array([1])},
                   "box": {"box": np.array([width * 0.2, height * 0.25, width * 0.7, height * 0.8])}}
        for kind, prompt in prompts.items():
            want = host.predict(**prompt, multimask_output=False).masks[0, 0]
            got = app.predict(**prompt, multimask_output=False).masks[0, 0]
            row[f"{kind}_iou"] = float(metrics.mask_iou(want, got))
        rows.append(row)
    return rows


def test_xl0_app_encoder_matches_the_host_pipeline_on_raw_images(tmp_path):
    folder = tmp_path / "xl0-app"
    api.export("xl0", folder, options=api.ExportOptions(encoder_profile="app", opset=18), reporter=Reporter(quiet=True))
    rows = compare_with_host(folder)
    assert [row["shape"] for row in rows] == [f"{h}x{w}" for h, w in XL0_SHAPES]
    for row in rows:
        assert row["snr_db"] >= MIN_SNR_DB and row["cosine"] >= MIN_COSINE, row
        assert row["point_iou"] >= MIN_MASK_IOU and row["box_iou"] >= MIN_MASK_IOU, row
