"""Stage 1, export: the component IO contracts, tracing to ONNX, simplification and graph passes."""
