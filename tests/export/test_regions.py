"""The region table (evsam_export.export.regions): every region selects nodes in every variant's graph of
its component, a region that selects nothing fails the build, and the precision steps select, through
regions, exactly the nodes their former regex lists selected (the measured recipe results depend on them).
"""

from __future__ import annotations

import re

import pytest

from evsam_export.errors import ExportError, RecipeError
from evsam_export.export import regions
from evsam_export.model.variants import VARIANT_NAMES
from evsam_export.precision import fp16, nncf_int8, ort_int8
from evsam_export.steps.fallback import FallbackGroup, graph_nodes

_ATTENTION = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image)"

# The regions spelled a second way, as hand-written regex lists and fallback groups over the scoped node names
# (the attention products are MatMul..MatMul_3 in the token layout): the regions must select the same
# nodes. Groups: (patterns, stages), in fallback order.
LEGACY_FP16_PATTERNS = (
    r"context_module/main/[^/]+$",
    r"/bicubic_(rows|cols)$",
    r"(^|/)image_encoder/norm/|^/norm/",
    rf"{_ATTENTION}/(MatMul(_\d+)?|Div_\d+|Softmax)$",
    r"output_upscaling\.1/",
    r"mask_downscaling\.[14]/",
)
LEGACY_FP16_GROUPS = (
    ((rf"{_ATTENTION}/",), ""),
    ((r"output_upscaling", r"output_hypernetworks_mlps", r"iou_prediction_head", r"^/[A-Za-z]+(_\d+)?$"), ""),
    ((r"context_module/",), ""),
    ((r"/neck/",), ""),
    ((r"/transformer/",), ""),
    ((), "-1"),
)
LEGACY_INT8_PATTERNS = (
    r"context_module/main/[^/]+$",
    r"(^|/)image_encoder/norm/",
    rf"{_ATTENTION}/MatMul(_\d+)?$",
    r"^/MatMul$",
    r"^/MatMul_2$",
    r"mask_downscaling",
)
LEGACY_INT8_GROUPS = (
    ((r"/neck/middle/op_list\.\d+/main/point_conv/", r"/neck/output_ops"), ""),
    ((r"/neck/input_ops", r"backbone/stages\.0/op_list\.0/"), ""),
    ((r"/neck/",), ""),
    ((), "-1"),
    ((), "-2"),
    ((), "1:-2"),
    ((r"output_upscaling", r"output_hypernetworks_mlps", r"iou_prediction_head"), ""),
    ((rf"{_ATTENTION}/",), ""),
)
# NNCF matched its patterns with re.match from the start of the friendly name.
LEGACY_NNCF_PATTERNS = (
    r".*/image_encoder/norm/.*",
    r".*/norm(\d+|_final_attn)/.*",
    r".*/(mask_downscaling\.[14]|output_upscaling\.1)/.*",
)
LEGACY_NNCF_GROUPS = {
    "encoder": (((r"/context_module/main/(qkv|aggreg)",), ""), ((r"/image_encoder/neck/",), ""), ((), "-1"),
                ((), "-2"), ((), "1:-2"), ((r"backbone/stages\.0/op_list\.0/",), "")),
    "decoder": (((r"/output_upscaling/",), ""),),
}


def legacy_select(nodes, patterns, stages="") -> list[str]:
    """What the former FallbackGroup.select picked (patterns searched, stages by position)."""
    legacy = regions.Region("legacy", "encoder", "former definition", patterns=tuple(patterns), stages=stages)
    return legacy.select(nodes)


def searched(nodes, patterns) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return [name for name, _ in nodes if any(p.search(name) for p in compiled)]


@pytest.fixture(scope="module")
def onnx_nodes(l0_export) -> dict:
    return {component: graph_nodes(l0_export / f"{component}.fp32.onnx") for component in regions.COMPONENTS}


@pytest.fixture(scope="module")
def openvino_nodes(l0_export) -> dict:
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    return {component: nncf_int8.model_nodes(core.read_model(str(l0_export / f"{component}.fp32.onnx")))
            for component in regions.COMPONENTS}


# ------------------------------------------------------------------------------------------ the table


def test_region_names_are_unique_and_described():
    names = [r.name for r in regions.REGIONS]
    assert len(names) == len(set(names))
    for r in regions.REGIONS:
        assert r.component in regions.COMPONENTS and r.reason, r.name
        assert r.patterns or r.op_types or r.stages, r.name
    assert all(r.optional for r in regions.REGIONS if r.name == "neck-upsample")  # only after a graph pass


