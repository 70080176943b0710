// The device tier in the browser: the photo is decoded, cropped and resized as the input
// contract says (pixels.js), and the device bundle's model.tflite runs with LiteRT.js
// (WebAssembly, served by the demo server) in the build runtime.js picks for this browser.
// Sets window.dermedgeDevice = {ready, classifyFile, runPixels, ...}.

import { cropResize, decodeSquare, preprocess, squareResize } from "./pixels.js";
import { chooseBuild } from "./runtime.js";

const config = JSON.parse(document.getElementById("browser-config").textContent);
const choice = chooseBuild();
let runtime = null, model = null;

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

let lut = null;
/** (S, S, 3) uint8 -> the input tensor's values, as tiers.Tier._feed quantizes them: one
 * lookup table for the 256 pixel values (uint8 with scale 1 and zero point 0: as is). */
function feed(pixels) {
  const spec = config.input, q = spec.quantization;
  if (spec.dtype === "float32") return Float32Array.from(pixels);
  if (spec.dtype === "uint8" && !(q.scale > 0 && (q.scale !== 1 || q.zero_point !== 0))) {
    return pixels;
  }
  if (lut === null) {
    const lim = spec.dtype === "int8" ? [-128, 127] : [0, 255];
    lut = spec.dtype === "int8" ? new Int8Array(256) : new Uint8Array(256);
    for (let p = 0; p < 256; p++) {
      const v = q.scale > 0 ? roundHalfEven(Math.fround(p / q.scale)) + q.zero_point : p;
      lut[p] = Math.min(lim[1], Math.max(lim[0], v));
    }
  }
  const out = new lut.constructor(pixels.length);
  for (let i = 0; i < pixels.length; i++) out[i] = lut[pixels[i]];
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

let lastPixels = null, lastPrepMs = null;

export async function classifyFile(file) {
  const t0 = performance.now();
  const sq = await decodeSquare(file);
  lastPixels = squareResize(sq.rgba, sq.side, 0, 0, sq.side, config.image_size);
  lastPrepMs = performance.now() - t0;
  // --- input gate hook (issue 36, gate.js): the photo's measures on the decoded pixels ---
  const t1 = performance.now();
  const measures = config.gate.enabled ? window.dermedgeGate.measureSquare(
    sq.rgba, sq.side, sq.width, sq.height, config.gate.params) : {};
  const gateMs = performance.now() - t1;
  const answer = await runPixels(lastPixels);
  answer.gate_values = { ...measures, ood: answer.ood === undefined ? null : answer.ood };
  answer.gate_ms = Math.round(gateMs * 1000) / 1000;
  // --- end of the input gate hook ---
  return answer;
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
  await runtime.loadLiteRt(config.runtime + "core/wasm/", { threads: choice.build === "threaded" });
  model = await runtime.loadAndCompile(config.model, { accelerator: "wasm",
    cpuOptions: { numThreads: choice.threads } });
  const S = config.image_size;
  await runPixels(new Uint8Array(S * S * 3));  // warm-up: the first run allocates
  performance.mark("dermedge-model-ready");  // benchmarks/browser_latency.py reads it
  return { loadMs: performance.now() - t0, version: config.version, build: choice.build,
    threads: choice.threads, why: choice.why };
}

window.dermedgeDevice = {
  config,
  choice,
  ready: load(),
  classifyFile,
  cropResize,
  preprocess,
  runPixels,
  runPixelsB64: (b64) => runPixels(fromB64(b64)),
  /** A photo file -> the (size, size, 3) pixels as base64 (for tests and benchmarks). */
  preprocessB64: async (file, size) => toB64(await preprocess(file, size)),
  lastPixelsB64: () => (lastPixels ? toB64(lastPixels) : null),
  lastPrepMs: () => lastPrepMs,
  internals: () => ({ runtime, model }),  // for benchmarks/browser_latency.py --profile
};
window.dermedgeDevice.ready.catch(() => {});  // app.js reports the failure on the page
