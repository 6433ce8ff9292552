// The IO contract's pre-processing, prompt tokens and mask choice in JavaScript, written once for the demo
// app's worker (the mask's upscale is the app's mask graph, targets.web.mask_graph). Each function names the
// Python function of evsam_export/model/processing.py (or contract.py) it mirrors; the app test
// (tests/builds/test_web_app.py) checks the resize byte for byte and the mask against the Predictor.

export const PROMPT_FRAME = 1024;
export const LOW_RES = 256;
const LABEL_PADDING = -1, LABEL_BOX_TOP_LEFT = 2, LABEL_BOX_BOTTOM_RIGHT = 3;

// processing.resized_shape: (H, W) with the long side scaled to `longSide`, int(x + 0.5), at least 1.
export function resizedShape(height, width, longSide) {
  const scale = longSide * 1.0 / Math.max(height, width);
  return [Math.max(Math.floor(height * scale + 0.5), 1), Math.max(Math.floor(width * scale + 0.5), 1)];
}

// Pillow's Image.resize(BILINEAR) on uint8 RGB (libImaging/Resample.c), which processing.preprocess_image
// calls: a triangle filter widened by the scale on downscale (antialiasing), coefficients normalised and
// rounded to 22-bit fixed point, the horizontal pass first, each pass rounded to uint8. A canvas drawImage
// resize is not this filter, so it is done here, exactly.
const PRECISION_BITS = 22;

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = filterScale;  // the bilinear filter's support (1) times filterScale
  const ksize = Math.ceil(support) * 2 + 1;
  const ss = 1.0 / filterScale;  // multiplied, not divided by filterScale: Pillow's rounding
  const bounds = new Int32Array(outSize * 2);
  const weights = new Float64Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const count = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let total = 0;
    for (let x = 0; x < count; x++) {
      const w = Math.max(1.0 - Math.abs((x + xmin - center + 0.5) * ss), 0.0);
      weights[xx * ksize + x] = w;
      total += w;
    }
    for (let x = 0; x < count; x++) {
      const w = total !== 0 ? weights[xx * ksize + x] / total : weights[xx * ksize + x];
      weights[xx * ksize + x] = Math.trunc(w < 0 ? w * (1 << PRECISION_BITS) - 0.5 : w * (1 << PRECISION_BITS) + 0.5);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = count;
  }
  return {bounds, weights, ksize};
}

function clip8(sum) {
  return Math.min(Math.max(Math.floor(sum / (1 << PRECISION_BITS)), 0), 255);
}

// One pass along one axis of a packed RGB uint8 image [height][width][3].
function resamplePass(src, width, height, outSize, horizontal) {
  const {bounds, weights, ksize} = coefficients(horizontal ? width : height, outSize);
  const outW = horizontal ? outSize : width, outH = horizontal ? height : outSize;
  const out = new Uint8Array(outW * outH * 3);
  const step = horizontal ? 3 : width * 3;
  for (let yy = 0; yy < outH; yy++) {
    for (let xx = 0; xx < outW; xx++) {
      const index = horizontal ? xx : yy;
      const first = bounds[index * 2], count = bounds[index * 2 + 1], k = index * ksize;
      const base = horizontal ? yy * width * 3 + first * 3 : first * width * 3 + xx * 3;
      for (let c = 0; c < 3; c++) {
        let sum = 1 << (PRECISION_BITS - 1);
        for (let i = 0; i < count; i++) sum += src[base + i * step + c] * weights[k + i];
        out[(yy * outW + xx) * 3 + c] = clip8(sum);
      }
    }
  }
  return out;
}

export function resizeRgb(rgb, width, height, outWidth, outHeight) {
  let out = rgb;
  if (outWidth !== width) out = resamplePass(out, width, height, outWidth, true);
  if (outHeight !== height) out = resamplePass(out, outWidth, height, outHeight, false);
  return out;
}

// RGBA from a canvas -> packed RGB (alpha dropped, like processing.as_rgb_uint8).
export function rgbOf(rgba, width, height) {
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < width * height * 4; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  return rgb;
}

// processing.preprocess_image: resize, ToTensor + Normalize in float32 (in that order), zero padding
// bottom/right -> [1, 3, S, S]. `normalize` is manifest.model's {mean, std} on the 0..255 scale.
export function preprocess(rgb, width, height, encoderSize, normalize) {
  const [newH, newW] = resizedShape(height, width, encoderSize);
  const resized = (newH === height && newW === width) ? rgb : resizeRgb(rgb, width, height, newW, newH);
  const tensor = new Float32Array(3 * encoderSize * encoderSize);
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const mean = f(f(normalize.mean[c]) / f(255)), std = f(f(normalize.std[c]) / f(255));
    const plane = c * encoderSize * encoderSize;
    for (let y = 0; y < newH; y++) {
      for (let x = 0; x < newW; x++) {
        tensor[plane + y * encoderSize + x] = f(f(f(resized[(y * newW + x) * 3 + c] / 255) - mean) / std);
      }
    }
  }
  return {tensor, resized, resizedSize: [newH, newW]};
}

// processing.image_geometry: the image's size and its size in the 1024 prompt frame.
export function geometry(height, width) {
  return {originalSize: [height, width], inputSize: resizedShape(height, width, PROMPT_FRAME)};
}

// processing.build_prompt_tokens for one prompt set: points (x, y in image pixels) with labels 1/0, SAM's
// padding point (0, 0, -1) only without a box, box corners labelled 2 and 3; coords scaled like
// processing.transform_coords (float64 product, then float32).
export function promptTokens(geo, points, labels, box) {
  const [oldH, oldW] = geo.originalSize, [newH, newW] = geo.inputSize;
  const coords = [], tokenLabels = [];
  const add = (x, y, label) => { coords.push(x * (newW / oldW), y * (newH / oldH)); tokenLabels.push(label); };
  points.forEach(([x, y], i) => add(x, y, labels[i]));
  if (box) {
    add(box[0], box[1], LABEL_BOX_TOP_LEFT);
    add(box[2], box[3], LABEL_BOX_BOTTOM_RIGHT);
  } else {
    add(0, 0, LABEL_PADDING);
  }
  return {coords: new Float32Array(coords), labels: new Float32Array(tokenLabels), count: tokenLabels.length};
}

// processing.select_masks + Prediction.best: tokens 1..3 and the best score (multimask) or token 0.
// The app asks for multimask on a lone click (SAM's ambiguity case), token 0 once points or a box add up.
export function bestToken(scores, tokens, multimask) {
  if (tokens === 1 || !multimask) return 0;
  let best = 1;
  for (let t = 2; t < tokens; t++) if (scores[t] > scores[best]) best = t;
  return best;
}
