// The demo app's page: image input, prompts from the mouse, mask overlay (with a preview under the pointer)
// and download. The models run in app/worker.js; `window.evsam` is a small hook for tests and scripts
// (loadImage, click, box, clear, maskBytes, state, timings), driving the same code paths as the mouse.
const $ = (id) => document.getElementById(id);
const imageCanvas = $("image"), overlay = $("overlay");
const worker = new Worker("app/worker.js", {type: "module"});
const pending = new Map();
let nextId = 0, info = null, picture = null, prompts = {points: [], labels: [], box: null}, result = null;
// Timings the page takes (milliseconds): each click from its pointer event to the frame after the overlay is
// drawn, each pointer preview likewise, the page load to the model ready, the image's encoding.
const timings = {loadMs: null, image: null, clicks: [], previews: []};

function call(type, payload = {}, transfer = []) {
  const id = nextId++;
  worker.postMessage({type, id, ...payload}, transfer);
  return new Promise((resolve, reject) => pending.set(id, {resolve, reject}));
}

worker.onmessage = ({data}) => {
  if (data.type === "progress") return showProgress(data.text, data.fraction === null ? "busy" : data.fraction);
  const request = pending.get(data.id);
  pending.delete(data.id);
  if (data.error !== undefined) request.reject(new Error(data.error));
  else request.resolve(data.result);
};
worker.onerror = (event) => showError(`the worker failed: ${event.message || "see the console"}`);

// fraction: a number in 0..1, "busy" (a bar without an end) or "none" (no bar).
function showProgress(text, fraction = "none") {
  $("status").textContent = text;
  const bar = $("progress");
  bar.hidden = fraction === "none";
  if (fraction === "busy") bar.removeAttribute("value"); else if (fraction !== "none") bar.value = fraction;
}

function showError(text) {
  $("error").textContent = text ? `error: ${text}` : "";
  if (text) showProgress("");
}

const query = new URLSearchParams(location.search);
const ready = call("load", {threads: Number(query.get("threads") || 0), spin: query.get("spin")}).then((loaded) => {
  info = loaded;
  timings.loadMs = performance.now();  // from the navigation's start
  $("model").textContent = `Model: ${info.variant} (${info.encoder}, ${info.decoder}), onnxruntime-web ${info.version}, ` +
    `${info.provider}, ${info.threads} WASM thread${info.threads === 1 ? "" : "s"} of ${info.cores} cores` +
    `${info.isolated ? "" : " (page not cross-origin isolated: one thread)"}.`;
  showProgress("ready: open an image");
  return info;
}, (error) => { showError(`cannot load the model: ${error.message}`); throw error; });

// The overlay is drawn at the size the image is shown (device pixels, at most the image's own size): the mask
// graph upscales the chosen mask to it, so a photo larger than the screen costs only the pixels shown.
function shownSize() {
  const rect = imageCanvas.getBoundingClientRect(), ratio = window.devicePixelRatio || 1;
  return {width: Math.max(1, Math.min(picture.width, Math.round(rect.width * ratio))),
          height: Math.max(1, Math.min(picture.height, Math.round(rect.height * ratio)))};
}

// Decode with the browser (EXIF orientation applied, no colour management, like Pillow) and read RGBA.
async function pixelsOf(blob, name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image"});
  } catch (error) {
    throw new Error(`this browser cannot decode ${name} as an image (${error.message}); use a PNG, JPEG, WebP or GIF file`);
  }
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  return {bitmap, rgba: context.getImageData(0, 0, bitmap.width, bitmap.height).data};
}

async function openImage(blob, name) {
  showError("");
  await ready;
  const {bitmap, rgba} = await pixelsOf(blob, name);
  imageCanvas.width = bitmap.width; imageCanvas.height = bitmap.height;
  imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
  picture = {width: bitmap.width, height: bitmap.height, name, encoded: false};
  const shown = shownSize();
  overlay.width = shown.width; overlay.height = shown.height;
  clearPrompts();
  showProgress(`encoding ${name}...`, "busy");
  const timing = await call("encode", {rgba, width: bitmap.width, height: bitmap.height, shownWidth: shown.width,
                                       shownHeight: shown.height}, [rgba.buffer]);
  picture.encoded = true;
  timings.image = timing;
  showProgress(`${name} encoded in ${(timing.encodeMs / 1000).toFixed(1)} s: click on it`);
  return timing;
}

async function guarded(promise) {
  try { return await promise; } catch (error) { showError(error.message); throw error; }
}

