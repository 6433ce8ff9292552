// The demo app's page: image input, prompts from the mouse, mask overlay and download. The models run in
// app/worker.js; `window.evsam` is a small hook for tests and scripts (loadImage, click, box, clear,
// maskBytes, state), driving the same code paths as the mouse.
const $ = (id) => document.getElementById(id);
const imageCanvas = $("image"), overlay = $("overlay");
const worker = new Worker("app/worker.js", {type: "module"});
const pending = new Map();
let nextId = 0, info = null, picture = null, prompts = {points: [], labels: [], box: null}, result = null;

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

const ready = call("load", {threads: Number(new URLSearchParams(location.search).get("threads") || 0)}).then((loaded) => {
  info = loaded;
  $("model").textContent = `Model: ${info.variant} (${info.encoder}, ${info.decoder}), onnxruntime-web ${info.version}, ` +
    `${info.provider}, ${info.threads || "default"} threads${info.isolated ? "" : " (page not cross-origin isolated: one thread)"}.`;
  showProgress("ready: open an image");
  return info;
}, (error) => { showError(`cannot load the model: ${error.message}`); throw error; });

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
  for (const canvas of [imageCanvas, overlay]) { canvas.width = bitmap.width; canvas.height = bitmap.height; }
  imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
  picture = {width: bitmap.width, height: bitmap.height, name, encoded: false};
  clearPrompts();
  showProgress(`encoding ${name}...`, "busy");
  const timing = await call("encode", {rgba, width: bitmap.width, height: bitmap.height}, [rgba.buffer]);
  picture.encoded = true;
  showProgress(`${name} encoded in ${(timing.encodeMs / 1000).toFixed(1)} s: click on it`);
  return timing;
}

async function guarded(promise) {
  try { return await promise; } catch (error) { showError(error.message); throw error; }
}

function clearPrompts() {
  prompts = {points: [], labels: [], box: null};
  result = null;
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  $("clear").disabled = $("download").disabled = true;
}

async function segment() {
  showProgress("segmenting...", "busy");
  result = await call("decode", prompts);
  draw();
  showProgress(`score ${result.score.toFixed(3)} (mask token ${result.token}), decoder ${result.decodeMs.toFixed(0)} ms`);
  $("clear").disabled = $("download").disabled = false;
  return {score: result.score, token: result.token};
}

function draw() {
  const context = overlay.getContext("2d"), {width, height} = picture;
  const tint = context.createImageData(width, height);
  for (let i = 0; i < result.mask.length; i++) {
    if (result.mask[i]) { tint.data[i * 4 + 2] = 255; tint.data[i * 4 + 3] = 110; }
  }
  context.putImageData(tint, 0, 0);
  const radius = Math.max(3, Math.round(Math.max(width, height) / 150));
  if (prompts.box) {
    const [x0, y0, x1, y1] = prompts.box;
    context.strokeStyle = "#0c0"; context.lineWidth = radius / 2; context.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  prompts.points.forEach(([x, y], i) => {
    context.fillStyle = prompts.labels[i] ? "#0c0" : "#d00";
    context.beginPath(); context.arc(x, y, radius, 0, 2 * Math.PI); context.fill();
  });
}

function addPoint(x, y, positive) {
  prompts.points.push([x, y]);
  prompts.labels.push(positive ? 1 : 0);
  return segment();
}

function setBox(x0, y0, x1, y1) {
  prompts.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  return segment();
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
  const moved = Math.hypot(event.clientX - start.clientX, event.clientY - start.clientY);
  guarded(moved < 4 ? addPoint(...start.at, !start.shift) : setBox(...start.at, ...end)).catch(() => {});
});

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

function maskPng() {
  const canvas = document.createElement("canvas");
  canvas.width = picture.width; canvas.height = picture.height;
  const context = canvas.getContext("2d"), pixels = context.createImageData(picture.width, picture.height);
  result.mask.forEach((on, i) => { pixels.data.fill(on ? 255 : 0, i * 4, i * 4 + 3); pixels.data[i * 4 + 3] = 255; });
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
  // The current mask, H x W bytes 0/1, base64 (null before the first prompt).
  maskBytes: () => (result ? base64(result.mask) : null),
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
