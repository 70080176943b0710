"use strict";
// Temperature scaling of a tier's answer (the policy file's `temperature` section): a
// line-by-line mirror of apply() in edge_demo/temperature.py (tests/test_temperature.py runs
// both on one table). The page applies it to its device answer before policy.js's rules and
// posts the answer the model gave; the server applies the same temperatures to it.
// Loaded as a classic script (window.dermedgeTemperature) and by Node (require).
(function (root) {
  const EPS = 1e-7;
  const clip = (p) => Math.min(Math.max(Number(p), EPS), 1 - EPS);

  function scaleProbability(p, t) {
    if (t === 1) return Number(p);
    const q = clip(p);
    const z = (Math.log(q) - Math.log1p(-q)) / t;
    return 1 / (1 + Math.exp(-z));
  }

  function scaleDistribution(probs, t) {
    const keys = Object.keys(probs);
    const out = {};
    if (t === 1) { keys.forEach((k) => { out[k] = Number(probs[k]); }); return out; }
    const logs = keys.map((k) => Math.log(Math.max(Number(probs[k]), EPS)) / t);
    const top = Math.max(...logs);
    const ex = logs.map((v) => Math.exp(v - top));
    let z = 0;
    for (const e of ex) z += e;
    keys.forEach((k, i) => { out[k] = ex[i] / z; });
    return out;
  }

  /** The answer with one tier's temperatures ({melanoma, diagnosis}) applied. */
  function apply(answer, temps) {
    const tMel = Number((temps || {}).melanoma === undefined ? 1 : temps.melanoma);
    const tDiag = Number((temps || {}).diagnosis === undefined ? 1 : temps.diagnosis);
    if (tMel === 1 && tDiag === 1) return answer;
    const diagnosis = scaleDistribution(answer.diagnosis, tDiag);
    let best = null;
    Object.keys(diagnosis).forEach((k) => { if (best === null || diagnosis[k] > diagnosis[best]) best = k; });
    return Object.assign({}, answer, { melanoma: scaleProbability(answer.melanoma, tMel),
      diagnosis: diagnosis, top: { label: best, probability: diagnosis[best] },
      temperature: { melanoma: tMel, diagnosis: tDiag } });
  }

  const api = { apply: apply, scaleProbability: scaleProbability,
    scaleDistribution: scaleDistribution };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgeTemperature = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
