"""Test-only access to the upstream reference (`efficientsam==1.0.0`, the official code repackaged).

Upstream imports torchvision at module level for preprocessing helpers only, and PyPI's torchvision does
not import beside torch 2.13 here. We never call those helpers (preprocessing is compared against our own
numpy module using Pillow, which is what torchvision's PIL path does), so while importing upstream we put
inert stand-ins for the three torchvision names it touches into sys.modules, then remove them again.
Install the reference with `pip install --no-deps efficientsam==1.0.0` (the README's test command does).
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest


def _stub_torchvision() -> dict[str, types.ModuleType]:
    def unused(*_args, **_kwargs):
        raise RuntimeError("torchvision stand-in: upstream preprocessing is not used in these tests")

    class Compose:  # built in EfficientViTSam.__init__, never called by our tests
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, _image):
            unused()

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    transforms.Compose = Compose
    transforms.ToTensor = lambda: unused
    transforms.Normalize = lambda **_kw: unused
    transforms.functional = functional
    functional.resize = unused
    functional.to_pil_image = unused
    boxes.batched_nms = unused
    boxes.box_area = unused
    ops.boxes = boxes
    tv.transforms = transforms
    tv.ops = ops
    return {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
    }


def load_upstream_zoo():
    """The upstream model zoo module, or skip-with-instructions when the reference is not installed."""
    try:
        importlib.util.find_spec("efficientsam")
    except ValueError:
        pass
    if importlib.util.find_spec("efficientsam") is None:
        pytest.fail(
            "the upstream reference is not installed: run `pip install --no-deps efficientsam==1.0.0`",
            pytrace=False,
        )
    stubs = _stub_torchvision()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("efficientsam.sam_model_zoo")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def build_upstream(variant: str, state_dict: dict):
    """Upstream EfficientViTSam for `variant` (eps set like the zoo), loaded with `state_dict`, eval mode."""
    zoo = load_upstream_zoo()
    model = zoo.create_efficientvit_sam_model(f"efficientvit-sam-{variant}", pretrained=False)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
