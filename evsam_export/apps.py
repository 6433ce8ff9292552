"""Config files that annotation apps read, written next to the artifacts so the folder loads unchanged.

X-AnyLabeling's custom-model YAML (`type: efficientvit_sam`): the app feeds the encoder the raw RGB image
(so it needs the `app` encoder profile), feeds the `sam` decoder profile's inputs including orig_im_size,
sends clicks without SAM's padding point (so the decoder must add it: pad_points_in_graph, or a click gives
another mask than PyTorch SAM, IoU 0.89 on docs/benchmarks.md's check), scales clicks by `target_size` (our
prompt frame, 1024, for every variant) and resolves model paths relative to the YAML file.
"""

from __future__ import annotations

from pathlib import Path

from evsam_export import contract
from evsam_export.errors import RecipeError
from evsam_export.model.variants import PROMPT_FRAME

X_ANYLABELING_FILE = "x-anylabeling.yaml"
APP_CONFIGS = ("x_anylabeling",)


def check_app_configs(apps: dict, export: dict, source: str) -> None:
    """Refuse, when a recipe loads, an app config whose app cannot run the recipe's graphs."""
    if apps.get("x_anylabeling"):
        if export.get("encoder_profile", "host") != "app":
            raise RecipeError(f"{source}: [apps] x_anylabeling: X-AnyLabeling feeds the encoder raw pixels",
                              hint='set encoder_profile = "app" in [export]')
        if export.get("decoder_profile", "sam") != "sam":
            raise RecipeError(f"{source}: [apps] x_anylabeling: X-AnyLabeling feeds orig_im_size and reads masks",
                              hint='set decoder_profile = "sam" in [export]')
        if not export.get("pad_points_in_graph", False):
            raise RecipeError(f"{source}: [apps] x_anylabeling: X-AnyLabeling sends clicks without SAM's padding point",
                              hint="set pad_points_in_graph = true in [export]")


def x_anylabeling_config(manifest, encoder, decoder, recipe_name: str) -> dict:
    """X-AnyLabeling's custom-model config for `encoder` and `decoder` (manifest Artifacts) of this folder."""
    encoder_spec, decoder_spec = contract.artifact_spec(encoder), contract.artifact_spec(decoder)
    if encoder_spec.profile != "app" or decoder_spec.profile != "sam" or not decoder.settings.get("pad_points_in_graph"):
        raise RecipeError(f"X-AnyLabeling needs the app encoder and the sam decoder that pads points, not {encoder.id} and {decoder.id}")
    name = f"efficientvit_sam_{manifest.variant}_{recipe_name}".replace("-", "_")
    return {
        "type": "efficientvit_sam",
        "name": name,
        "display_name": f"EfficientViT-SAM {manifest.variant} ({recipe_name}, evsam-export)",
        "target_size": PROMPT_FRAME,
        "encoder_model_path": encoder.path,  # relative to this file: X-AnyLabeling resolves them from its folder
        "decoder_model_path": decoder.path,
    }


def write_app_configs(folder: Path, manifest, apps: dict, encoder_id: str, decoder_id: str, recipe_name: str) -> list[str]:
    """Write the configs `apps` asks for into `folder` (a staging folder); returns the written file names."""
    import yaml

    written = []
    if apps.get("x_anylabeling"):
        config = x_anylabeling_config(manifest, manifest.artifact(encoder_id), manifest.artifact(decoder_id), recipe_name)
        (folder / X_ANYLABELING_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        written.append(X_ANYLABELING_FILE)
    return written


def refresh_app_configs(folder: Path, manifest, decoder_id: str) -> dict[str, str]:
    """After a decoder re-export: point the app configs in `folder` whose decoder is gone at `decoder_id`
    when the app can run it, else remove them; returns {file: what was done} for the files it touched."""
    import yaml

    path = folder / X_ANYLABELING_FILE
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text())
    if any(a.path == config.get("decoder_model_path") for a in manifest.artifacts):
        return {}
    encoder = next((a for a in manifest.artifacts if a.path == config.get("encoder_model_path")), None)
    try:
        if encoder is None:
            raise RecipeError(f"its encoder {config.get('encoder_model_path')} is not in the manifest")
        fresh = x_anylabeling_config(manifest, encoder, manifest.artifact(decoder_id), "")
    except RecipeError as error:
        path.unlink()
        return {X_ANYLABELING_FILE: f"removed: the new decoder does not suit X-AnyLabeling ({error.message})"}
    config["decoder_model_path"] = fresh["decoder_model_path"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {X_ANYLABELING_FILE: f"now loads {fresh['decoder_model_path']} (its decoder was replaced)"}
