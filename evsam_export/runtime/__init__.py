"""Torch-free runtime for apps that consume artifact folders (numpy + Pillow + the chosen runtime).

    from evsam_export.runtime import Predictor
    predictor = Predictor("out/l0")
    predictor.set_image(rgb)
    mask = predictor.predict(point_coords=[[320, 240]], point_labels=[1]).best()
    records = MaskGenerator(predictor, points_per_side=32).generate(rgb)   # segment everything

Importing this package never imports torch.
"""

from evsam_export.runtime.mask_generator import MaskGenerator
from evsam_export.runtime.predictor import Prediction, Predictor
from evsam_export.runtime.prompts import check_prompts

__all__ = ["MaskGenerator", "Predictor", "Prediction", "check_prompts"]
