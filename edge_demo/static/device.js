// The device tier in the browser: the photo is decoded, cropped and resized as the input
// contract says (dermedge.image.load_image: EXIF orientation, centred square crop, Pillow's
// bilinear resize), and the device bundle's model.tflite runs with LiteRT.js (WebAssembly,
// served by the demo server). Sets window.dermedgeDevice = {ready, classifyFile, runPixels}.

const config = JSON.parse(document.getElementById("browser-config").textContent);

// --- Pillow's bilinear resize (Resample.c), ported so the page feeds the model the same
// uint8 pixels as the server: separable, horizontal pass then vertical, 22-bit fixed point.
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;
const HALF = 2 ** (PRECISION_BITS - 1);

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = 1.0 * filterscale;  // the bilinear (triangle) filter has support 1
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      let t = (x + xmin - center + 0.5) * ss;
      if (t < 0) t = -t;
      const w = t < 1.0 ? 1.0 - t : 0.0;
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < ksize; x++) {
      const v = x < xmax && ww !== 0.0 ? k[x] / ww : (x < xmax ? k[x] : 0);
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * ONE) : Math.trunc(0.5 + v * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

const clip8 = (v) => (v >= ONE * 256 ? 255 : v <= 0 ? 0 : Math.floor(v / ONE));

/** RGB uint8 (h, w, 3) -> (h, outW, 3), Pillow's ImagingResampleHorizontal_8bpc. */
function horizontal(src, w, h, outW) {
  const { ksize, bounds, kk } = coefficients(w, outW);
  const out = new Uint8Array(h * outW * 3);
  for (let y = 0; y < h; y++) {
    for (let xx = 0; xx < outW; xx++) {
      const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1];
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let x = 0; x < xmax; x++) {
        const kv = kk[xx * ksize + x], i = (y * w + x + xmin) * 3;
        s0 += src[i] * kv; s1 += src[i + 1] * kv; s2 += src[i + 2] * kv;
      }
      const o = (y * outW + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/** RGB uint8 (h, w, 3) -> (outH, w, 3), Pillow's ImagingResampleVertical_8bpc. */
function vertical(src, w, h, outH) {
  const { ksize, bounds, kk } = coefficients(h, outH);
  const out = new Uint8Array(outH * w * 3);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
    for (let x = 0; x < w; x++) {
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let y = 0; y < ymax; y++) {
        const kv = kk[yy * ksize + y], i = ((y + ymin) * w + x) * 3;
        s0 += src[i] * kv; s1 += src[i + 1] * kv; s2 += src[i + 2] * kv;
      }
      const o = (yy * w + x) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/** Decoded RGBA (w x h) -> the model's (S, S, 3) uint8: centred square crop, then resize. */
export function cropResize(rgba, w, h, size) {
  const s = Math.min(w, h), x0 = (w - s) >> 1, y0 = (h - s) >> 1;
  let px = new Uint8Array(s * s * 3);
  for (let y = 0; y < s; y++) {
    for (let x = 0; x < s; x++) {
      const i = ((y + y0) * w + x + x0) * 4, o = (y * s + x) * 3;
      px[o] = rgba[i]; px[o + 1] = rgba[i + 1]; px[o + 2] = rgba[i + 2];
    }
  }
  if (s !== size) px = horizontal(px, s, s, size);
  if (s !== size) px = vertical(px, size, s, size);
  return px;
}

/** A photo file -> upright RGBA pixels at full resolution (no canvas resampling). */
async function decode(file) {
  const bmp = await createImageBitmap(file, { imageOrientation: "from-image",
    colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = bmp.width; canvas.height = bmp.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  const { data } = ctx.getImageData(0, 0, bmp.width, bmp.height);
  bmp.close();
  return { rgba: data, width: canvas.width, height: canvas.height };
}

// --- the model -----------------------------------------------------------------------
let runtime = null, model = null;

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** (S, S, 3) uint8 -> the input tensor's values, as tiers.Tier._feed quantizes them. */
function feed(pixels) {
  const spec = config.input, q = spec.quantization;
  if (spec.dtype === "float32") return Float32Array.from(pixels);
  const lim = spec.dtype === "int8" ? [-128, 127] : [0, 255];
  const out = spec.dtype === "int8" ? new Int8Array(pixels.length) : new Uint8Array(pixels.length);
  for (let i = 0; i < pixels.length; i++) {
    let v = q.scale > 0 ? roundHalfEven(Math.fround(pixels[i] / q.scale)) + q.zero_point : pixels[i];
    out[i] = Math.min(lim[1], Math.max(lim[0], v));
  }
  return out;
}

/** An output tensor's values -> probabilities, as tiers.Tier._read dequantizes them. */
function read(head, values) {
  const q = config.outputs[head].quantization;
  const quantized = config.outputs[head].dtype !== "float32" && q.scale > 0;
  return Array.from(values, (v) => {
    const p = quantized ? Math.fround(Math.fround(v - q.zero_point) * Math.fround(q.scale)) : v;
    return Math.min(1, Math.max(0, p));
  });
}

/** (S, S, 3) uint8 pixels -> the tier answer {melanoma, diagnosis, top, latency_ms}. */
export async function runPixels(pixels) {
  const S = config.image_size;
  const input = runtime.Tensor.fromTypedArray(feed(pixels), [1, S, S, 3]);
  const t0 = performance.now();
  const out = await model.run({ image: input });
  const mel = out.melanoma.toTypedArray(), diag = out.diagnosis.toTypedArray();
  const oodValues = out.ood ? out.ood.toTypedArray() : null;  // input gate hook (issue 36)
  const latency = performance.now() - t0;
  input.delete();
  Object.values(out).forEach((t) => t.delete());
  const probs = read("diagnosis", diag);
  const diagnosis = {};
  let top = null;
  config.labels.forEach((lab, i) => {
    diagnosis[lab] = probs[i];
    if (top === null || probs[i] > diagnosis[top]) top = lab;
  });
  const answer = { melanoma: read("melanoma", mel)[0], diagnosis, top: { label: top,
    probability: diagnosis[top] }, latency_ms: Math.round(latency * 1000) / 1000,
  computed_on: "browser" };
  if (oodValues) answer.ood = read("ood", oodValues)[0];  // input gate hook (issue 36)
  return answer;
}

let lastPixels = null;

export async function classifyFile(file) {
  const img = await decode(file);
  lastPixels = cropResize(img.rgba, img.width, img.height, config.image_size);
  // --- input gate hook (issue 36, gate.js): the photo's measures on the decoded pixels ---
  const t0 = performance.now();
  const measures = config.gate.enabled
    ? window.dermedgeGate.measureRgba(img.rgba, img.width, img.height, config.gate.params) : {};
  const gateMs = performance.now() - t0;
  const answer = await runPixels(lastPixels);
  answer.gate_values = { ...measures, ood: answer.ood === undefined ? null : answer.ood };
  answer.gate_ms = Math.round(gateMs * 1000) / 1000;
  // --- end of the input gate hook ---
  return answer;
}

/** A photo file -> the (size, size, 3) pixels as base64 (for tests and benchmarks). */
async function preprocessB64(file, size) {
  const img = await decode(file);
  return toB64(cropResize(img.rgba, img.width, img.height, size));
}

const toB64 = (u8) => {
  let s = "";
  for (let i = 0; i < u8.length; i += 0x8000) s += String.fromCharCode(...u8.subarray(i, i + 0x8000));
  return btoa(s);
};
const fromB64 = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));

async function load() {
  if (!config.enabled) throw new Error(config.reason);
  if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
  const t0 = performance.now();
  runtime = await import(config.runtime + "core/dist/index.js");
  await runtime.loadLiteRt(config.runtime + "core/wasm/");
  model = await runtime.loadAndCompile(config.model, { accelerator: "wasm" });
  const S = config.image_size;
  await runPixels(new Uint8Array(S * S * 3));  // warm-up: the first run allocates
  return { loadMs: performance.now() - t0, version: config.version };
}

window.dermedgeDevice = {
  config,
  ready: load(),
  classifyFile,
  cropResize,
  runPixels,
  runPixelsB64: (b64) => runPixels(fromB64(b64)),
  preprocessB64,
  lastPixelsB64: () => (lastPixels ? toB64(lastPixels) : null),
};
window.dermedgeDevice.ready.catch(() => {});  // app.js reports the failure on the page
