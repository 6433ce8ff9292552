// The demo app's Web Worker: loads the graphs manifest.json names with onnxruntime-web from ../ort-web/,
// encodes the image (preprocessed in sam.js, as processing.preprocess_image does) and answers each prompt
// with the best mask, upscaled and painted by the app's mask graph at the size the page shows it, so the page
// never blocks. Messages in: load, encode, decode, mask, resize; out: progress, and one reply per request id
// ({id, result} or {id, error}). Requests run one at a time, in the order they came.
import * as sam from "./sam.js";

let ort, manifest, sessions = {}, image = null;

const progress = (text, fraction = null) => postMessage({type: "progress", text, fraction});

function artifactOf(id) {
  const found = manifest.artifacts.find((a) => a.id === id);
  if (!found) throw new Error(`manifest.json names ${id} but lists no such artifact`);
  return found;
}

// Fetch a graph with byte progress (the download is most of a first visit).
async function download(artifact) {
  const response = await fetch(`../${artifact.path}`);
  if (!response.ok) throw new Error(`cannot fetch ${artifact.path}: HTTP ${response.status}`);
  const total = Number(response.headers.get("Content-Length")) || artifact.size_bytes;
  const reader = response.body.getReader(), bytes = new Uint8Array(total);
  let received = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    bytes.set(value, received);
    received += value.length;
    progress(`downloading ${artifact.path}: ${(received / 2 ** 20).toFixed(1)} of ${(total / 2 ** 20).toFixed(1)} MiB`, received / total);
  }
  return bytes.subarray(0, received);
}

async function load({threads, spin}) {
  manifest = await (await fetch("../manifest.json")).json();
  const web = manifest.model.web;
  const runtime = new URL(`../${web.runtime_dir}/`, import.meta.url).href;  // absolute: onnxruntime-web resolves its .wasm from it
  ort = await import(`${runtime}${web.entry}`);
  ort.env.wasm.wasmPaths = runtime;
  // Threads need SharedArrayBuffer, so a cross-origin isolated page; onnxruntime-web's own default is half
  // the cores (one thread on 2 cores), the app takes them all up to web.threads.max.
  const cores = navigator.hardwareConcurrency || 1, most = (web.threads && web.threads.max) || cores;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? (threads || Math.min(cores, most)) : 1;
  ort.env.logLevel = "error";
  // Idle pool threads sleep instead of spinning (?spin=1 to spin): a spinning thread takes a core from the page's
  // own rendering and from the rest of a busy machine (measured: a 2-thread click twice as slow with it).
  const options = {extra: {session: {intra_op: {allow_spinning: spin === "1" ? "1" : "0"}}}};
  // The split decoder's halves when the folder has both (image half once per image), else the single graph.
  const split = web.decoder_image && web.decoder_prompt;
  const wanted = {encoder: web.encoder, ...(split ? {decoder_image: web.decoder_image, decoder_prompt: web.decoder_prompt}
                                                 : {decoder: web.decoder})};
  for (const [component, id] of Object.entries(wanted)) {
    const artifact = artifactOf(id);
    const bytes = await download(artifact);
    progress(`starting ${id} (${web.execution_provider})`);
    const session = await ort.InferenceSession.create(bytes, {executionProviders: [web.execution_provider], ...options});
    sessions[component] = {session, artifact, inputs: new Set(artifact.inputs.map((t) => t.name))};
  }
  // The mask graph: tiny, so no download progress; without one (a folder built before it) this app cannot draw.
  if (!web.mask_graph) throw new Error("manifest.json names no mask graph: rebuild the folder with this version of evsam-export");
  sessions.mask = {session: await ort.InferenceSession.create(`../${web.mask_graph}`, {executionProviders: ["wasm"], ...options})};
  const decoder = sessions.decoder_prompt || sessions.decoder;
  const lowRes = decoder.artifact.outputs.find((t) => t.name === "low_res_masks");
  return {variant: manifest.variant, encoderSize: manifest.encoder_size, split: Boolean(split),
          encoder: web.encoder, decoder: split ? `${web.decoder_image} + ${web.decoder_prompt}` : web.decoder,
          tokens: lowRes.shape[1], provider: web.execution_provider, threads: ort.env.wasm.numThreads,
          isolated: self.crossOriginIsolated, cores: navigator.hardwareConcurrency, version: ort.env.versions.web};
}