def test_every_step_names_known_regions_only():
    groups = fp16.FALLBACK_GROUPS + ort_int8.INT8_GROUPS + nncf_int8.ENCODER_GROUPS + nncf_int8.DECODER_GROUPS
    used = set(fp16.FP32_REGIONS) | set(ort_int8.FP32_REGIONS) | set(nncf_int8.FP32_REGIONS)
    used |= {r.name for g in groups for r in g.regions}
    assert not regions.unknown_regions(used)
    with pytest.raises(ExportError, match="no-such-region"):
        FallbackGroup(("no-such-region",), "a typo")


def assert_every_region_matches(nodes_by_component: dict) -> None:
    for r in regions.REGIONS:
        if r.optional:
            continue
        assert r.select(nodes_by_component[r.component]), f"{r.name} matches no {r.component} node"
        regions.require_regions([r], nodes_by_component[r.component], r.component, "test")


def test_every_region_matches_the_l0_graphs(onnx_nodes):
    assert_every_region_matches(onnx_nodes)
    # the default export runs the bicubic pass, so the optional region is present here
    assert len(regions.region("neck-upsample").select(onnx_nodes["encoder"])) == 4


def test_every_region_of_the_nncf_scope_matches_the_l0_openvino_models(openvino_nodes):
    for component, groups in nncf_int8.FALLBACK_GROUPS.items():
        used = regions.regions_of(nncf_int8.FP32_REGIONS, component) + tuple(r for g in groups for r in g.regions)
        for r in used:
            assert r.select(openvino_nodes[component]), f"{r.name} matches no OpenVINO {component} op"


@pytest.mark.full
@pytest.mark.parametrize("variant", [v for v in VARIANT_NAMES if v != "l0"])
def test_every_region_matches_every_variants_graphs(variant, variant_export):
    folder = variant_export(variant)  # shared with the variants' upstream checks
    assert_every_region_matches({c: graph_nodes(folder / f"{c}.fp32.onnx") for c in regions.COMPONENTS})


def test_a_region_that_matches_nothing_fails_the_build(onnx_nodes):
    renamed = [(name.replace("/image_encoder/norm/", "/image_encoder/final_norm/"), op) for name, op in onnx_nodes["encoder"]]
    with pytest.raises(ExportError, match="'encoder-norm'.*encoder graph"):
        regions.protected_nodes(renamed, "encoder", fp16.FP32_REGIONS, where="fp16")
    # an optional region may come up empty: a graph exported without the bicubic pass has no bicubic MatMuls
    no_pass = [(name, op) for name, op in onnx_nodes["encoder"] if "/bicubic_" not in name]
    assert regions.protected_nodes(no_pass, "encoder", fp16.FP32_REGIONS, where="fp16")
    # the regions of the fallback groups are checked too, and extra raw patterns
    stageless = [(name.replace("backbone/stages.", "backbone/blocks."), op) for name, op in onnx_nodes["encoder"]]
    with pytest.raises(ExportError, match="'last-stage'"):
        regions.protected_nodes(stageless, "encoder", (), also_required=regions.regions_of(["last-stage"], "encoder"))
    with pytest.raises(ExportError, match="pattern '/nowhere/'"):
        regions.protected_nodes(onnx_nodes["encoder"], "encoder", (), patterns=("/nowhere/",), where="int8")


def test_settings_refuse_unknown_regions_when_built():
    for settings_class in (fp16.Settings, ort_int8.Settings, nncf_int8.Settings):
        with pytest.raises(RecipeError, match="fp32_regions: unknown region.*'neck-middle'"):
            settings_class(fp32_regions=["neck", "neck-middle"])
        with pytest.raises(RecipeError, match="fp32_patterns"):
            settings_class(fp32_patterns=["(unclosed"])


# ------------------------------------------------------------------------------------------ same nodes as before


def test_fp16_selects_the_nodes_of_its_former_patterns_and_groups(onnx_nodes):
    for component, nodes in onnx_nodes.items():
        assert regions.protected_nodes(nodes, component, fp16.FP32_REGIONS) == searched(nodes, LEGACY_FP16_PATTERNS)
        assert len(fp16.FALLBACK_GROUPS) == len(LEGACY_FP16_GROUPS)
        for group, (patterns, stages) in zip(fp16.FALLBACK_GROUPS, LEGACY_FP16_GROUPS):
            assert group.select(nodes) == legacy_select(nodes, patterns, stages), (component, group.name)
    assert len(searched(onnx_nodes["encoder"], LEGACY_FP16_PATTERNS)) > 0 < len(searched(onnx_nodes["decoder"], LEGACY_FP16_PATTERNS))


