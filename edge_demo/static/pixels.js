// The page's input contract (dermedge.image.load_image): the photo decoded with its EXIF
// orientation and no colour conversion, the centred square cut out, and Pillow's bilinear
// resize (Resample.c: separable, horizontal pass then vertical, 22-bit fixed point) to the
// model's size, so the page feeds the model the server's uint8 pixels.
//
// Speed: the square is cut out while drawing (drawImage with a source rectangle, no
// scaling), and read back alone; both passes run in int32 arithmetic on cached
// coefficients, the vertical pass row by row over the whole line.

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;
const cache = new Map();

/** Pillow's precompute_coeffs for the bilinear filter: per output pixel, the first input
 * pixel, the tap count and the fixed-point weights (ksize per pixel). */
function coefficients(inSize, outSize) {
  const id = inSize + "x" + outSize;
  if (cache.has(id)) return cache.get(id);
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
  const out = { ksize, bounds, kk };
  cache.set(id, out);
  return out;
}

// Sums stay below 255 * 2^22 + 2^21 < 2^31 (the bilinear weights are >= 0), so int32 holds
// them; a Uint8ClampedArray store of sum >> 22 is Pillow's clip8.
const HALF = 1 << (PRECISION_BITS - 1);

/** RGBA (rows of `stride` pixels) -> RGB (h, outW): Pillow's ImagingResampleHorizontal_8bpc
 * on the rows' pixels [x0, x0 + w). */
function horizontal(src, stride, x0, w, h, outW) {
  const { ksize, bounds, kk } = coefficients(w, outW);
  const out = new Uint8ClampedArray(h * outW * 3);
  for (let y = 0; y < h; y++) {
    const row = (y * stride + x0) * 4;
    let o = y * outW * 3;
    for (let xx = 0; xx < outW; xx++) {
      const xmax = bounds[xx * 2 + 1], kb = xx * ksize;
      let i = row + bounds[xx * 2] * 4;
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let x = 0; x < xmax; x++, i += 4) {
        const kv = kk[kb + x];
        s0 = (s0 + Math.imul(src[i], kv)) | 0;
        s1 = (s1 + Math.imul(src[i + 1], kv)) | 0;
        s2 = (s2 + Math.imul(src[i + 2], kv)) | 0;
      }
      out[o++] = s0 >> PRECISION_BITS;
      out[o++] = s1 >> PRECISION_BITS;
      out[o++] = s2 >> PRECISION_BITS;
    }
  }
  return out;
}

/** RGB (h, w) -> RGB (outH, w): Pillow's ImagingResampleVertical_8bpc, a weighted sum of
 * whole input lines per output line. */
function vertical(src, w, h, outH) {
  const { ksize, bounds, kk } = coefficients(h, outH);
  const line = w * 3;
  const out = new Uint8ClampedArray(outH * line);
  const acc = new Int32Array(line);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1];
    acc.fill(HALF);
    for (let y = 0; y < ymax; y++) {
      const kv = kk[yy * ksize + y];
      const base = (y + ymin) * line;
      for (let j = 0; j < line; j++) acc[j] = (acc[j] + Math.imul(src[base + j], kv)) | 0;
    }
    const o = yy * line;
    for (let j = 0; j < line; j++) out[o + j] = acc[j] >> PRECISION_BITS;
  }
  return out;
}

/** RGBA pixels (rows of `stride`) with the square [x0, x0+s) x [y0, y0+s) -> the model's
 * (size, size, 3) uint8. */
export function squareResize(rgba, stride, x0, y0, s, size) {
  const first = rgba.subarray(y0 * stride * 4, (y0 + s) * stride * 4);
  if (s === size) {  // no resampling: the square's RGB as is
    const px = new Uint8Array(s * s * 3);
    for (let y = 0, o = 0; y < s; y++) {
      for (let x = 0, i = (y * stride + x0) * 4; x < s; x++, i += 4) {
        px[o++] = first[i]; px[o++] = first[i + 1]; px[o++] = first[i + 2];
      }
    }
    return px;
  }
  const h = horizontal(first, stride, x0, s, s, size);
  const v = vertical(h, size, s, size);
  return new Uint8Array(v.buffer);
}

/** Decoded RGBA (w x h) -> the model's (S, S, 3) uint8: centred square crop, then resize. */
export function cropResize(rgba, w, h, size) {
  const s = Math.min(w, h);
  return squareResize(rgba, w, (w - s) >> 1, (h - s) >> 1, s, size);
}

/** A photo file -> the upright centred square's RGBA (no canvas resampling: drawn 1:1), its
 * side, and the upright photo's width and height. */
export async function decodeSquare(file) {
  const bmp = await createImageBitmap(file, { imageOrientation: "from-image",
    colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const s = Math.min(bmp.width, bmp.height), width = bmp.width, height = bmp.height;
  const canvas = typeof OffscreenCanvas === "function" ? new OffscreenCanvas(s, s)
    : Object.assign(document.createElement("canvas"), { width: s, height: s });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, (bmp.width - s) >> 1, (bmp.height - s) >> 1, s, s, 0, 0, s, s);
  bmp.close();
  return { rgba: ctx.getImageData(0, 0, s, s).data, side: s, width, height };
}

/** A photo file -> the model's (size, size, 3) uint8 pixels. */
export async function preprocess(file, size) {
  const { rgba, side } = await decodeSquare(file);
  return squareResize(rgba, side, 0, 0, side, size);
}
