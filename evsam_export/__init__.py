"""evsam-export: EfficientViT-SAM to deployable ONNX Runtime / OpenVINO / TensorRT artifacts, parity-gated."""

__version__ = "0.1.0"
