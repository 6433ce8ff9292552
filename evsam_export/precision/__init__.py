"""Stage 2, precision: fp16 with fp32 islands, ONNX Runtime static QDQ INT8, and NNCF INT8 (which the
OpenVINO target calls on the IR it read). Every backend names the nodes it protects by the regions of
evsam_export.export.regions and shares the settings base evsam_export.steps.settings.PrecisionSettings."""
