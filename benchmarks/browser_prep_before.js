// The page's preprocessing before issue 35 (edge_demo/static/device.js at 3d438fb), kept only
// so that benchmarks/browser_latency.py can time it beside static/pixels.js in one run: full
// frame drawn and read back, the square copied out, float arithmetic per tap.
// Defines window.__prepBefore(file, size) -> (size, size, 3) uint8, and its two parts.
(function () {
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
function cropResize(rgba, w, h, size) {
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

  window.__prepBefore = async (file, size) => {
    const img = await decode(file);
    return cropResize(img.rgba, img.width, img.height, size);
  };
  window.__prepBeforeParts = { decode, cropResize };
})();
