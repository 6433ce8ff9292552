"""The graph regions that precision steps keep at higher precision, in one table.

A region is a named set of nodes of one component's graph, chosen by node-name regexes (searched in the
TorchScript-scoped ONNX names, which OpenVINO keeps as friendly names), op types and/or backbone stages by
position. fp16 islands, ORT `nodes_to_exclude`, NNCF `IgnoredScope` and the fallback groups all name
regions from `REGIONS`, so one name means the same nodes in every backend.

A region that selects nothing in a graph of its component fails the build (`require_regions`): renaming a
module must not silently drop a protected island. Only a region marked `optional`, with the reason, may
come up empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from evsam_export.errors import ExportError, SettingValueError

COMPONENTS = ("encoder", "decoder")

_BACKBONE_STAGE = re.compile(r"backbone/stages\.(\d+)/")
# The four attention modules of SAM's two-way transformer (each a separate scope in the decoder graph).
_ATTENTION = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)"


@dataclass(frozen=True)
class Region:
    """Nodes of one component's graph, chosen by name, op type and/or backbone stage (all given must hold)."""

    name: str
    component: str  # "encoder" or "decoder"
    reason: str  # why these nodes need care (one line)
    patterns: tuple[str, ...] = ()  # regexes searched in node names (a node matches any of them)
    op_types: tuple[str, ...] = ()
    # Backbone stages as a Python slice over the stages the graph has ("-1": the last, "1:-2": all but the
    # stem stage and the last two). By position, not number: l0-l2 have stages 0-4, xl0/xl1 stages 0-5, so a
    # literal "stages.4" would miss xl's last stage.
    stages: str = ""
    optional: str = ""  # why this region may select nothing in a graph of its component ("" = it may not)

    def select(self, nodes: Iterable[tuple[str, str]]) -> list[str]:
        """Names of the (name, op_type) nodes in this region, in graph order."""
        nodes = list(nodes)
        if not (self.patterns or self.op_types or self.stages):
            return []
        compiled = [re.compile(p) for p in self.patterns]
        chosen_stages = _stage_numbers(nodes, self.stages) if self.stages else None
        chosen = []
        for name, op_type in nodes:
            if self.op_types and op_type not in self.op_types:
                continue
            if compiled and not any(p.search(name) for p in compiled):
                continue
            if chosen_stages is not None:
                found = _BACKBONE_STAGE.search(name)
                if found is None or int(found.group(1)) not in chosen_stages:
                    continue
            chosen.append(name)
        return chosen


def _stage_numbers(nodes: list[tuple[str, str]], stages: str) -> set[int]:
    present = sorted({int(found.group(1)) for name, _ in nodes if (found := _BACKBONE_STAGE.search(name))})
    parts = [int(part) if part else None for part in stages.split(":")]
    if len(parts) == 1:  # one index: the one-stage slice (out of range selects nothing)
        parts = [parts[0], parts[0] + 1 or None]
    return set(present[slice(*parts)])


REGIONS: tuple[Region, ...] = (
    # ---------------------------------------------------------------------------------------- encoder
    Region("stem", "encoder", "the stem conv reads the normalised image directly, so its error reaches every later layer",
           patterns=(r"backbone/stages\.0/op_list\.0/",)),
    Region("early-stages", "encoder", "the fused-MBConv stages between the stem stage and the last two (l: 1-2, xl: 1-3)",
           stages="1:-2"),
    Region("second-last-stage", "encoder", "the stage before the last (l: stage-3 MBConvs; xl: the first attention stage)",
           stages="-2"),
    Region("last-stage", "encoder", "the last backbone stage (l: stage 4, xl: stage 5): the widest channels and the "
           "largest activations of the backbone", stages="-1"),
    Region("litemla", "encoder", "whole LiteMLA modules (qkv, multi-scale aggregation, core, proj): the linear "
           "attention sums over all tokens and amplifies any error fed into it", patterns=(r"context_module/",)),
    Region("litemla-qkv", "encoder", "LiteMLA's q/k/v producers (qkv conv and multi-scale aggregation convs), whose "
           "error the linear attention sums over all tokens", patterns=(r"/context_module/main/(qkv|aggreg)",)),
    Region("litemla-core", "encoder", "LiteMLA's linear attention itself (Pad, v@k^T, (vk)@q, the 1e-15 eps Add, Div): "
           "a ratio of sums that upstream computes in fp32", patterns=(r"context_module/main/[^/]+$",)),
    Region("neck", "encoder", "the fusion neck merges three scales and writes the embedding: no later layer averages "
           "its error out", patterns=(r"/neck/",)),
    Region("neck-inputs", "encoder", "the neck's 1x1 input projections of the three backbone scales",
           patterns=(r"/neck/input_ops",)),
    Region("neck-pointwise", "encoder", "the neck's 1x1 convs (FusedMBConv point convs and the output conv that "
           "writes the embedding)", patterns=(r"/neck/middle/op_list\.\d+/main/point_conv/", r"/neck/output_ops")),
    Region("neck-upsample", "encoder", "the bicubic neck upsample as two MatMuls: upstream runs it in fp32, and its "
           "weights (-0.07..1.07) sum four taps", patterns=(r"/bicubic_(rows|cols)$",),
           optional="present only after the bicubic-resize-as-matmul graph pass; otherwise it is a Resize node"),
    Region("encoder-norm", "encoder", "the final LayerNorm2d (every op of it), ending in image_embeddings: a "
           "per-pixel variance whose mean of squares overflows fp16", patterns=(r"(^|/)image_encoder/norm/|^/norm/",)),
    # ---------------------------------------------------------------------------------------- decoder
    Region("decoder-attention", "decoder", "whole attention blocks, q/k/v/out projections included: SAM decoder "
           "activations have extreme outliers", patterns=(rf"{_ATTENTION}/",)),
    Region("decoder-attention-products", "decoder", "the attention products q@k^T and attn@v, where the outliers meet "
           "(every MatMul of an attention's own scope: the token layout reassociates them into (q W_k) @ image^T and "
           "attn @ image then @ W_v^T, so they are MatMul..MatMul_3 there, the projections live in subscopes)",
           patterns=(rf"{_ATTENTION}/MatMul(_\d+)?$",)),
    Region("decoder-attention-softmax", "decoder", "the 1/sqrt(d) scaling and Softmax of the attention scores: exp() "
           "saturates fp16", patterns=(rf"{_ATTENTION}/(Div_\d+|Softmax)$",)),
    Region("decoder-transformer", "decoder", "the two-way transformer (its MLPs, norms and attention)",
           patterns=(r"/transformer/",)),
    Region("decoder-transformer-norms", "decoder", "the transformer's nn.LayerNorms (norm1..norm4, norm_final_attn)",
           patterns=(r"/norm(\d+|_final_attn)/",)),
    Region("decoder-mask-downscaling", "decoder", "the mask_input convs: calibration feeds carry no mask input, so "
           "their activation ranges are never seen", patterns=(r"mask_downscaling",)),
    Region("decoder-mask-downscaling-norms", "decoder", "the LayerNorm2d blocks of the mask_input path "
           "(mask_downscaling.1 and .4)", patterns=(r"mask_downscaling\.[14]/",)),
    Region("decoder-upscaling-norm", "decoder", "the LayerNorm2d of the output upscaling (output_upscaling.1)",
           patterns=(r"output_upscaling\.1/",)),
    Region("decoder-output-upscaling", "decoder", "the transposed convs and norm that make the mask features "
           "multiplied with the hypernetwork tokens", patterns=(r"/output_upscaling/",)),
    Region("decoder-hypernetworks", "decoder", "the hypernetwork MLPs whose tokens weight the mask features",
           patterns=(r"output_hypernetworks_mlps",)),
    Region("decoder-iou-head", "decoder", "the IoU prediction head, which ranks the masks",
           patterns=(r"iou_prediction_head",)),
    Region("decoder-top-level", "decoder", "the decoder's own top-level ops (prompt encoding, mask product, mask "
           "selection and upscaling): they make the outputs directly", patterns=(r"^/[A-Za-z]+(_\d+)?$",)),
    Region("decoder-prompt-encoding", "decoder", "the prompt coordinates times the Gaussian matrix before sin/cos: an "
           "INT8 step there is a whole pixel of phase error", patterns=(r"^/MatMul$",)),
    Region("decoder-mask-product", "decoder", "hyper_in @ upscaled embedding, which is the mask logits",
           patterns=(r"^/MatMul_2$",)),
)

