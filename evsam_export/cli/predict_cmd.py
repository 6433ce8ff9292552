"""`evsam-export predict`: segment one image with an artifact folder (torch-free runtime).

Writes MASK.png (the best mask per prompt set; with several boxes their union, plus MASK.<i>.png per box),
MASK.overlay.png (masks tinted over the image, points and boxes drawn) and MASK.json (scores and prompts),
and prints one score line per prompt set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evsam_export.cli.common import DebugOption, run_guarded
from evsam_export.cli.root import app


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (LABEL 1 foreground, default; 0 background)."""
    from evsam_export.errors import UsageError

    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise UsageError(f"bad --point {text!r}", hint="use X,Y or X,Y,LABEL with LABEL 1 (foreground) or 0 (background)") from None
    if label not in (0.0, 1.0):
        raise UsageError(f"bad --point {text!r}: label {parts[2]} is not 0 or 1", hint="1 foreground, 0 background")
    return x, y, int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    from evsam_export.errors import UsageError

    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"bad --box {text!r}", hint="use X0,Y0,X1,Y1 in pixels (top-left, bottom-right)") from None
    return x0, y0, x1, y1


def output_paths(output: Path, count: int) -> dict:
    from evsam_export.errors import UsageError

    if output.suffix.lower() != ".png":
        raise UsageError(f"--output {output} must end with .png")
    if output.is_dir():
        raise UsageError(f"--output {output} is a directory", hint="pass a file name such as mask.png")
    base = output.with_suffix("")
    return {
        "mask": output,
        "overlay": base.with_name(base.name + ".overlay.png"),
        "json": base.with_name(base.name + ".json"),
        "per_prompt": [base.with_name(f"{base.name}.{i}.png") for i in range(count)] if count > 1 else [],
    }


def save_mask(mask, path: Path) -> None:
    import numpy as np
    from PIL import Image

    # One uint8 copy of the mask (np.where would build an int64 image first, 8 bytes per pixel).
    Image.fromarray(np.asarray(mask, dtype=bool).view(np.uint8) * np.uint8(255), mode="L").save(path, format="PNG")


