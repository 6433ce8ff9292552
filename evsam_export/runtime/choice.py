"""Which artifacts a Predictor runs: the folder's encoder and decoder chosen by target preference, precision and
runtime availability, and the split decoder pair when the folder has one and its gates passed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.errors import ArtifactError, RuntimeUnavailable, UsageError
from evsam_export.manifest import Artifact, Manifest

TARGETS = ("ort", "onnx", "openvino", "tensorrt")
DEFAULT_PREFER = TARGETS
# Default choice: the exact (fp32) artifacts first, then the lower precisions; within a precision, by target
# in the caller's `prefer` order. A named artifact id always wins.
PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")


def _runtime_available(target: str, cache: dict) -> tuple[bool, str]:
    from evsam_export.runners import RUNTIME_OF_TARGET, availability_of

    runtime = RUNTIME_OF_TARGET.get(target)
    if runtime is None:
        return False, f"no runner for target {target!r}"
    if runtime not in cache:
        availability = availability_of(runtime)
        cache[runtime] = (availability.available, availability.reason)
    available, reason = cache[runtime]
    return available, f"{runtime} unavailable: {reason}" if not available else ""


def choose_artifact(manifest: Manifest, component: str, named: str | None, prefer: Sequence[str], cache: dict | None = None,
                    why: dict | None = None) -> Artifact:
    """The artifact of `component` to run: `named` if given, else the folder's recommended one (`run cpu-auto`)
    when its runtime is usable and its target is in `prefer`, else the best runnable one (see PRECISION_ORDER).
    `why[component]` says which of the three it was."""
    cache = {} if cache is None else cache
    why = {} if why is None else why
    if named:
        artifact = manifest.artifact(named)
        if artifact.component != component:
            raise UsageError(f"{named} is a {artifact.component} artifact, not usable as the {component}", hint=f"pass a {component}.* id")
        why[component] = "named"
        return artifact
    recommended = manifest.recommended.get(component)
    if recommended:
        artifact = manifest.artifact(recommended)
        available, reason = _runtime_available(artifact.target, cache) if artifact.target in prefer else (False, "target not in prefer")
        if available:
            why[component] = "recommended"
            return artifact
        why[component] = f"ranked (recommended {recommended} not usable: {reason})"
    else:
        why[component] = "ranked"
    all_of_component = [a for a in manifest.artifacts if a.component == component]
    if not all_of_component:
        raise ArtifactError(f"the manifest has no {component} artifact", hint="re-run `evsam-export export`")
    candidates, skipped = [], []
    for artifact in all_of_component:
        if artifact.target not in prefer:
            skipped.append(f"{artifact.id} (target not in prefer)")
            continue
        available, reason = _runtime_available(artifact.target, cache)
        if not available:
            skipped.append(f"{artifact.id} ({reason})")
            continue
        candidates.append(artifact)
    if not candidates:
        raise RuntimeUnavailable(f"no runnable {component} artifact: " + "; ".join(skipped), hint="install the runtime, or widen prefer")

    def rank(artifact: Artifact) -> tuple[int, int]:
        precision = PRECISION_ORDER.index(artifact.precision) if artifact.precision in PRECISION_ORDER else len(PRECISION_ORDER)
        return precision, list(prefer).index(artifact.target)

    return min(candidates, key=rank)


def gated_decoder_stages(folder: Path | None) -> dict[str, bool]:
    """Decoder artifact id -> whether its decoder stage passed, from the folder's parity.json (written by
    `evsam-export validate DIR` and by a recipe's validate step); {} when there is none."""
    import json

    path = None if folder is None else Path(folder) / "parity.json"
    if path is None or not path.is_file():
        return {}
    try:
        stages = json.loads(path.read_text()).get("stages", [])
        return {s["artifact"]: bool(s["passed"]) for s in stages if s.get("stage") == "decoder"}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


# The decoder segment everything prefers among gated lower precisions, fastest on CPUs first.
SEGMENT_PRECISIONS = ("bf16", "fp16", "int8")


def segment_decoder(folder: Path) -> str | None:
    """The decoder `evsam-export segment` runs when none is named: None (the Predictor's own choice: the
    folder's recommended pair, else fp32) unless the folder recommends nothing and holds a lower-precision
    decoder whose decoder stage passed in its parity.json, which then runs (SEGMENT_PRECISIONS order)."""
    from evsam_export.manifest import read_manifest

    manifest = read_manifest(folder)
    if manifest.recommended.get("decoder"):
        return None
    passed = gated_decoder_stages(folder)
    cache: dict = {}
    for precision in SEGMENT_PRECISIONS:
        for artifact in manifest.artifacts:
            if (artifact.component == "decoder" and artifact.precision == precision and passed.get(artifact.id)
                    and _runtime_available(artifact.target, cache)[0]):
                return artifact.id
    return None


def choose_split_decoder(manifest: Manifest, decoder: Artifact, wanted: bool | None, prefer: Sequence[str],
                         cache: dict | None = None, folder: Path | None = None,
                         chosen: dict | None = None) -> tuple[Artifact, Artifact] | None:
    """(image half, prompt half) of the split decoder beside `decoder`, when `wanted` is not False and both are
    runnable here; `wanted=True` refuses in one line when they are not. The export's own pair is exact by its
    export check; a pair a recipe step built (pipeline/split_lowering.py) runs only once the folder's
    parity.json says it passed its decoder stage, else the decoder runs as one graph. `chosen["split_decoder"]`
    says which pair ran, or why none did."""
    from evsam_export.runners.split_decoder import split_artifact, split_pair_of

    if wanted is not None and not isinstance(wanted, (bool, np.bool_)):
        raise UsageError(f"split_decoder must be True, False or None, got {type(wanted).__name__}")
    if wanted is False:
        return None
    pair = split_pair_of(manifest.artifacts, decoder)
    reason = f"the folder has no split decoder exported beside {decoder.id}" if pair is None else ""
    for artifact in pair or ():
        available, why = _runtime_available(artifact.target, {} if cache is None else cache)
        if artifact.target not in prefer or not available:
            reason = f"{artifact.id}: {why or 'target not in prefer'}"
    # A pair must return what its parent returns (a manifest edited on one side only is not followed).
    tokens = contract.artifact_spec(decoder).mask_tokens
    if pair is not None and contract.artifact_spec(pair[1]).mask_tokens != tokens:
        reason = f"{pair[1].id} returns {contract.artifact_spec(pair[1]).mask_tokens} mask tokens, {decoder.id} {tokens}"
    if pair is not None and not reason and pair[1].step != "export":
        pair_id = split_artifact(*pair).id
        if not gated_decoder_stages(folder).get(pair_id, False):
            reason = f"{pair_id} has no passing decoder stage in {'parity.json' if folder is None else Path(folder) / 'parity.json'}"
    if reason and wanted:
        raise UsageError(f"split_decoder=True, but {reason}",
                         hint="re-export (the split decoder is on by default) or pass split_decoder=None")
    if chosen is not None:
        chosen["split_decoder"] = reason or "beside the decoder" + ("" if pair[1].step == "export" else ", gated in parity.json")
    return None if reason else pair


def normalize_prefer(prefer) -> tuple[str, ...]:
    prefer = (prefer,) if isinstance(prefer, str) else tuple(prefer)
    unknown = [t for t in prefer if t not in TARGETS]
    if unknown or not prefer:
        raise UsageError(f"unknown target(s) in prefer: {unknown or 'empty'}", hint=f"choose from {', '.join(TARGETS)}")
    return prefer