function clearPrompts() {
  prompts = {points: [], labels: [], box: null};
  result = null;
  drawnSeq = requestSeq++;  // a preview or click answered after this is not drawn over the cleared overlay
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  $("clear").disabled = $("download").disabled = true;
}

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve(performance.now())));
let drawnSeq = -1, requestSeq = 0;

// Decode `asked` at the size shown; the answer is drawn unless a newer one was drawn meanwhile.
async function decodeShown(asked, keep) {
  const seq = requestSeq++;
  const shown = shownSize();
  if (overlay.width !== shown.width || overlay.height !== shown.height) { overlay.width = shown.width; overlay.height = shown.height; }
  const answer = await call("decode", {...asked, ...shown, keep});
  if (seq < drawnSeq) return null;
  drawnSeq = seq;
  draw(answer, asked);
  return answer;
}

// startedAt: the pointer event's time (performance.now() clock), or now for calls from evsam.click/box.
async function segment(startedAt = performance.now()) {
  showProgress("segmenting...");  // text only: a click takes a fraction of a second, an animated bar would repaint through it
  const asked = {points: prompts.points.slice(), labels: prompts.labels.slice(), box: prompts.box};
  const answer = await decodeShown(asked, true);
  if (!answer) return null;  // cleared or superseded while it ran
  result = answer;
  const drawnAt = await nextFrame();
  timings.clicks.push({ms: drawnAt - startedAt, decodeMs: result.decodeMs, maskMs: result.maskMs});
  showProgress(`score ${result.score.toFixed(3)} (mask token ${result.token}), decoder ${result.decodeMs.toFixed(0)} ms, ` +
               `click to mask ${(drawnAt - startedAt).toFixed(0)} ms`);
  $("clear").disabled = $("download").disabled = false;
  return {score: result.score, token: result.token};
}

// The overlay: the mask graph's RGBA at the overlay's size, then the prompts on top (image coordinates scaled).
function draw(answer, asked) {
  const context = overlay.getContext("2d");
  if (!answer) { context.clearRect(0, 0, overlay.width, overlay.height); return; }
  const pixels = new Uint8ClampedArray(answer.rgba.buffer, answer.rgba.byteOffset, answer.rgba.byteLength);
  context.putImageData(new ImageData(pixels, answer.width, answer.height), 0, 0);
  const scale = overlay.width / picture.width;
  const radius = Math.max(3, Math.round(Math.max(overlay.width, overlay.height) / 150));
  if (asked.box) {
    const [x0, y0, x1, y1] = asked.box.map((v) => v * scale);
    context.strokeStyle = "#0c0"; context.lineWidth = radius / 2; context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  asked.points.forEach(([x, y], i) => {
    context.fillStyle = asked.labels[i] ? "#0c0" : "#d00";
    context.beginPath(); context.arc(x * scale, y * scale, radius, 0, 2 * Math.PI); context.fill();
  });
}

function addPoint(x, y, positive, startedAt) {
  prompts.points.push([x, y]);
  prompts.labels.push(positive ? 1 : 0);
  return segment(startedAt);
}

function setBox(x0, y0, x1, y1, startedAt) {
  prompts.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  return segment(startedAt);
}

// The preview while the pointer moves over the image: the current prompts plus the pointer as one more point,
// at most one in flight and PREVIEW_INTERVAL_MS apart, always the pointer's latest position (SAM's demo
// throttles its hover mask likewise). It is drawn, never kept: a click decodes its own prompts.
const PREVIEW_INTERVAL_MS = 30;
let hover = null, previewing = false;

async function preview() {
  previewing = true;
  try {
    while (hover && picture && picture.encoded && !press) {
      const {at, positive, startedAt} = hover;
      hover = null;
      const asked = {points: [...prompts.points, at], labels: [...prompts.labels, positive ? 1 : 0], box: prompts.box};
      const answer = await decodeShown(asked, false);
      const drawnAt = await nextFrame();
      if (answer) timings.previews.push({ms: drawnAt - startedAt, decodeMs: answer.decodeMs, maskMs: answer.maskMs});
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, PREVIEW_INTERVAL_MS - (performance.now() - startedAt))));
    }
  } catch (error) {
    showError(error.message);
  } finally {
    previewing = false;
  }
}

// Back to the committed mask (or none) when the pointer leaves the image.
function unhover() {
  hover = null;
  drawnSeq = requestSeq++;
  draw(result, prompts);
}