// contract.decoder_feeds: only the inputs the graph has; no mask prompt; orig_im_size as the Predictor feeds
// it (the `sam` graph's own upscaled masks are never read: the mask graph upscales the chosen one).
const UNREAD_MASKS_SIZE = [1, sam.PROMPT_FRAME];

function feedsFor(entry, values) {
  const feeds = {};
  for (const name of entry.inputs) {
    if (!(name in values)) throw new Error(`${entry.artifact.id} has an input ${name} this app does not know`);
    feeds[name] = values[name];
  }
  return feeds;
}

async function encode({rgba, width, height, shownWidth, shownHeight}) {
  image = null;  // a prompt that arrives while this image encodes must not use the previous image's embeddings
  const started = performance.now();
  const encoder = sessions.encoder;
  const rgb = sam.rgbOf(rgba, width, height);
  const input = encoder.artifact.inputs[0];
  progress("preprocessing");
  // `app` encoders take the raw uint8 RGB image and preprocess in the graph; `host` ones the float tensor.
  const tensor = input.dtype === "uint8"
    ? new ort.Tensor("uint8", rgb, [height, width, 3])
    : new ort.Tensor("float32", sam.preprocess(rgb, width, height, manifest.encoder_size,
                                                manifest.model.encoder_input.normalize).tensor,
                     [1, 3, manifest.encoder_size, manifest.encoder_size]);
  progress(`encoding ${width}x${height} with ${encoder.artifact.id}`);
  const encodeStarted = performance.now();
  const embeddings = (await encoder.session.run({[input.name]: tensor})).image_embeddings;
  const encodeMs = performance.now() - encodeStarted;
  const low = sam.LOW_RES;
  const noMask = {mask_input: new ort.Tensor("float32", new Float32Array(low * low), [1, 1, low, low]),
                  has_mask_input: new ort.Tensor("float32", new Float32Array(1), [1])};
  let imageSide = null;
  if (sessions.decoder_image) {
    progress("decoder image half");
    imageSide = await sessions.decoder_image.session.run(feedsFor(sessions.decoder_image, {image_embeddings: embeddings, ...noMask}));
  }
  const geo = sam.geometry(height, width);
  image = {geometry: geo, embeddings, noMask, imageSide, shown: null,
           frameCrop: new ort.Tensor("int64", BigInt64Array.from(geo.inputSize, BigInt), [2])};
  // One prompt through the decoder and the mask graph at the size shown, so that the first click does not pay
  // for onnxruntime-web's first-run allocations.
  progress("warming up the decoder");
  const warmStarted = performance.now();
  await decode({points: [[width / 2, height / 2]], labels: [1], box: null, width: shownWidth || width,
                height: shownHeight || height, keep: false});
  return {encodeMs, warmupMs: performance.now() - warmStarted, totalMs: performance.now() - started};
}

// The best token's mask at width x height, painted `color` (RGBA bytes) where it is on: RGBA bytes.
async function paint(lowRes, token, width, height, color) {
  const packed = new Int32Array(new Uint8Array(color).buffer);  // the graph's colour: RGBA bytes as one int32
  const out = await sessions.mask.session.run({
    low_res_masks: lowRes,
    token: new ort.Tensor("int64", BigInt64Array.of(BigInt(token)), [1]),
    frame_crop: image.frameCrop,
    size: new ort.Tensor("int64", BigInt64Array.of(BigInt(height), BigInt(width)), [2]),
    color: new ort.Tensor("int32", packed, []),
  });
  const pixels = out.rgba.data;
  return new Uint8Array(pixels.buffer, pixels.byteOffset, pixels.byteLength);
}

