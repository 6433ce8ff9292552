"""Web target: ONNX graphs a page runs with onnxruntime-web, plus the runtime's own files, in one folder that
works offline (layout in evsam_export/web/__init__.py).

* Standard ONNX only: the ORT targets' `com.microsoft` fusions (FastGelu) are kernels of ONNX Runtime's
  native CPU build; onnxruntime-web's WebGPU EP lacks most contrib ops, so a graph carrying one is refused
  here instead of failing in a user's browser. The graph is not pre-optimized: onnxruntime-web optimizes it
  at session start for whichever EP the page picks (an offline-optimized file would carry CPU-EP fusions).
* `fp16` here means fp16 *storage*: every large float32 initializer is stored as float16 and cast back to
  float32 by a Cast node that the session constant-folds at load, so the download halves while the WASM
  EP computes in float32 as before (it has almost no fp16 kernels). It is gated with the fp16 tolerances.
* `int8` comes from the ORT QDQ step (evsam_export.precision.ort_int8, with graph_passes = [] so no
  contrib op enters); QuantizeLinear/DequantizeLinear are standard ops the WASM EP runs.
* One file per graph under 2 GB: onnxruntime-web reads the model into 32-bit WASM memory (4 GB at most,
  shared with activations), so larger graphs need external data, which this target does not produce.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export.contract import DECODER, SPLIT_DECODER
from evsam_export.errors import ExportError, RuntimeUnavailable
from evsam_export.manifest import Artifact, Manifest
from evsam_export.steps.settings import SettingValueError, StepSettings
from evsam_export.steps.step import StepContext, artifact_filename

EXECUTION_PROVIDERS = ("wasm", "webgpu")
STANDARD_DOMAINS = ("", "ai.onnx")
MAX_GRAPH_BYTES = 2 * 1024**3 - 1  # protobuf's limit, and far past what a page should download
FP16_MAX = 65504.0
# onnxruntime-web 1.30 refuses a file whose IR version is newer ("max supported IR version: 13"); the onnx
# package writes 14 for models it builds, our exports carry 8.
MAX_IR_VERSION = 13
# The decoder precisions at which this step also builds the split decoder's halves (pipeline/split_lowering.py),
# which the demo app runs in the single graph's place (the image half once per image, the prompt half per click).
SPLIT_DECODER_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Settings(StepSettings):
    # onnxruntime-web execution provider the folder is built for: "wasm" (CPU, every browser) or "webgpu"
    execution_provider: str = "wasm"
    # Refuse to build for "webgpu" when this machine's browser cannot run it (so it could not be gated here).
    require_webgpu: bool = True
    # fp16 storage: float32 initializers with at least this many elements are stored as float16.
    fp16_min_elements: int = 1024
    # Told by the runner: fp32, fp16 (fp16 storage) or int8 (the parent is the ORT QDQ graph).
    precision: str = "fp32"

    def check(self) -> None:
        self.require_one_of("execution_provider", EXECUTION_PROVIDERS)
        self.require_at_least("fp16_min_elements", 1)
        if self.precision not in ("fp32", "fp16", "int8"):
            raise SettingValueError("precision", f"{self.precision!r} is not one of 'fp32', 'fp16', 'int8'")


def preflight(values: dict) -> None:
    """Before any export: the onnxruntime-web files must be here (they are copied into the folder), and a
    WebGPU build needs a browser with WebGPU unless `require_webgpu` is off. Raises RuntimeUnavailable."""
    from evsam_export.web.dist import find_dist, missing_reason

    if find_dist() is None:
        raise RuntimeUnavailable(f"web target: {missing_reason()}")
    settings = Settings(**{k: v for k, v in values.items() if k != "precision"})
    if settings.execution_provider == "webgpu" and settings.require_webgpu:
        missing = webgpu_missing()
        if missing:
            raise RuntimeUnavailable(
                f"web target: the browser here has no WebGPU ({missing})",
                hint="use the web-wasm recipe, run where Chromium exposes a GPU, or --set target.require_webgpu=false to build unchecked")


def webgpu_missing() -> str:
    """Why this machine's headless Chromium cannot run the WebGPU EP ("" when it can)."""
    from evsam_export.runners.browser import BrowserPage, browser_availability
    from evsam_export.web.dist import BUNDLES, find_dist

    state = browser_availability()
    if not state.available:
        return state.reason
    page = BrowserPage({"/ort-web/": find_dist()}, {"entry": BUNDLES["webgpu"][0], "threads": 1})
    try:
        return page.open().call("evsam.webgpuMissing()")
    finally:
        page.close()


