"use strict";
// The input gate in the browser: the gate image and photo measures of dermedge/quality.py
// (integer arithmetic, so the values are bit-identical to Python's on the same decoded
// pixels; one pass over the photo's centred square) and the checks of gate_rules.json, a line-by-line mirror of evaluate(), message()
// and Gate.decide() in edge_demo/gate.py. tests/test_gate_table.py runs both on one table of
// cases in Node and in Chromium. Loaded as a classic script (window.dermedgeGate) and by Node.
(function (root) {
  // --- the gate image: the centred g k square -> Pillow's luma -> k x k block means --------
  /** Side g, block k and the square's offsets for a photo of w x h (quality.gate_geometry). */
  function geometry(w, h, params) {
    const s = Math.min(w, h), k = Math.ceil(s / params.side_cap), g = Math.floor(s / k);
    return { s: s, k: k, g: g, left: (w - g * k) >> 1, top: (h - g * k) >> 1 };
  }

  /** Decoded RGBA (w x h, upright) -> {plane: g x g luma, g, side} (quality.gate_image).
   * `view` (optional): `rgba` holds only a window of the photo, {x, y, stride} (its origin in
   * the photo and its row length), that contains the g k square. */
  function gateImage(rgba, w, h, params, view) {
    const { s, k, g, left, top } = geometry(w, h, params);
    const ox = view ? view.x : 0, oy = view ? view.y : 0, stride = view ? view.stride : w;
    const n = g * k, sums = new Uint32Array(g * g);
    for (let y = 0; y < n; y++) {
      const dst = ((y / k) | 0) * g;
      let i = ((y + top - oy) * stride + left - ox) * 4;
      for (let bx = 0; bx < g; bx++) {
        let acc = 0;
        for (let x = 0; x < k; x++, i += 4) {
          // Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point (Convert.c, L24)
          acc += (19595 * rgba[i] + 38470 * rgba[i + 1] + 7471 * rgba[i + 2] + 32768) >> 16;
        }
        sums[dst + bx] += acc;
      }
    }
    const kk = k * k, half = kk >> 1, plane = new Uint8Array(g * g);
    for (let j = 0; j < g * g; j++) plane[j] = Math.floor((sums[j] + half) / kk);
    return { plane: plane, g: g, side: s };
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
    const mean = sum / n, rms = Math.sqrt(sq / ((g - 2) * (g - 2)));
    return { side: side === undefined || side === null ? g : side, mean_luma: mean,
      dark_share: dark / n, clipped_share: clipped / n,
      sharpness: mean > 0 ? rms * 128 / mean : 0 };
  }

  /** Decoded RGBA -> the photo's measures (quality.measure_image). */
  function measureRgba(rgba, w, h, params) {
    const img = gateImage(rgba, w, h, params);
    return measure(img.plane, img.g, img.side, params);
  }

  /** The same measures from the photo's centred `side` x `side` square only (what
   * pixels.js decodeSquare draws: offsets (w - side) >> 1, (h - side) >> 1). */
  function measureSquare(rgba, side, w, h, params) {
    const view = { x: (w - side) >> 1, y: (h - side) >> 1, stride: side };
    const img = gateImage(rgba, w, h, params, view);
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

  const api = { geometry: geometry, gateImage: gateImage, measure: measure,
    measureRgba: measureRgba, measureSquare: measureSquare, evaluate: evaluate,
    message: message, decide: decide, fmt: fmt, VALUES: VALUES };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgeGate = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
