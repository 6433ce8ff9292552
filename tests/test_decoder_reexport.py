"""`export --components decoder`: switch the decoder of an existing folder without re-tracing the encoder."""

from __future__ import annotations

import numpy as np
import pytest

from evsam_export import api, contract
from evsam_export.errors import UsageError
from evsam_export.manifest import read_manifest
from evsam_export.progress import Reporter
from evsam_export.runtime.predictor import Predictor


def test_decoder_only_reexport_keeps_the_encoder_and_updates_the_manifest(copy_export):
    folder = copy_export("reexport")
    before = read_manifest(folder)
    encoder = before.artifact("encoder.onnx.fp32")
    encoder_file = folder / encoder.path
    encoder_stat = encoder_file.stat()
    options = api.ExportOptions(decoder_profile="tensorrt", single_mask=True, single_mask_rule="sam-onnx")
    api.export_decoder(folder, options=options, reporter=Reporter(quiet=True))
    after = read_manifest(folder)
    assert after.artifact("encoder.onnx.fp32").sha256 == encoder.sha256
    assert encoder_file.stat().st_mtime_ns == encoder_stat.st_mtime_ns  # not rewritten
    decoder = after.artifact("decoder.onnx.fp32")
    spec = contract.artifact_spec(decoder)
    assert spec.profile == "tensorrt" and spec.mask_tokens == 1
    assert after.model["decoder_profile"] == "tensorrt"
    assert after.model["mask_selection"]["single_mask_rule"] == "sam-onnx"
    assert after.history[-1]["components"] == ["decoder"]
    split = ["decoder_image.onnx.fp32", "decoder_prompt.onnx.fp32"]
    assert sorted(after.history[-1]["replaced"]) == sorted(["decoder.onnx.fp32", *split])
    assert contract.artifact_spec(after.artifact(split[1])).mask_tokens == 1  # the split pair follows the new options
    predictor = Predictor(folder, prefer=("onnx",))
    assert predictor.info["split_decoder"] == split
    predictor.set_image(np.full((120, 160, 3), 90, np.uint8))
    assert predictor.predict(np.array([[80.0, 60.0]]), np.array([1]), multimask_output=False).masks.shape == (1, 1, 120, 160)


def test_decoder_reexport_refuses_other_weights(copy_export):
    folder = copy_export("otherweights")
    with pytest.raises(UsageError, match="not the weights"):
        api.export_decoder(folder, checkpoint="synthetic:1", reporter=Reporter(quiet=True))
    assert read_manifest(folder).model["decoder_profile"] == "sam"  # nothing changed
