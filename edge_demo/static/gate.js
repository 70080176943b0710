"use strict";
// The input gate in the browser: the gate image and photo measures of dermedge/quality.py
// (integer arithmetic, so the values are bit-identical to Python's on the same decoded
// pixels) and the checks of gate_rules.json, a line-by-line mirror of evaluate(), message()
// and Gate.decide() in edge_demo/gate.py. tests/test_gate_table.py runs both on one table of
// cases in Node and in Chromium. Loaded as a classic script (window.dermedgeGate) and by Node.
(function (root) {
  // --- the gate image: centred square -> Pillow's luma -> Pillow's bilinear resize --------
  // Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point (Convert.c, L24)
  const lumaOf = (r, g, b) => (19595 * r + 38470 * g + 7471 * b + 32768) >> 16;

  // Pillow's 8-bit bilinear resample (Resample.c), one band: 22-bit fixed-point coefficients,
  // horizontal pass then vertical, as device.js does for the model's RGB input.
  const PRECISION_BITS = 32 - 8 - 2;
  const ONE = 2 ** PRECISION_BITS;
  const HALF = 2 ** (PRECISION_BITS - 1);
  const clip8 = (v) => (v >= ONE * 256 ? 255 : v <= 0 ? 0 : Math.floor(v / ONE));

  function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = 1.0 * filterscale;
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

  /** One band (h rows of w) -> (outH rows of outW): Pillow's two passes. */
  function resize(src, w, h, outW, outH) {
    let c = coefficients(w, outW);
    const mid = new Uint8Array(h * outW);
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1];
        let s = HALF;
        for (let x = 0; x < xmax; x++) s += src[y * w + x + xmin] * c.kk[xx * c.ksize + x];
        mid[y * outW + xx] = clip8(s);
      }
    }
    c = coefficients(h, outH);
    const out = new Uint8Array(outH * outW);
    for (let yy = 0; yy < outH; yy++) {
      const ymin = c.bounds[yy * 2], ymax = c.bounds[yy * 2 + 1];
      for (let x = 0; x < outW; x++) {
        let s = HALF;
        for (let y = 0; y < ymax; y++) s += mid[(y + ymin) * outW + x] * c.kk[yy * c.ksize + y];
        out[yy * outW + x] = clip8(s);
      }
    }
    return out;
  }

  /** The gate image's side for a photo of w x h (params: dermedge.quality.params()). */
  const gateSide = (w, h, params) => Math.min(w, h, params.side_cap);

  /** Decoded RGBA (w x h, upright) -> {plane: g x g luma, g, side} (quality.gate_image). */
  function gateImage(rgba, w, h, params) {
    const s = Math.min(w, h), x0 = (w - s) >> 1, y0 = (h - s) >> 1, g = gateSide(w, h, params);
    const lum = new Uint8Array(s * s);
    for (let y = 0; y < s; y++) {
      for (let x = 0; x < s; x++) {
        const i = ((y + y0) * w + x + x0) * 4;
        lum[y * s + x] = lumaOf(rgba[i], rgba[i + 1], rgba[i + 2]);
      }
    }
    return { plane: s === g ? lum : resize(lum, s, s, g, g), g: g, side: s };
  }

  /** The g x g luma gate image -> the measures (quality.measure). */
  function measure(y, g, side, params) {
    const n = g * g;
    let sum = 0, dark = 0, clipped = 0;
    for (let i = 0; i < n; i++) {
      const v = y[i];
      sum += v;
      if (v <= params.dark_level) dark += 1;
      if (v >= params.clip_level) clipped += 1;
    }
    let sq = 0;  // < 2^41: exact in a double, as Python's integer sum
    for (let r = 1; r < g - 1; r++) {
      for (let c = 1; c < g - 1; c++) {
        const i = r * g + c;
        const l = 4 * y[i] - y[i - g] - y[i + g] - y[i - 1] - y[i + 1];
        sq += l * l;
      }
    }
    return { side: side === undefined || side === null ? g : side, mean_luma: sum / n,
      dark_share: dark / n, clipped_share: clipped / n,
      sharpness: Math.sqrt(sq / ((g - 2) * (g - 2))) };
  }

  /** Decoded RGBA -> the photo's measures (quality.measure_image). */
  function measureRgba(rgba, w, h, params) {
    const img = gateImage(rgba, w, h, params);
    return measure(img.plane, img.g, img.side, params);
  }

  // --- the checks of gate_rules.json --------------------------------------------------
  const fmt = (x, d) => Number(x).toFixed(d === undefined ? 2 : d);  // policy.py's _f
  // policy.py's _digits: more decimals when a value and a different threshold print the same
  function digits(value, thresholds) {
    let d = 2;
    while (value !== null && d < 6 &&
           thresholds.some((t) => value !== t && fmt(value, d) === fmt(t, d))) d += 1;
    return d;
  }

  function evaluate(check, values, thresholds) {
    let value = values[check.value], threshold = thresholds[check.threshold];
    value = value === undefined || value === null ? null : Number(value);
    threshold = threshold === undefined || threshold === null ? null : Number(threshold);
    if (value === null || threshold === null) {
      const why = check.skipped || (value === null ? "not checked: no " + check.value + " value"
        : "not checked: no threshold");
      return { id: check.id, code: check.code, fired: false, value: value,
        threshold: threshold, text: why };
    }
    const fired = check.op === "<" ? value < threshold : value > threshold;
    const d = check.digits !== undefined ? check.digits : digits(value, [threshold]);
    const fields = { value: fmt(value, d), threshold: fmt(threshold, d) };
    let text = check[fired ? "fired" : "not_fired"].replace(/\{(\w+)\}/g, (_, k) => fields[k]);
    if (fired) text = check.advice + " (" + text + ")";
    return { id: check.id, code: check.code, fired: fired, value: value, threshold: threshold,
      text: text };
  }

  function message(rules, checks) {
    const advice = {};
    rules.checks.forEach((c) => { advice[c.id] = c.advice; });
    const fired = [];
    checks.forEach((c) => { if (c.fired && !fired.includes(advice[c.id])) fired.push(advice[c.id]); });
    if (fired.length) return "Retake the photo: " + fired.join("; ") + ".";
    return "The photo passed the input gate (" + checks.length + " checks).";
  }

  const VALUES = ["side", "mean_luma", "dark_share", "clipped_share", "sharpness", "ood"];

  /** Every check on one photo's values -> the response's gate section (Gate.decide);
   * gate: what GET api/v1/policy publishes as "gate" (enabled, thresholds, note). */
  function decide(rules, gate, values) {
    const vals = {};
    VALUES.forEach((k) => {
      vals[k] = values[k] === undefined || values[k] === null ? null : Number(values[k]);
    });
    if (!gate.enabled) {
      return { enabled: false, passed: true, checks: [], message: gate.off_message,
        codes: [], values: vals };
    }
    const checks = rules.checks.map((c) => evaluate(c, vals, gate.thresholds));
    const codes = [];
    checks.forEach((c) => { if (c.fired && !codes.includes(c.code)) codes.push(c.code); });
    const out = { enabled: true, passed: !checks.some((c) => c.fired), checks: checks,
      message: message(rules, checks), codes: codes, values: vals };
    if (gate.note) out.note = gate.note;
    return out;
  }

  const api = { lumaOf: lumaOf, resize: resize, gateSide: gateSide, gateImage: gateImage,
    measure: measure, measureRgba: measureRgba, evaluate: evaluate, message: message,
    decide: decide, fmt: fmt, VALUES: VALUES };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgeGate = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
