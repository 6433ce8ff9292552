"""Torch-free runtime for apps that consume artifact folders (numpy + Pillow + the chosen runtime).

    from evsam_export.runtime import Predictor
    predictor = Predictor("out/l0")
    predictor.set_image(rgb)
    mask = predictor.predict(point_coords=[[320, 240]], point_labels=[1]).best()

Importing this package never imports torch.
"""

from evsam_export.runtime.predictor import Prediction, Predictor, check_prompts

__all__ = ["Predictor", "Prediction", "check_prompts"]
