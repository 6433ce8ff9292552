"""EfficientViT-SAM in PyTorch (key-compatible with upstream), its variants, weights and pre/post-processing.

Submodules that need torch are imported explicitly (`evsam_export.model.sam`, `.checkpoint`); `variants`
and `processing` are torch-free.
"""
