"""The independent check on unseen scenes (evsam_export.evaluation.unseen): an fp32 pair scored against itself
agrees perfectly and passes; the verdict names every floor a result misses."""

from __future__ import annotations

from evsam_export.evaluation import unseen


def test_fp32_against_itself_passes_with_perfect_agreement(l0_export):
    result = unseen.check_folder(l0_export, scenes=1, threads=1, bench_runs=1)
    assert result["encoder"] == unseen.FP32_ENCODER and result["decoder"] == unseen.FP32_DECODER
    assert result["embedding_snr_db"]["min"] > 100
    assert set(result["per_kind"]) == set(unseen.KINDS)
    for entry in result["per_kind"].values():
        assert entry["mask_iou_vs_fp32"]["min"] == 1.0 and entry["miou_drop_points"] == 0.0 and entry["objects"] >= 2
        assert 0.0 <= entry["miou_fp32"] <= 100.0
    assert result["failures"] == []


def test_failures_name_every_missed_floor():
    result = {
        "embedding_snr_db": {"min": 9.5},
        "per_kind": {"box": {"mask_iou_vs_fp32": {"mean": 0.89}, "miou_drop_points": 2.5},
                     "point": {"mask_iou_vs_fp32": {"mean": 0.95}, "miou_drop_points": 0.1}},
        "encoder_ms": {"speedup": 1.4},
    }
    lines = unseen.failures(result, int8_encoder=True)
    assert lines == ["embedding SNR min 9.5 dB < 10.0", "box: mask IoU vs fp32 0.89 < 0.9",
                     "box: mIoU drop 2.5 points > 2.0", "INT8 encoder 1.4x ORT fp32 < 1.5x"]
    assert unseen.failures(result, int8_encoder=False)[-1] == "box: mIoU drop 2.5 points > 2.0"


def test_a_missing_folder_is_one_line_and_exit_6(tmp_path):
    from typer.testing import CliRunner

    from evsam_export.cli import _register, app

    _register()
    result = CliRunner().invoke(app, ["unseen", str(tmp_path / "nowhere")])
    assert result.exit_code == 6
    err = result.stderr
    assert err.startswith("error: artifact folder not found") and "Traceback" not in err and err.count("\n") == 1