def foreign_ops(model) -> list[str]:
    """`domain.OpType` of every node outside the standard ONNX domains, sorted, once each."""
    return sorted({f"{node.domain}.{node.op_type}" for node in model.graph.node if node.domain not in STANDARD_DOMAINS})


def store_weights_fp16(model, min_elements: int) -> dict:
    """Store large float32 initializers as float16, each followed by a Cast back to float32 under its old
    name (so every consumer is unchanged). Initializers that fp16 cannot hold (|x| > 65504) stay float32.
    Constant nodes holding a tensor become initializers first (the l0 encoder keeps 47 MB of its weights in
    35 Constant nodes). Returns counts and bytes for the manifest."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    lifted = [node for node in graph.node if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]]
    for node in lifted:
        tensor = node.attribute[0].t
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    lifted_ids = {id(node) for node in lifted}
    remaining = [node for node in graph.node if id(node) not in lifted_ids]
    del graph.node[:]
    graph.node.extend(remaining)
    graph_inputs = {i.name for i in graph.input}
    kept, casts = [], []
    stored = skipped_range = 0
    before = after = 0
    for init in graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        before += size * (4 if init.data_type == TensorProto.FLOAT else 0)
        if init.data_type != TensorProto.FLOAT or size < min_elements or init.name in graph_inputs:
            kept.append(init)
            after += size * (4 if init.data_type == TensorProto.FLOAT else 0)
            continue
        values = numpy_helper.to_array(init)
        if np.abs(values).max(initial=0.0) > FP16_MAX:
            skipped_range += 1
            kept.append(init)
            after += size * 4
            continue
        half = numpy_helper.from_array(values.astype(np.float16), f"{init.name}.fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], name=f"{init.name}.to_fp32", to=TensorProto.FLOAT))
        stored += 1
        after += size * 2
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return {"initializers_fp16": stored, "kept_fp32_out_of_range": skipped_range, "float_weight_bytes_before": before,
            "float_weight_bytes_after": after}


def copy_runtime(folder: Path, execution_provider: str) -> tuple[list[str], str]:
    """Copy the onnxruntime-web files a page needs for `execution_provider` into folder/ort-web; returns
    (paths relative to `folder`, version)."""
    from evsam_export.web import WEB_RUNTIME_DIR
    from evsam_export.web.dist import BUNDLES, dist_version, find_dist, missing_reason

    dist = find_dist()
    if dist is None:
        raise RuntimeUnavailable(f"web target: {missing_reason()}")
    target = folder / WEB_RUNTIME_DIR
    target.mkdir(exist_ok=True)
    version = dist_version(dist)
    copied = []
    for name in BUNDLES[execution_provider]:
        shutil.copyfile(dist / name, target / name)
        copied.append(f"{WEB_RUNTIME_DIR}/{name}")
    (target / "VERSION").write_text(version + "\n")
    copied.append(f"{WEB_RUNTIME_DIR}/VERSION")
    return copied, version


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    import onnx

    started = time.perf_counter()
    model = onnx.load(str(ctx.path_of(parent)))
    foreign = foreign_ops(model)
    if foreign:
        raise ExportError(
            f"{parent.id}: {', '.join(foreign)} are ONNX Runtime contrib ops onnxruntime-web does not run on every EP",
            hint="build the web target from the plain export; for INT8 set [precision.int8] graph_passes = []")
    if model.ir_version > MAX_IR_VERSION:
        raise ExportError(f"{parent.id}: ONNX IR version {model.ir_version}; onnxruntime-web reads up to {MAX_IR_VERSION}",
                          hint="re-export with evsam-export (IR 8), or save the graph with an older onnx package")
    facts: dict = {}
    if settings.precision == "fp16":
        facts["fp16_storage"] = store_weights_fp16(model, settings.fp16_min_elements)
    if model.ByteSize() > MAX_GRAPH_BYTES:
        raise ExportError(f"{parent.id}: the graph is {model.ByteSize() / 1e9:.1f} GB, past the 2 GB one file can hold",
                          hint="use fp16 storage or INT8 for this variant")
    path = ctx.folder / artifact_filename(parent.component, "web", settings.precision, "onnx")
    onnx.save(model, str(path))
    runtime_files, version = copy_runtime(ctx.folder, settings.execution_provider)
    runtime_bytes = sum((ctx.folder / name).stat().st_size for name in runtime_files)
    facts.update(ort_web_version=version, download_bytes=path.stat().st_size, runtime_bytes=runtime_bytes,
                 op_types=sorted({node.op_type for node in model.graph.node}))
    artifact = ctx.new_artifact(
        parent,
        path,
        target="web",
        precision=settings.precision,
        step="web",
        settings={"runtime": "onnxruntime-web", "execution_provider": settings.execution_provider,
                  "storage": "fp16 weights, fp32 compute" if settings.precision == "fp16" else settings.precision},
        facts=facts,
        started=started,
        extra_files=runtime_files,
    )
    # The runtime files are shared by every graph of the folder: an artifact's size is what its own graph adds.
    return [dataclasses.replace(artifact, size_bytes=path.stat().st_size)]


def mask_graph():
    """The demo app's mask graph (onnxruntime-web runs it beside the decoder, in WASM): one token of the
    decoder's low-res logits -> the 1024 prompt frame -> the crop that holds the resized image -> the size it
    is shown at, thresholded at 0 and painted as RGBA pixels (`color` where the mask is on, 0 elsewhere).
    This is processing.postprocess_masks + binarize (bilinear, half-pixel centres, no antialias) for one mask;
    at the image's own size it is the Predictor's mask.

    Inputs: low_res_masks float32 [1, T, 256, 256], token int64 [1], frame_crop int64 [2] (rows, cols of the
    resized image in the frame), size int64 [2] (height, width drawn), color int32 [] (the RGBA bytes packed
    little-endian, R in the low byte). Output: rgba int32 [height, width], whose bytes are the RGBA pixels (a
    0/1 mask times the packed colour: ONNX Runtime's broadcasting Where to [height, width, 4] uint8 took 13 of
    the graph's 19 ms on a 640x480 image, this Mul 0.3 ms)."""
    from onnx import TensorProto, helper

    from evsam_export.model.processing import MASK_THRESHOLD
    from evsam_export.model.variants import LOW_RES_MASK_SIZE, PROMPT_FRAME

    def const(name, dtype, values):
        return helper.make_tensor(name, dtype, [len(values)], values)

    resize = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
    nodes = [
        helper.make_node("Gather", ["low_res_masks", "token"], ["chosen"], axis=1),
        helper.make_node("Resize", ["chosen", "", "", "frame_sizes"], ["frame"], **resize),
        helper.make_node("Slice", ["frame", "zeros2", "frame_crop", "axes23"], ["cropped"]),
        helper.make_node("Concat", ["ones2", "size"], ["shown_sizes"], axis=0),
        helper.make_node("Resize", ["cropped", "", "", "shown_sizes"], ["logits"], **resize),
        helper.make_node("Greater", ["logits", "threshold"], ["on"]),
        helper.make_node("Squeeze", ["on", "axes01"], ["on_hw"]),
        helper.make_node("Cast", ["on_hw"], ["on_int"], to=TensorProto.INT32),
        helper.make_node("Mul", ["on_int", "color"], ["rgba"]),
    ]
    graph = helper.make_graph(
        nodes, "evsam_mask",
        [helper.make_tensor_value_info("low_res_masks", TensorProto.FLOAT, [1, "tokens", LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE]),
         helper.make_tensor_value_info("token", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("frame_crop", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("size", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("color", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("rgba", TensorProto.INT32, ["height", "width"])],
        [const("frame_sizes", TensorProto.INT64, [1, 1, PROMPT_FRAME, PROMPT_FRAME]),
         const("zeros2", TensorProto.INT64, [0, 0]), const("axes23", TensorProto.INT64, [2, 3]),
         const("ones2", TensorProto.INT64, [1, 1]), const("axes01", TensorProto.INT64, [0, 1]),
         helper.make_tensor("threshold", TensorProto.FLOAT, [], [MASK_THRESHOLD])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="evsam-export")
    model.ir_version = 8  # what onnxruntime-web reads (MAX_IR_VERSION)
    return model


def write_app(folder: Path) -> list[str]:
    """Copy the static demo app (evsam_export/web/assets/app: index.html at the folder's root, its scripts
    under app/) into `folder` and write its mask graph (MASK_GRAPH); returns the paths written, relative to
    `folder`."""
    import onnx

    from evsam_export.web import APP_ASSETS, APP_DIR, MASK_GRAPH

    (folder / APP_DIR).mkdir(exist_ok=True)
    written = []
    for source in sorted(APP_ASSETS.iterdir()):
        relative = source.name if source.name == "index.html" else f"{APP_DIR}/{source.name}"
        shutil.copyfile(source, folder / relative)
        written.append(relative)
    onnx.save(mask_graph(), str(folder / MASK_GRAPH))
    return written + [MASK_GRAPH]


def finish(folder: Path, manifest: Manifest) -> None:
    """Write the demo app and record what a page needs to know in manifest.model["web"]: where the runtime is,
    which entry file and EP, the graphs to load, the onnxruntime-web version and the download size of each
    graph and of the runtime."""
    from evsam_export.web import CROSS_ORIGIN_ISOLATION_HEADERS, MASK_GRAPH, MAX_WASM_THREADS, WEB_RUNTIME_DIR
    from evsam_export.web.dist import BUNDLES

    web = [a for a in manifest.artifacts if a.target == "web"]
    if not web:
        return
    provider = web[0].settings["execution_provider"]
    runtime_bytes = sum((Path(folder) / WEB_RUNTIME_DIR / name).stat().st_size for name in BUNDLES[provider])
    graphs = {a.id: a.facts["download_bytes"] for a in web}
    latest = {a.component: a.id for a in web}  # the newest graph of each component
    # What a page loads: the split decoder's halves in place of the single graph when both are here.
    split = all(half in latest for half in SPLIT_DECODER)
    loaded = [c for c in latest if c not in ((DECODER,) if split else SPLIT_DECODER)]
    manifest.model["web"] = {
        "runtime": "onnxruntime-web",
        "ort_web_version": web[0].facts["ort_web_version"],
        "runtime_dir": WEB_RUNTIME_DIR,
        "entry": BUNDLES[provider][0],
        "execution_provider": provider,
        "encoder": latest.get("encoder"),
        "decoder": latest.get("decoder"),
        # The split decoder's halves, which the demo app loads instead of the single graph when both are here.
        **({c: latest[c] for c in SPLIT_DECODER} if split else {}),
        "app": write_app(Path(folder)),
        "download_bytes": {"runtime": runtime_bytes, **graphs,
                           "total": runtime_bytes + sum(graphs[latest[c]] for c in loaded)},
        "headers_for_threads": CROSS_ORIGIN_ISOLATION_HEADERS,
        # How many WASM threads the demo app runs (the page shows the number it got).
        "threads": {"cross_origin_isolated": f"navigator.hardwareConcurrency, at most {MAX_WASM_THREADS}",
                    "not_isolated": 1, "max": MAX_WASM_THREADS, "override": "?threads=N in the page URL"},
        "mask_graph": MASK_GRAPH,
    }