// Mouse: a press and release within 4 screen pixels is a click, farther apart a box.
let press = null;
const imagePoint = (event) => {
  const rect = imageCanvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * picture.width / rect.width, (event.clientY - rect.top) * picture.height / rect.height];
};
imageCanvas.addEventListener("pointerdown", (event) => {
  if (picture && picture.encoded) press = {clientX: event.clientX, clientY: event.clientY, at: imagePoint(event), shift: event.shiftKey};
});
imageCanvas.addEventListener("pointerup", (event) => {
  if (!press) return;
  const start = press, end = imagePoint(event);
  press = null;
  hover = null;
  const moved = Math.hypot(event.clientX - start.clientX, event.clientY - start.clientY);
  guarded(moved < 4 ? addPoint(...start.at, !start.shift, event.timeStamp) : setBox(...start.at, ...end, event.timeStamp)).catch(() => {});
});
imageCanvas.addEventListener("pointermove", (event) => {
  if (!picture || !picture.encoded || press) return;
  hover = {at: imagePoint(event), positive: !event.shiftKey, startedAt: event.timeStamp};
  if (!previewing) preview();
});
imageCanvas.addEventListener("pointerleave", () => { if (picture && picture.encoded) unhover(); });

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) guarded(openImage(file, file.name)).catch(() => {});
});
const stage = $("stage");
stage.addEventListener("dragover", (event) => { event.preventDefault(); stage.classList.add("over"); });
stage.addEventListener("dragleave", () => stage.classList.remove("over"));
stage.addEventListener("drop", (event) => {
  event.preventDefault();
  stage.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) guarded(openImage(file, file.name)).catch(() => {});
});
$("clear").addEventListener("click", () => { clearPrompts(); showProgress("cleared: click again"); });

// The current mask at the image's own size (the mask graph at that size), 0/1 bytes.
async function fullMask() {
  return (await call("mask")).mask;
}

async function maskPng() {
  const mask = await fullMask();
  const canvas = document.createElement("canvas");
  canvas.width = picture.width; canvas.height = picture.height;
  const context = canvas.getContext("2d"), pixels = context.createImageData(picture.width, picture.height);
  mask.forEach((on, i) => { pixels.data.fill(on ? 255 : 0, i * 4, i * 4 + 3); pixels.data[i * 4 + 3] = 255; });
  context.putImageData(pixels, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

$("download").addEventListener("click", async () => {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await maskPng());
  link.download = `${picture.name.replace(/\.[^.]*$/, "")}.mask.png`;
  link.click();
  URL.revokeObjectURL(link.href);
});

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

window.evsam = {
  ready: () => ready,
  async loadImage(url) {
    const response = await fetch(url);
    return guarded(response.ok ? openImage(await response.blob(), url.split("/").pop())
                               : Promise.reject(new Error(`cannot fetch ${url}: HTTP ${response.status}`)));
  },
  click: (x, y, positive = true) => guarded(addPoint(x, y, positive)),
  box: (x0, y0, x1, y1) => guarded(setBox(x0, y0, x1, y1)),
  clear: clearPrompts,
  // The current mask at the image's size, H x W bytes 0/1, base64 (null before the first prompt).
  async maskBytes() { return result ? base64(await fullMask()) : null; },
  // The overlay as drawn (its size, and 0/1 where the mask is painted), base64.
  overlayBytes() {
    const {width, height} = overlay, rgba = overlay.getContext("2d").getImageData(0, 0, width, height).data;
    const on = new Uint8Array(width * height);
    for (let i = 0; i < on.length; i++) on[i] = rgba[i * 4 + 2] === 255 && rgba[i * 4] === 0 ? 1 : 0;
    return {width, height, mask: base64(on)};
  },
  timings: () => timings,
  previewIdle: () => !previewing && hover === null,
  async maskPngBase64() { return base64(new Uint8Array(await (await maskPng()).arrayBuffer())); },
  state: () => ({info, picture, prompts, score: result && result.score, token: result && result.token,
                 coords: result && result.coords, error: $("error").textContent, status: $("status").textContent}),
  // The encoder-size resize of an image alone (Pillow's filter, in sam.js), packed RGB base64.
  async resized(url) {
    const {rgba, bitmap} = await pixelsOf(await (await fetch(url)).blob(), url);
    const out = await call("resize", {rgba, width: bitmap.width, height: bitmap.height});
    return {width: out.width, height: out.height, rgb: base64(out.rgb)};
  },
};
