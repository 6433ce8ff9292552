"""`evsam-export segment`: every mask of an image (or of each image in a folder) with an artifact folder, by
the torch-free MaskGenerator (docs/segment.md).

OUT/<name>.json holds one COCO-style record per mask (segmentation as RLE, area, bbox XYWH, predicted_iou,
point_coords, stability_score, crop_box); OUT/<name>.overlay.png shows every mask coloured and outlined;
OUT/segment.json records the settings, artifacts and per-image counts and times. OUT is written to a
temporary folder beside it and moved into place when every image is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app

SUMMARY_NAME = "segment.json"
JSON_OUTPUT_MODES = ("coco_rle", "uncompressed_rle")


def setting(flag: str, text: str):
    """A generator setting's option: left out, MaskGenerator's default applies (upstream's; docs/segment.md)."""
    return typer.Option(flag, help=f"{text} (default: MaskGenerator's, docs/segment.md)", show_default=False)


def generator_defaults() -> dict:
    """MaskGenerator's own defaults (upstream's), so options left out mean what they mean in Python."""
    import inspect

    from evsam_export.runtime import MaskGenerator

    parameters = inspect.signature(MaskGenerator.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name not in ("self", "predictor")}


def read_point_grids(path: Path) -> list:
    """A JSON file with a list of point grids (one per crop layer), each a list of [x, y] in 0..1."""
    import json

    from evsam_export.errors import UsageError

    try:
        grids = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read --point-grids {path}: {' '.join(str(exc).split())[:120]}") from None
    if not isinstance(grids, list) or not grids:
        raise UsageError(f"--point-grids {path} must hold a list of grids, one per crop layer", hint='e.g. [[[0.5, 0.5], [0.25, 0.75]]]')
    return grids


def image_files(source: Path) -> list[Path]:
    """The files to segment: `source` itself, or the visible regular files of the folder `source`, sorted."""
    from evsam_export.errors import UsageError

    if not source.exists():
        raise UsageError(f"image not found: {source}")
    if not source.is_dir():
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UsageError(f"folder {source} has no files to segment", hint="pass an image, or a folder of images")
    return files


def output_names(files: list[Path]) -> list[str]:
    """Output base names: the file stem, or the whole file name where two inputs share a stem."""
    from collections import Counter

    stems = Counter(p.stem for p in files)
    return [p.stem if stems[p.stem] == 1 else p.name for p in files]


@app.command("segment")
def segment_command(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Artifact folder (with manifest.json).", show_default=False)],
    source: Annotated[Path, typer.Argument(metavar="IMAGE|FOLDER", help="An image, or a folder of images.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", help="Output folder (created).", show_default=False)],
    points_per_side: Annotated[int | None, setting("--points-per-side", "Grid points per image side; not with --point-grids.")] = None,
    point_grids: Annotated[
        Path | None,
        typer.Option("--point-grids", metavar="JSON", help="Explicit grids: a JSON list, per crop layer a list of (x, y) pairs in 0..1."),
    ] = None,
    points_per_batch: Annotated[int | None, setting("--points-per-batch", "Grid points sent to the predictor at once.")] = None,
    pred_iou_thresh: Annotated[float | None, setting("--pred-iou-thresh", "Keep masks with predicted IoU above this (0..1).")] = None,
    stability_score_thresh: Annotated[float | None, setting("--stability-score-thresh", "Keep masks at least this stable (0..1).")] = None,
    stability_score_offset: Annotated[float | None, setting("--stability-score-offset", "Logit offset of the stability score.")] = None,
    box_nms_thresh: Annotated[float | None, setting("--box-nms-thresh", "Box IoU above which a duplicate in a crop goes.")] = None,
    crop_n_layers: Annotated[int | None, setting("--crop-n-layers", "Crop layers: layer i runs again on (2**i)**2 crops.")] = None,
    crop_nms_thresh: Annotated[float | None, setting("--crop-nms-thresh", "Box IoU above which a duplicate across crops goes.")] = None,
    crop_overlap_ratio: Annotated[float | None, setting("--crop-overlap-ratio", "Overlap of layer-1 crops, share of short side.")] = None,
    crop_n_points_downscale_factor: Annotated[
        int | None, setting("--crop-n-points-downscale-factor", "Layer i uses points_per_side / factor**i points per side.")
    ] = None,
    min_mask_region_area: Annotated[int | None, setting("--min-mask-region-area", "Remove holes and islands under this many px.")] = None,
    output_mode: Annotated[
        str, typer.Option("--output-mode", help="Segmentation in the JSON: coco_rle (compressed) or uncompressed_rle.")
    ] = "coco_rle",
    encoder: Annotated[str | None, typer.Option("--encoder", metavar="ID", help="Encoder artifact id, e.g. encoder.ort.int8.")] = None,
    decoder: Annotated[str | None, typer.Option("--decoder", metavar="ID", help="Decoder artifact id, e.g. decoder.onnx.fp32.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Runtime threads (default: the runtime's).")] = None,
    memory_budget: Annotated[
        float | None, typer.Option("--memory-budget", metavar="MIB", help="Working memory in MiB for one decoder chunk of prompts.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is not empty.")] = False,
    debug: DebugOption = False,
) -> None:
    """Segment everything in IMAGE (or every image in FOLDER) with the artifacts in DIR: OUT/<name>.json (COCO
    RLE per mask), OUT/<name>.overlay.png, OUT/segment.json; prints the mask count and time per image."""

    def body() -> None:
        import json
        import time
        from concurrent.futures import ThreadPoolExecutor

        from evsam_export import api
        from evsam_export.data.images import read_image_file as read_image
        from evsam_export.errors import UsageError
        from evsam_export.output import check_output_folder, staged_folder
        from evsam_export.overlay import segments_overlay
        from evsam_export.progress import Reporter
        from evsam_export.runtime.mask_generator import check_settings, decode_mask

        if output_mode not in JSON_OUTPUT_MODES:
            raise UsageError(f"--output-mode must be one of {', '.join(JSON_OUTPUT_MODES)}, got {output_mode!r}"[:160])
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        if memory_budget is not None and not memory_budget > 0:
            raise UsageError(f"--memory-budget must be a positive number of MiB, got {memory_budget:g}")
        grids = read_point_grids(point_grids) if point_grids is not None else None
        given = {
            "points_per_side": points_per_side,
            "point_grids": grids,
            "points_per_batch": points_per_batch,
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "stability_score_offset": stability_score_offset,
            "box_nms_thresh": box_nms_thresh,
            "crop_n_layers": crop_n_layers,
            "crop_nms_thresh": crop_nms_thresh,
            "crop_overlap_ratio": crop_overlap_ratio,
            "crop_n_points_downscale_factor": crop_n_points_downscale_factor,
            "min_mask_region_area": min_mask_region_area,
            "output_mode": output_mode,
        }
        settings = generator_defaults() | {name: value for name, value in given.items() if value is not None}
        if grids is not None and points_per_side is None:
            settings["points_per_side"] = None  # --point-grids replaces the default grid
        check_settings(**settings)  # bad options fail before the models load
        check_output_folder(output, force)
        files = image_files(source)
        single = not source.is_dir()
        first_image = read_image(files[0]) if single else None  # an unreadable single image fails before the models load

        budget = {} if memory_budget is None else {"memory_budget_mib": memory_budget}
        reporter = Reporter()
        results, skipped = [], []
        chosen_decoder = decoder or api.segment_decoder(folder)
        with api.predictor(folder, encoder=encoder, decoder=chosen_decoder, threads=threads, **budget) as predictor:
            generator = api.mask_generator(predictor, **settings)
            with staged_folder(output, force) as staging:
                items = list(zip(files, output_names(files)))

                def encode(path: Path):
                    """The image read and encoded (every crop), or the UsageError that says why it cannot be."""
                    try:
                        return generator.prepare(first_image if single else read_image(path))
                    except UsageError as exc:
                        return exc

                # The encoder of the next image runs in a second thread while this one decodes.
                with ThreadPoolExecutor(max_workers=1) as pool:
                    upcoming = pool.submit(encode, items[0][0])
                    tracked = items if single else reporter.track(items, f"segmenting {len(items)} files")
                    for index, (path, name) in enumerate(tracked):
                        encoded = upcoming.result()
                        if index + 1 < len(items):
                            upcoming = pool.submit(encode, items[index + 1][0])
                        if isinstance(encoded, UsageError):
                            if single:
                                raise encoded
                            skipped.append({"file": path.name, "reason": encoded.one_line()})
                            continue
                        started = time.perf_counter()
                        records = generator.generate(encoded.rgb, encoded)
                        seconds = time.perf_counter() - started + encoded.seconds
                        json_path, overlay_path = staging / f"{name}.json", staging / f"{name}.overlay.png"
                        json_path.write_text(json.dumps(records) + "\n")
                        segmentations = [record["segmentation"] for record in records]
                        segments_overlay(encoded.rgb, [record["area"] for record in records],
                                         lambda index, masks=segmentations: decode_mask(masks[index])).save(overlay_path, format="PNG")
                        stats = generator.last_stats["seconds"]
                        results.append({
                            "image": str(path), "masks": len(records), "seconds": round(seconds, 3),
                            "json": json_path.name, "overlay": overlay_path.name,
                            "counts": generator.last_stats["counts"],
                            "stage_seconds": {key: round(value, 3) for key, value in stats.items()},
                        })
                        typer.echo(
                            f"{path.name}: {len(records)} masks in {seconds:.1f} s (encoder {stats['encoder']:.1f} s, "
                            f"decoder {stats['decoder']:.1f} s, post-processing {stats['postprocess']:.1f} s)"
                        )
                if not results:
                    unreadable = f"none of the {len(files)} files in {source} is a readable image"
                    raise UsageError(unreadable, hint="use PNG, JPEG, BMP, TIFF or WebP")
                summary = {
                    "folder": str(folder),
                    "source": str(source),
                    "encoder": predictor.encoder_artifact.id,
                    "decoder": predictor.decoder_artifact.id,
                    "split_decoder": predictor.info["split_decoder"],
                    "settings": {key: value for key, value in settings.items() if key != "point_grids"}
                    | {"point_grids": grids is not None, "decoder_workers": generator.decoder_workers},
                    "images": results,
                    "skipped": skipped,
                }
                (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        total = sum(r["seconds"] for r in results)
        for result in results:
            reporter.artifact("ok", result["seconds"], Path(output) / result["json"],
                              note=f"{result['masks']} masks, {result['seconds']:.1f} s/image")
        reporter.print_summary()
        if skipped:
            typer.echo(f"warning: skipped {len(skipped)} unreadable file(s): " + ", ".join(s["file"] for s in skipped)[:300], err=True)
        typer.echo(f"{len(results)} image(s), {sum(r['masks'] for r in results)} masks, "
                   f"{total / len(results):.1f} s per image ({summary['encoder']} + {summary['decoder']}); wrote {output}")

    run_guarded(debug, body)