const TINT = [0, 0, 255, 110];

// One prompt set: the decoder (the split decoder's prompt half when the folder has it), the best token chosen
// here, and only that mask upscaled, at the size the page draws (width x height). keep: the page's current
// mask (a click), kept for `mask` requests; a pointer preview is not kept.
async function decode({points, labels, box, width, height, keep = true}) {
  if (!image) throw new Error("no image encoded yet");
  const started = performance.now();
  const tokens = sam.promptTokens(image.geometry, points, labels, box);
  const values = {
    ...(image.imageSide || {}), ...image.noMask, image_embeddings: image.embeddings,
    point_coords: new ort.Tensor("float32", tokens.coords, [1, tokens.count, 2]),
    point_labels: new ort.Tensor("float32", tokens.labels, [1, tokens.count]),
    orig_im_size: new ort.Tensor("float32", new Float32Array(UNREAD_MASKS_SIZE), [2]),
  };
  const decoder = sessions.decoder_prompt || sessions.decoder;
  const fixed = decoder.artifact.inputs.find((t) => t.name === "point_coords").shape[1];
  if (Number.isInteger(fixed) && fixed !== tokens.count) {
    throw new Error(`${decoder.artifact.id} takes exactly ${fixed} prompt tokens per call (exported with --static-prompts) and this ` +
                    `prompt has ${tokens.count}; build the web folder from a decoder with dynamic prompts`);
  }
  const out = await decoder.session.run(feedsFor(decoder, values), ["iou_predictions", "low_res_masks"]);
  const decodeMs = performance.now() - started;
  const scores = out.iou_predictions.data, count = out.low_res_masks.dims[1];
  const token = sam.bestToken(scores, count, points.length === 1 && !box);
  const maskStarted = performance.now();
  const rgba = await paint(out.low_res_masks, token, width, height, TINT);
  if (keep) image.shown = {lowRes: out.low_res_masks, token};
  return {rgba, width, height, token, score: scores[token], decodeMs, maskMs: performance.now() - maskStarted,
          totalMs: performance.now() - started, coords: Array.from(tokens.coords), labels: Array.from(tokens.labels)};
}

// The current mask at the image's own size (the Predictor's mask), 0/1 bytes [H x W]: for the download and
// the app test, off the click path.
async function mask() {
  if (!image || !image.shown) throw new Error("no mask yet");
  const [height, width] = image.geometry.originalSize;
  const rgba = await paint(image.shown.lowRes, image.shown.token, width, height, [1, 1, 1, 1]);
  const bytes = new Uint8Array(width * height);
  for (let i = 0; i < bytes.length; i++) bytes[i] = rgba[i * 4];
  return {mask: bytes};
}

// The resize alone, for the app test's byte-for-byte check against Pillow.
function resize({rgba, width, height}) {
  const [newH, newW] = sam.resizedShape(height, width, manifest.encoder_size);
  return {rgb: sam.resizeRgb(sam.rgbOf(rgba, width, height), width, height, newW, newH), width: newW, height: newH};
}

const handlers = {load, encode, decode, mask, resize};
let queue = Promise.resolve();

async function answer(data) {
  try {
    const result = await handlers[data.type](data);
    const buffers = [result && result.rgba, result && result.mask].filter(Boolean).map((a) => a.buffer);
    postMessage({id: data.id, result}, buffers);
  } catch (error) {
    postMessage({id: data.id, error: String((error && error.message) || error)});
  }
}

// One request at a time: an onnxruntime-web session runs one call at a time, and a click queued behind a
// pointer preview must see the image the preview saw.
onmessage = ({data}) => { queue = queue.then(() => answer(data)); };
