// Which LiteRT.js build this browser runs, decided before anything is downloaded (the
// service worker caches only that build's files):
//   threaded  relaxed SIMD + SharedArrayBuffer + a cross-origin-isolated page (COOP/COEP):
//             XNNPACK on min(4, navigator.hardwareConcurrency) threads
//   single    relaxed SIMD, one thread
//   compat    neither (plain WebAssembly SIMD), one thread
// LiteRT.js makes the same relaxed-SIMD check and picks the matching file in core/wasm/.

export const MAX_THREADS = 4;
export const FILES = {
  threaded: "litert_wasm_threaded_internal",
  single: "litert_wasm_internal",
  compat: "litert_wasm_compat_internal",
};

// (module (func (param v128 v128 v128) (result v128)
//   local.get 0 local.get 1 local.get 2 f32x4.relaxed_madd))
const RELAXED_SIMD = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 8, 1, 96, 3, 123, 123, 123,
  1, 123, 3, 2, 1, 0, 10, 13, 1, 11, 0, 32, 0, 32, 1, 32, 2, 253, 133, 2, 11]);

export function relaxedSimd() {
  try {
    return typeof WebAssembly === "object" && WebAssembly.validate(RELAXED_SIMD);
  } catch (e) {
    return false;
  }
}

/** The page's ``?threads=N`` (for measurements: 1 = the single-threaded build, N > 1 = the
 * threaded build on N threads where it can run), else null. */
function requestedThreads() {
  const raw = new URLSearchParams(globalThis.location ? location.search : "").get("threads");
  const n = raw === null ? NaN : parseInt(raw, 10);
  return Number.isInteger(n) && n >= 1 ? n : null;
}

/** {build, threads, why}: the build to load and, for one thread, why not more. */
export function chooseBuild() {
  const relaxed = relaxedSimd();
  if (!relaxed) {
    return { build: "compat", threads: 1, why: "no relaxed SIMD in this browser" };
  }
  const asked = requestedThreads();
  if (asked === 1) return { build: "single", threads: 1, why: "?threads=1 asked for one" };
  const missing = [];
  if (!globalThis.crossOriginIsolated) missing.push("the page is not cross-origin isolated");
  if (typeof SharedArrayBuffer !== "function") missing.push("no SharedArrayBuffer");
  const hc = Number(navigator.hardwareConcurrency) || 1;
  if (missing.length) return { build: "single", threads: 1, why: missing.join(", ") };
  if (hc < 2) return { build: "single", threads: 1, why: "one CPU core" };
  return { build: "threaded", threads: asked ? Math.min(asked, hc) : Math.min(MAX_THREADS, hc),
    why: null };
}

/** The runtime files a build loads, relative to the runtime root. */
export function buildFiles(build) {
  const stem = "core/wasm/" + FILES[build];
  return ["core/dist/index.js", "wasm-utils/dist/index.js", stem + ".js", stem + ".wasm"];
}
