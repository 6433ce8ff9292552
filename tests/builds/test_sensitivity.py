"""`evsam-export sensitivity DIR`: one fallback group INT8 at a time, the rest fp32, embedding SNR vs fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from evsam_export.errors import UsageError
from evsam_export.manifest import read_manifest
from evsam_export.pipeline import sensitivity
from evsam_export.precision import ort_int8
from evsam_export.steps.fallback import graph_nodes


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "evsam_export.cli", "sensitivity", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "CI": "1", **(env or {})})


@pytest.fixture(scope="module")
def quantizable(l0_export):
    settings, _ = sensitivity.int8_settings(read_manifest(l0_export), {})
    return sensitivity.quantizable_nodes(graph_nodes(l0_export / "encoder.fp32.onnx"), settings)


def test_rows_cover_every_encoder_group_then_ungrouped_and_all(quantizable):
    every = {name for name, _ in quantizable}
    assert quantizable and {op for _, op in quantizable} == {"Conv"}
    rows, skipped = sensitivity.group_selection(quantizable, [])
    encoder_groups = [g.name for g in ort_int8.INT8_GROUPS if all(r.component == "encoder" for r in g.regions)]
    # Decoder groups name no encoder node and are left out silently when no group was asked for.
    assert list(rows) == encoder_groups + [sensitivity.UNGROUPED, sensitivity.ALL] and skipped == []
    assert rows[sensitivity.ALL] == every
    grouped = set().union(*(rows[name] for name in encoder_groups))
    assert rows[sensitivity.UNGROUPED] == every - grouped and all("backbone/stages.0/" in n for n in rows[sensitivity.UNGROUPED])
    assert len(rows["neck-pointwise"]) == 5 and rows["neck-pointwise"] < rows["neck"]


def test_all_alone_is_only_the_every_node_row_and_unknown_groups_are_refused(quantizable):
    rows, skipped = sensitivity.group_selection(quantizable, ["all"])
    assert list(rows) == ["all"] and not skipped
    rows, skipped = sensitivity.group_selection(quantizable, ["decoder-output-upscaling+decoder-hypernetworks+decoder-iou-head", "neck"])
    assert list(rows) == ["neck"] and skipped == [
        "decoder-output-upscaling+decoder-hypernetworks+decoder-iou-head"
    ]  # decoder groups name no encoder node
    with pytest.raises(UsageError, match="unknown group 'nek'"):
        sensitivity.group_selection(quantizable, ["nek"])


def test_settings_come_from_the_folders_int8_artifact_with_overrides_and_no_fallback(l0_export):
    manifest = read_manifest(l0_export)
    settings, source = sensitivity.int8_settings(manifest, {"calibration_images": 3})
    assert source == "defaults" and settings == ort_int8.Settings(calibration_images=3, fallback=False)
    recorded = {"calibrate_method": "minmax", "percentile": 99.9, "calibration_images": 8, "fallback": True,
                "single_mask": False}  # a key the step does not take (the manifest adds it) is ignored
    manifest.artifacts.append(replace(manifest.artifact("encoder.onnx.fp32"), id="encoder.ort.int8", settings=recorded))
    settings, source = sensitivity.int8_settings(manifest, {"percentile": 99.0, "calibrate_method": None})
    assert source == "encoder.ort.int8"
    assert (settings.calibrate_method, settings.percentile, settings.calibration_images, settings.fallback) == ("minmax", 99.0, 8, False)
    with pytest.raises(UsageError, match="percentile"):
        sensitivity.int8_settings(manifest, {"percentile": 50.0})


def test_sensitivity_command_measures_each_group_and_writes_its_report(l0_export, tmp_path):
    folder = tmp_path / "l0"  # links to the session export: the report lands here, not in the shared folder
    folder.mkdir()
    for path in l0_export.iterdir():
        (folder / path.name).symlink_to(path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = cli(folder, "--groups", "neck-pointwise,all", "--calibration-images", "2", "--calibrate-method", "minmax",
               env={"EVSAM_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((folder / "sensitivity.json").read_text())
    assert data["format"] == "evsam-export/sensitivity" and data["variant"] == "l0" and data["settings_from"] == "defaults"
    assert data["settings"]["calibrate_method"] == "minmax" and data["settings"]["calibration_images"] == 2
    assert data["suite"] == "calibration-gate" and data["images"] == 3 and data["skipped"] == []
    neck, every = data["results"]
    assert (neck["group"], every["group"]) == ("neck-pointwise", "all")
    # Exactly the asked-for nodes are INT8 in each row, and every row after the first reuses the calibration.
    assert neck["quantized"] == neck["selected"] == 5 and every["quantized"] == every["selected"] == data["quantizable"]
    assert (neck["ranges_reused"], every["ranges_reused"]) == (False, True)
    # Five 1x1 convs in INT8 cost less embedding SNR than all of them.
    assert every["snr_min_db"] <= every["snr_mean_db"] < neck["snr_min_db"] <= neck["snr_mean_db"]
    assert 5 < every["snr_min_db"] < 60
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("l0 (minmax ranges, settings from defaults)")
    assert any(line.split()[:3] == ["neck-pointwise", "5", "INT8"] for line in lines)
    assert any(line.split()[:2] == ["all", str(data["quantizable"])] for line in lines)
    assert lines[-1] == f"wrote {folder / 'sensitivity.json'}"
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in l0_export.iterdir()] + ["sensitivity.json"])
    assert not list(scratch.iterdir())  # the INT8 work folder is gone


def test_regions_rows_rank_each_block_alone_from_one_quantization(l0_export, tmp_path, monkeypatch):
    """--groups regions: the all-INT8 row, then one row per block of quantized ops (the ranked fallback's units),
    each alone INT8 with every other op's Q/DQ stripped, most harmful first; one calibration for all of them."""
    from evsam_export.steps.fallback import units_of

    monkeypatch.setenv("EVSAM_CACHE_DIR", str(tmp_path / "cache"))
    report = sensitivity.measure_sensitivity(l0_export, ["regions"], {"calibration_images": 2, "calibrate_method": "minmax"})
    every, *regions = report.results
    assert every.group == sensitivity.ALL and every.quantized == report.quantizable
    names = [name for name, _ in units_of(sorted({n for n, _ in sensitivity.quantizable_nodes(
        graph_nodes(l0_export / "encoder.fp32.onnx"), ort_int8.Settings(fallback=False))}))]
    assert sorted(r.group for r in regions) == sorted(names) and len(regions) > 10
    assert sum(r.quantized for r in regions) == every.quantized
    assert [r.snr_min_db for r in regions] == sorted(r.snr_min_db for r in regions)
    # One region alone costs less SNR than all of them together.
    assert every.snr_min_db < regions[0].snr_min_db <= regions[-1].snr_min_db
    with pytest.raises(UsageError, match="'regions' is a table of its own"):
        sensitivity.measure_sensitivity(l0_export, ["regions", "neck"], {})


def test_sensitivity_errors_are_one_line_with_exit_codes(l0_export, tmp_path):
    proc = cli(l0_export, "--groups", "nek", "--report", tmp_path / "never.json")
    assert proc.returncode == 2 and "unknown group 'nek'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never.json").exists()
    proc = cli(
        l0_export, "--groups", "decoder-output-upscaling+decoder-hypernetworks+decoder-iou-head", "--report", tmp_path / "never.json"
    )
    assert (
        proc.returncode == 2
        and "no quantizable Conv node in decoder-output-upscaling+decoder-hypernetworks+decoder-iou-head" in proc.stderr
    )
    assert not (tmp_path / "never.json").exists()
    proc = cli(tmp_path)
    assert proc.returncode == 6 and "manifest.json" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ OpenVINO / NNCF