_BY_NAME = {region.name: region for region in REGIONS}


def region(name: str) -> Region:
    """The region called `name`; ExportError for an unknown name."""
    if name not in _BY_NAME:
        raise ExportError(f"unknown graph region {name!r}", hint=f"regions: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def unknown_regions(names: Iterable[str]) -> list[str]:
    """The names in `names` that are not regions of the table."""
    return [name for name in names if name not in _BY_NAME]


def check_region_names(field: str, names: Iterable[str]) -> None:
    """Refuse a settings field that names regions the table does not have (SettingValueError)."""
    unknown = unknown_regions(names)
    if unknown:
        raise SettingValueError(field, f"unknown region(s) {', '.join(map(repr, unknown))}",
                                hint=f"regions: {', '.join(_BY_NAME)}")


def check_patterns(field: str, patterns: Iterable[str]) -> None:
    """Refuse a settings field whose node-name regexes do not compile (SettingValueError)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SettingValueError(field, f"{pattern!r} is not a regular expression ({exc})") from exc


def regions_of(names: Iterable[str], component: str) -> tuple[Region, ...]:
    """The named regions that belong to `component`, in the order given."""
    return tuple(r for r in (region(name) for name in names) if r.component == component)


def select(regions: Iterable[Region], nodes: Sequence[tuple[str, str]]) -> list[str]:
    """Names of the nodes in any of `regions`, in graph order."""
    chosen = {name for r in regions for name in r.select(nodes)}
    return [name for name, _ in nodes if name in chosen]


def protected_nodes(nodes: Sequence[tuple[str, str]], component: str, region_names: Iterable[str],
                    patterns: Iterable[str] = (), also_required: Iterable[Region] = (), where: str = "") -> list[str]:
    """Names of the nodes of `component`'s graph that the named regions (those of that component) and the
    extra node-name regexes select, in graph order. Fails the build first when one of them, or one of
    `also_required` (e.g. the regions of the fallback groups), selects nothing in the graph."""
    chosen_regions = regions_of(region_names, component)
    require_regions(chosen_regions + tuple(also_required), nodes, component, where)
    compiled = [re.compile(p) for p in patterns]
    for pattern, regex in zip(patterns, compiled):
        if not any(regex.search(name) for name, _ in nodes):
            raise ExportError(f"{where}: pattern {pattern!r} matches no node of the {component} graph")
    chosen = set(select(chosen_regions, nodes)) | {name for name, _ in nodes if any(p.search(name) for p in compiled)}
    return [name for name, _ in nodes if name in chosen]


def require_regions(regions: Iterable[Region], nodes: Sequence[tuple[str, str]], component: str, where: str) -> None:
    """Fail the build when a non-optional region of `component` selects no node of its graph."""
    for r in regions:
        if r.component == component and not r.optional and not r.select(nodes):
            raise ExportError(f"{where}: region {r.name!r} matches no node of the {component} graph",
                              hint="a module was renamed or the export changed; update evsam_export/export/regions.py")
