"""The split decoder through a recipe's decoder steps: when a step lowers or converts the decoder,
the same step builds the two halves exported beside the decoder it started from, so the Predictor can run the
lowered pair in the lowered decoder's place.

A lowered pair is kept only when, chained, it matches the lowered single graph within that precision's
decoder-stage tolerance (validators/default.toml), and the recipe's validate step then gates it against
PyTorch like any decoder. A step that cannot lower the halves (its module declares no
SPLIT_DECODER_PRECISIONS for the precision: TensorRT, INT8 through NNCF) or a pair that misses the check
leaves no halves: the lowered decoder's `facts.split_decoder` says which happened and why, and the
Predictor runs the lowered decoder as one graph. Nothing ever pairs a lowered decoder with fp32 halves.
"""

from __future__ import annotations

from dataclasses import replace

from evsam_export import contract
from evsam_export.manifest import Artifact
from evsam_export.steps.step import StepContext


def lower_split_pair(ctx: StepContext, module, settings, parent: Artifact, built: list[Artifact]) -> list[Artifact]:
    """The halves of the split decoder beside `parent`, built by `module` with `settings` and parented to the
    decoder in `built`; [] when there is none to build or the lowered pair is not kept (facts say why)."""
    from evsam_export.runners.split_decoder import split_pair_of

    lowered = next((a for a in built if a.component == contract.DECODER), None)
    pair = split_pair_of(ctx.manifest.artifacts, parent)
    if lowered is None:
        return []
    if pair is None:  # a precision step before this one did not keep the halves: say so on what ships
        if "split_decoder" in parent.facts:
            lowered.facts["split_decoder"] = dict(parent.facts["split_decoder"])
        return []
    step_name = module.__name__.rsplit(".", 1)[-1]
    if lowered.precision not in getattr(module, "SPLIT_DECODER_PRECISIONS", ()):
        lowered.facts["split_decoder"] = {
            "kept": False,
            "reason": f"the {step_name} step does not build the split decoder at {lowered.precision}: {lowered.id} runs as one graph"}
        return []
    halves = []
    with ctx.reporter.step(f"split decoder: {', '.join(a.id for a in pair)} through the {step_name} step"):
        for half in pair:
            made = [a for a in module.build(ctx, half, settings) if a.component == half.component]
            halves += [replace(a, parent=lowered.id) for a in made]
    if [a.component for a in halves] != list(contract.SPLIT_DECODER):
        _remove(ctx, halves)
        lowered.facts["split_decoder"] = {"kept": False, "reason": f"the {step_name} step built {[a.id for a in halves]} from the halves"}
        return []
    check = _check_lowered_pair(ctx, lowered, halves)
    if check["misses"]:
        _remove(ctx, halves)
        lowered.facts["split_decoder"] = {"kept": False, "reason": "the lowered pair misses the lowered single graph: "
                                          + "; ".join(check["misses"]), "check": check["facts"]}
        return []
    halves[1] = replace(halves[1], facts={**halves[1].facts, "split_check": check["facts"]})
    lowered.facts["split_decoder"] = {"kept": True, "halves": [a.id for a in halves]}
    return halves


def _check_lowered_pair(ctx: StepContext, lowered: Artifact, halves: list[Artifact]) -> dict:
    from evsam_export.pipeline.split_check import (
        single_graph_outputs,
        split_check_facts,
        split_check_limits,
        split_check_misses,
        split_pair_differences,
    )
    from evsam_export.runners import runner_for_artifact
    from evsam_export.runners.split_decoder import SplitDecoderRunner

    limits, table = split_check_limits(lowered.precision)
    image, prompt = (runner_for_artifact(ctx.folder, a, ctx.threads) for a in halves)
    with runner_for_artifact(ctx.folder, lowered, ctx.threads) as single, SplitDecoderRunner(image, prompt) as split:
        worst = split_pair_differences(single_graph_outputs(single), split, contract.artifact_spec(halves[1]))
    return {"misses": split_check_misses(worst, limits),
            "facts": split_check_facts(lowered.id, contract.artifact_spec(halves[1]), worst, limits, table)}


def _remove(ctx: StepContext, artifacts: list[Artifact]) -> None:
    for artifact in artifacts:
        for name in [artifact.path, *artifact.extra_files]:
            (ctx.folder / name).unlink(missing_ok=True)