def test_openvino_rows_are_groups_or_regions_kept_fp32_and_refuse_unknown_names():
    from evsam_export.precision.nncf_int8 import ENCODER_GROUPS

    rows = sensitivity.openvino_rows([])
    assert list(rows) == ["none"] + [g.name for g in ENCODER_GROUPS] and rows["none"] is None
    rows = sensitivity.openvino_rows(["stem+litemla-qkv", "none"])
    assert [r.name for r in rows["stem+litemla-qkv"].regions] == ["stem", "litemla-qkv"]
    with pytest.raises(UsageError, match="unknown graph region 'stme'"):
        sensitivity.openvino_rows(["stme"])
    with pytest.raises(UsageError, match="'decoder-output-upscaling' is not in the encoder"):
        sensitivity.openvino_rows(["neck+decoder-output-upscaling"])


def test_openvino_sensitivity_scores_a_row_end_to_end(copy_export, tmp_path):
    """One NNCF row on synthetic l0: LiteMLA's q/k/v convs fp32, the rest INT8 (the row that passes the
    synthetic-weight gate), scored per prompt kind against the fp32 pair."""
    folder = copy_export("ovsens")  # the runtime refuses symlinked artifact files, and the report lands in the folder
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = cli(folder, "--backend", "openvino", "--groups", "litemla-qkv", "--calibration-images", "2", "--scenes", "1",
               "--bench-runs", "1", env={"TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((folder / "sensitivity.json").read_text())
    assert data["format"] == "evsam-export/sensitivity" and data["backend"] == "openvino" and data["settings_from"] == "defaults"
    assert data["settings"]["calibration_images"] == 2 and data["settings"]["fallback"] is False
    (row,) = data["results"]
    assert row["group"] == "litemla-qkv" and row["fake_quantize"] > 0
    assert set(row["mask_iou"]) == {"point", "points_neg", "box", "box_point", "multimask"} == set(row["miou_drop_points"])
    assert row["snr_min_db"] >= 10.0 and all(0.0 <= v <= 1.0 for v in row["mask_iou"].values()) and row["speedup"] > 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("l0 NNCF INT8 (mixed preset") and lines[1].split()[:3] == ["litemla-qkv", str(row["fake_quantize"]), "FQ"]
    assert not list(scratch.iterdir())  # the IR work folder is gone


def test_openvino_sensitivity_ranks_litemla_qkv_above_the_base_scope(copy_export):
    """On synthetic l0 keeping LiteMLA's q/k/v fp32 lifts the embedding ~20 dB (docs/benchmarks.md): the rows see it."""
    folder = copy_export("ovsens")
    proc = cli(folder, "--backend", "openvino", "--groups", "none,litemla-qkv", "--calibration-images", "2", "--scenes", "1",
               "--bench-runs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    none, qkv = json.loads((folder / "sensitivity.json").read_text())["results"]
    assert qkv["snr_min_db"] > none["snr_min_db"] + 10 and qkv["ignored_nodes"] > none["ignored_nodes"]


def test_openvino_sensitivity_refuses_ort_only_options(l0_export, tmp_path):
    proc = cli(l0_export, "--backend", "openvino", "--percentile", "99.9", "--report", tmp_path / "never.json")
    assert proc.returncode == 2 and "ONNX Runtime settings" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(l0_export, "--preset", "performance", "--report", tmp_path / "never.json")
    assert proc.returncode == 2 and "NNCF settings" in proc.stderr
    proc = cli(l0_export, "--backend", "openvino", "--groups", "stme", "--report", tmp_path / "never.json")
    assert proc.returncode == 2 and "unknown graph region 'stme'" in proc.stderr
    assert not (tmp_path / "never.json").exists()
