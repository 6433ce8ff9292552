"""Stage 3, targets: the deployable artifact per runtime (ONNX Runtime, OpenVINO, TensorRT) and the
capability table (`registry`) that says what each target builds and runs on."""