def test_ort_int8_selects_the_nodes_of_its_former_patterns_and_groups(onnx_nodes):
    for component, nodes in onnx_nodes.items():
        assert regions.protected_nodes(nodes, component, ort_int8.FP32_REGIONS) == searched(nodes, LEGACY_INT8_PATTERNS)
        assert len(ort_int8.INT8_GROUPS) == len(LEGACY_INT8_GROUPS)
        for op_types in (("Conv",), ("Gemm", "MatMul")):  # the groups select among the quantizable nodes
            quantizable = [(name, op) for name, op in nodes if op in op_types]
            for group, (patterns, stages) in zip(ort_int8.INT8_GROUPS, LEGACY_INT8_GROUPS):
                assert group.select(quantizable) == legacy_select(quantizable, patterns, stages), (component, group.name)
    convs = [(name, op) for name, op in onnx_nodes["encoder"] if op == "Conv"]
    assert [len(g.select(convs)) for g in ort_int8.INT8_GROUPS[:3]] == [5, 4, 12]  # l0's 1x1 neck convs, inputs + stem, neck


def test_nncf_scope_selects_the_nodes_of_its_former_patterns_and_groups(openvino_nodes):
    settings = nncf_int8.Settings()
    for component, nodes in openvino_nodes.items():
        compiled = [re.compile(p) for p in LEGACY_NNCF_PATTERNS]
        legacy = {name for name, _ in nodes if any(p.match(name) for p in compiled)}
        scope = nncf_int8.round_scope(settings, (), nodes, component)
        assert set(scope.names) == legacy and legacy
        groups = nncf_int8.FALLBACK_GROUPS[component]
        assert len(groups) == len(LEGACY_NNCF_GROUPS[component])
        for group, (patterns, stages) in zip(groups, LEGACY_NNCF_GROUPS[component]):
            assert group.select(nodes) == legacy_select(nodes, patterns, stages), (component, group.name)


# ------------------------------------------------------------------------------------------ attention products

# Ops between an attention product and its Softmax that carry the scores/weights along (scaling, bias, layout).
_ATTENTION_PASS_THROUGH = {"Reshape", "Transpose", "Div", "Mul", "Add", "Squeeze", "Unsqueeze", "Cast"}
_SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat", "Constant", "ConstantOfShape"}


def attention_products(model) -> set[str]:
    """The MatMuls that make a Softmax's scores (q@k^T) or consume its weights (attn@v), found by the graph's
    edges rather than names: walk back from each Softmax's input and forward from its output through
    pass-through ops to the first MatMul on every path (a Gemm there is a projection, not a product)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: set[str] = set()
    for softmax in (node for node in model.graph.node if node.op_type == "Softmax"):
        stack = [softmax.input[0]]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.op_type in _SHAPE_OPS or node.op_type == "Gemm":
                continue
            if node.op_type == "MatMul":
                found.add(node.name)
            elif node.op_type in _ATTENTION_PASS_THROUGH:
                stack.extend(node.input[:1] if node.op_type in ("Reshape", "Transpose") else node.input)
        stack = list(consumers.get(softmax.output[0], ()))
        while stack:
            node = stack.pop()
            if node.op_type == "MatMul":
                found.add(node.name)
            elif node.op_type in _ATTENTION_PASS_THROUGH:
                stack.extend(consumer for out in node.output for consumer in consumers.get(out, ()))
    return found


def test_attention_product_regions_cover_every_product_of_the_exported_decoder(l0_export):
    """A region that silently misses an attention product (the token layout renamed them once) fails here:
    the products are found by the graph's edges, and every step that protects them must select them all."""
    import onnx

    model = onnx.load(str(l0_export / "decoder.fp32.onnx"), load_external_data=False)
    nodes = graph_nodes(model)
    products = attention_products(model)
    softmaxes = sum(op == "Softmax" for _, op in nodes)
    assert softmaxes == 7 and len(products) >= 2 * softmaxes  # 2 layers x 3 attentions + the final one
    assert products <= set(regions.region("decoder-attention-products").select(nodes))
    assert products <= set(regions.protected_nodes(nodes, "decoder", fp16.FP32_REGIONS))  # fp16 islands
    assert products <= set(regions.protected_nodes(nodes, "decoder", ort_int8.FP32_REGIONS))  # nodes_to_exclude
    assert "MatMul" in nncf_int8.IGNORED_TYPES  # NNCF's ignored scope keeps every MatMul out of INT8
    # The region's widening stays inside the attention scopes: no projection and no mask product.
    widened = regions.region("decoder-attention-products").select(nodes)
    assert not [name for name in widened if "_proj/" in name or name.startswith("/MatMul")]
