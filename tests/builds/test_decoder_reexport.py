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


def test_decoder_reexport_removes_what_was_built_from_the_old_decoder(copy_export):
    """Derived decoders, results measured on the old decoder and an app config pointing at a derived decoder
    must not outlive it: after the swap no artifact names a missing parent and nothing names a missing file."""
    import json

    from evsam_export.apps import X_ANYLABELING_FILE
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.steps.step import StepContext
    from evsam_export.targets import ort as ort_target

    folder = copy_export("derived")
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant("l0"), reporter=Reporter(quiet=True), gating=ParityGate())
    for component in ("encoder", "decoder"):
        (derived,) = ort_target.build(ctx, manifest.artifact(f"{component}.onnx.fp32"), ort_target.Settings())
        manifest.add(derived)
    manifest.write(folder)
    derived_decoder = manifest.artifact("decoder.ort.fp32")
    (folder / "parity.json").write_text(json.dumps({"artifacts": ["decoder.ort.fp32"]}))
    (folder / "parity").mkdir()
    (folder / "parity" / "worst.png").write_bytes(b"png")
    # A host-profile folder: the config cannot be pointed at the new decoder, so it must go.
    (folder / X_ANYLABELING_FILE).write_text(f"type: efficientvit_sam\nencoder_model_path: encoder.ort.fp32.onnx\n"
                                             f"decoder_model_path: {derived_decoder.path}\n")

    api.export_decoder(folder, options=api.ExportOptions(simplify="none"), reporter=Reporter(quiet=True))
    after = read_manifest(folder)
    ids = {a.id for a in after.artifacts}
    # the split decoder's halves are re-exported with the decoder they are checked against
    assert ids == {"encoder.onnx.fp32", "encoder.ort.fp32", "decoder.onnx.fp32", "decoder_image.onnx.fp32", "decoder_prompt.onnx.fp32"}
    assert all(a.parent is None or a.parent in ids for a in after.artifacts)
    assert all((folder / a.path).is_file() for a in after.artifacts)
    assert not (folder / derived_decoder.path).exists()
    assert not any((folder / name).exists() for name in ("parity.json", "parity", X_ANYLABELING_FILE))
    assert "Not validated yet" in (folder / "report.html").read_text()
    entry = after.history[-1]
    assert entry["removed_derived"] == ["decoder.ort.fp32"] and set(entry["stale_results_removed"]) == {"parity.json", "parity"}
    assert entry["app_configs"][X_ANYLABELING_FILE].startswith("removed")