@app.command("predict")
def predict_command(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Artifact folder (with manifest.json).", show_default=False)],
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="Image file (PNG, JPEG, ...; RGB, grayscale, RGBA or palette).", show_default=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="MASK.png", help="Mask PNG to write (MASK.png).", show_default=False)],
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point", "-p", metavar="X,Y[,LABEL]", help="A point in pixels; LABEL 1 foreground (default), 0 background. Repeatable."
        ),
    ] = None,
    box: Annotated[
        list[str] | None,
        typer.Option(
            "--box",
            "-b",
            metavar="X0,Y0,X1,Y1",
            help="A box in pixels (top-left, bottom-right). Repeatable: one prompt set and mask per box.",
        ),
    ] = None,
    multimask: Annotated[bool, typer.Option("--multimask", help="Score 3 candidates per prompt set and keep the best.")] = False,
    encoder: Annotated[str | None, typer.Option("--encoder", metavar="ID", help="Encoder artifact id, e.g. encoder.ort.int8.")] = None,
    decoder: Annotated[str | None, typer.Option("--decoder", metavar="ID", help="Decoder artifact id, e.g. decoder.onnx.fp32.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Runtime threads (default: the runtime's).")] = None,
    memory_budget: Annotated[
        float | None,
        typer.Option(
            "--memory-budget",
            metavar="MIB",
            min=1,
            help="Working memory in MiB for one chunk of prompt sets (default: the runtime's); masks and scores do not depend on it.",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Segment IMAGE with the artifacts in DIR: writes MASK.png, MASK.overlay.png and MASK.json, prints the scores."""

    def body() -> None:
        import json

        import numpy as np

        from evsam_export import api
        from evsam_export.data.images import read_image_file
        from evsam_export.errors import OutputError, UsageError
        from evsam_export.output import check_writable_parent, disk_full_error
        from evsam_export.overlay import prompt_overlay
        from evsam_export.runtime import check_prompts

        points = [parse_point(text) for text in point or []]
        boxes = [parse_box(text) for text in box or []]
        if not points and not boxes:
            raise UsageError("give at least one --point X,Y[,LABEL] or --box X0,Y0,X1,Y1")
        paths = output_paths(output, len(boxes))
        for path in (paths["mask"], paths["overlay"], paths["json"], *paths["per_prompt"]):
            check_writable_parent(path)  # fail before the models run, not after
        rgb = read_image_file(image)
        point_coords = np.array([p[:2] for p in points], dtype=np.float64) if points else None
        point_labels = np.array([p[2] for p in points], dtype=np.float64) if points else None
        box_array = np.array(boxes, dtype=np.float64) if boxes else None
        check_prompts(rgb.shape[:2], point_coords, point_labels, boxes=box_array)  # fail before loading models

        budget = {} if memory_budget is None else {"memory_budget_mib": memory_budget}
        predictor = api.predictor(folder, encoder=encoder, decoder=decoder, threads=threads, **budget)
        with predictor:
            predictor.set_image(rgb)
            prediction = predictor.predict(point_coords, point_labels, boxes=box_array, multimask_output=multimask)
        scores, best_index = prediction.scores, prediction.best_index()
        # [B,H,W]: a view when there is one candidate per prompt set, so the masks are not held twice.
        best = prediction.masks[:, 0] if prediction.masks.shape[1] == 1 else prediction.best_masks()
        del prediction  # with --multimask the other candidates are never written: free them before the overlay
        union = np.any(best, axis=0)

        try:
            paths["mask"].parent.mkdir(parents=True, exist_ok=True)
            save_mask(union, paths["mask"])
            for mask, path in zip(best, paths["per_prompt"]):
                save_mask(mask, path)
            prompt_overlay(rgb, best, points, boxes).save(paths["overlay"], format="PNG")
        except OSError as exc:
            raise disk_full_error(exc, fallback=output) or OutputError(
                f"cannot write {output}: {exc.strerror or exc}", hint="check the folder exists and is writable"
            ) from None

        height, width = rgb.shape[:2]
        results = []
        for index in range(len(scores)):
            choice = int(best_index[index])
            area = int(best[index].sum())
            results.append({
                "index": index,
                "box": list(boxes[index]) if boxes else None,
                "scores": [round(float(s), 6) for s in scores[index]],
                "best": choice,
                "score": round(float(scores[index, choice]), 6),
                "area_px": area,
                "mask": paths["per_prompt"][index].name if paths["per_prompt"] else paths["mask"].name,
            })
            label = f"box {index} {[round(v, 1) for v in boxes[index]]}" if boxes else "points"
            candidates = f" (candidate {choice + 1} of {scores.shape[1]})" if multimask else ""
            typer.echo(
                f"{label}: score {scores[index, choice]:.4f}{candidates}, "
                f"{area} px ({100.0 * area / (height * width):.1f}% of the image)"
            )
        report = {
            "image": str(image),
            "image_size": [height, width],
            "folder": str(folder),
            "encoder": predictor.encoder_artifact.id,
            "decoder": predictor.decoder_artifact.id,
            "multimask": multimask,
            "prompts": {
                "points": [{"x": x, "y": y, "label": label} for x, y, label in points],
                "boxes": [list(b) for b in boxes],
            },
            "results": results,
            "mask": paths["mask"].name,
            "union_area_px": int(union.sum()),
            "overlay": paths["overlay"].name,
        }
        try:
            paths["json"].write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            unwritable = OutputError(f"cannot write {paths['json']}: {exc.strerror or exc}")
            raise disk_full_error(exc, fallback=paths["json"]) or unwritable from None
        written = [paths["mask"], *paths["per_prompt"], paths["overlay"], paths["json"]]
        typer.echo("wrote " + ", ".join(str(p) for p in written))

    run_guarded(debug, body)
