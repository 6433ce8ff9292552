"""Stage 2, precision: fp16 with fp32 islands, ONNX Runtime static QDQ INT8 (NNCF INT8 lives with the
OpenVINO target, which quantizes its own IR)."""
