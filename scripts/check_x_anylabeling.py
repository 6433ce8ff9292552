#!/usr/bin/env python
"""Load an app-annotation folder in the real X-AnyLabeling, headless, and compare its masks with our Predictor.

Runs inside a separate venv that holds the app (its opencv-contrib conflicts with our opencv-python-headless,
so it never goes into the main environment); our runtime is torch-free, so it imports from this checkout:

    python -m venv /work/venv-xal
    /work/venv-xal/bin/pip install x-anylabeling-cvhub onnxruntime
    /work/venv-xal/bin/python scripts/check_x_anylabeling.py FOLDER IMAGE [--point X,Y] [--box X0,Y0,X1,Y1]

What it does, all with the app's own code: X-AnyLabeling's ModelManager loads FOLDER/x-anylabeling.yaml as a
custom model (its settings go to a throw-away work directory), the EfficientViT_SAM class it returns gets
the marks the canvas would send for a click and for a dragged rectangle, and predict_shapes runs the encoder on
the image the app decodes itself. The mask it turns into polygons (channel 0 of the decoder's `masks`, > 0) is
compared with Predictor.predict(..., multimask_output=False) on the same pixels. Prints one line per prompt with
the IoU, exits 1 when one is below --min-iou, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = "x-anylabeling.yaml"  # evsam_export.apps.X_ANYLABELING_FILE, read here without importing yaml first
LOAD_TIMEOUT_MS = 120_000


def parse_pair(text: str, count: int, what: str) -> list[int]:
    values = text.split(",")
    if len(values) != count or not all(v.strip().lstrip("-").isdigit() for v in values):
        print(f"error: {what} must be {count} comma-separated integers (got {text!r})", file=sys.stderr)
        raise SystemExit(2)
    return [int(v) for v in values]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def load_app_model(config: Path):
    """The model object X-AnyLabeling builds for `config`, loaded the way its "Load custom model" menu does."""
    from anylabeling import config as app_config
    from anylabeling.services.auto_labeling.model_manager import ModelManager
    from PyQt6.QtCore import QEventLoop, QTimer

    # What X-AnyLabeling's main() does before building its window, with a throw-away work directory (its
    # --work-dir) so the custom-model list it saves never touches the user's ~/.xanylabelingrc.
    app_config.set_work_directory(tempfile.mkdtemp(prefix="xal-work-"))
    app_config.current_config_file = os.path.join(app_config.get_work_directory(), ".xanylabelingrc")
    app_config.get_default_config()
    manager = ModelManager()
    loop, messages = QEventLoop(), []
    manager.new_model_status.connect(messages.append)
    manager.model_loaded.connect(lambda _info: loop.quit())
    QTimer.singleShot(LOAD_TIMEOUT_MS, loop.quit)
    if not manager.load_custom_model(str(config)):
        raise SystemExit(f"error: X-AnyLabeling refused {config}: {messages[-1] if messages else 'no message'}")
    loop.exec()
    loaded = manager.loaded_model_config
    if loaded is None or "model" not in loaded:
        raise SystemExit(f"error: X-AnyLabeling did not load {config}: {messages[-1] if messages else 'timed out'}")
    return manager, loaded["model"]


def app_masks(model, image_path: Path, marks: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(the RGB image the app fed its encoder, the mask the app turned into shapes, number of shapes)."""
    from PyQt6.QtGui import QImage

    seen = {}
    encoder, decoder_run = model.encoder_model, model.decoder_model.run

    class RecordingEncoder:  # the app's own encoder object, with its input kept for our Predictor
        def __call__(self, image):
            seen["image"] = image
            return encoder(image)

    def recording_run(**kwargs):
        seen["masks"] = decoder_run(**kwargs)
        return seen["masks"]

    model.encoder_model, model.decoder_model.run = RecordingEncoder(), recording_run
    model.image_embedding_cache = type(model.image_embedding_cache)(model.cache_size)  # so the encoder runs each time
    try:
        model.set_auto_labeling_marks(marks)
        result = model.predict_shapes(QImage(str(image_path)), str(image_path))
    finally:
        model.encoder_model, model.decoder_model.run = encoder, decoder_run
    if "masks" not in seen:
        raise SystemExit("error: X-AnyLabeling produced no mask (see its log above)")
    masks = seen["masks"]
    # EfficientViT_SAM.predict_shapes: channel 0 of the first prompt set, thresholded at 0 by post_process.
    mask = masks[0][0] if masks.ndim == 4 else masks[0]
    return seen["image"], np.asarray(mask) > 0.0, len(result.shapes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="artifact folder written by `run app-annotation`")
    parser.add_argument("image", type=Path, help="an RGB image file the app can open (PNG, JPEG)")
    parser.add_argument("--point", help="foreground click X,Y in image pixels (default: 40%% across, half down)")
    parser.add_argument("--box", help="rectangle X0,Y0,X1,Y1 in image pixels (default: the middle half)")
    parser.add_argument("--min-iou", type=float, default=0.999, help="least IoU app vs Predictor per prompt")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    config = args.folder / CONFIG_FILE
    if not config.is_file():
        print(f"error: {config} not found: write the folder with `evsam-export run app-annotation`", file=sys.stderr)
        return 2
    if not args.image.is_file():
        print(f"error: image {args.image} not found", file=sys.stderr)
        return 2

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(REPO))
    from PyQt6.QtWidgets import QApplication

    from evsam_export.runtime import Predictor

    app = QApplication.instance() or QApplication([])  # noqa: F841  Qt objects need one
    _manager, model = load_app_model(config.resolve())  # the manager owns the model's Qt objects: keep it alive
    if type(model).__name__ != "EfficientViT_SAM":
        print(f"error: {config} loaded as {type(model).__name__}, not EfficientViT_SAM", file=sys.stderr)
        return 1

    from PyQt6.QtGui import QImage

    probe = QImage(str(args.image))
    if probe.isNull():
        print(f"error: X-AnyLabeling cannot open {args.image}", file=sys.stderr)
        return 2
    width, height = probe.width(), probe.height()
    point = parse_pair(args.point, 2, "--point") if args.point else [int(width * 0.4), int(height * 0.5)]
    box = parse_pair(args.box, 4, "--box") if args.box else [width // 4, height // 4, width * 3 // 4, height * 3 // 4]
    # The marks X-AnyLabeling's canvas sends (Canvas.update_auto_labeling_marks): integer pixels, label 1 for a
    # positive click, the rectangle's top-left and bottom-right corners.
    prompts = {
        "point": ([{"type": "point", "data": point, "label": 1}],
                  {"point_coords": np.array([point], float), "point_labels": np.array([1])}),
        "box": ([{"type": "rectangle", "data": box, "label": 1}], {"box": np.array(box, float)}),
    }
    predictor = Predictor(args.folder, prefer=("ort", "onnx"))
    results, failed = [], False
    for kind, (marks, ours) in prompts.items():
        image, app_mask, shapes = app_masks(model, args.image, marks)
        predictor.set_image(image)
        our_mask = predictor.predict(**ours, multimask_output=False).masks[0, 0]
        iou = mask_iou(app_mask, our_mask)
        ok = iou >= args.min_iou
        failed |= not ok
        results.append({"prompt": kind, "marks": marks, "iou": iou, "app_pixels": int(app_mask.sum()),
                        "our_pixels": int(our_mask.sum()), "app_shapes": shapes, "passed": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {kind:5s} {json.dumps(marks[0]['data'])}: IoU {iou:.6f} "
              f"(app {int(app_mask.sum())} px in {shapes} shape(s), Predictor {int(our_mask.sum())} px; "
              f"image {image.shape[1]}x{image.shape[0]}, decoder {predictor.decoder_artifact.id})")
    if args.json:
        args.json.write_text(json.dumps({"folder": str(args.folder), "image": str(args.image), "results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
