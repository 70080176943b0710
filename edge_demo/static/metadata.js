"use strict";
// The patient-details adjustment in the page: a line-by-line mirror of edge_demo/metadata.py
// (parse and adjust), reading the same tables from the device card (GET api/v1/policy,
// "device_metadata"). tests/test_policy_table.py runs both on one table of cases.
// Loaded as a classic script (window.dermedgeMetadata) and by Node (require).
(function (root) {
  const SEXES = ["male", "female"];
  const MAX_SITE_CHARS = 60;
  const UNKNOWN = new Set(["", "unknown", "nan", "none", "null", "n/a", "na"]);
  const words = (s) => String(s === undefined || s === null ? "" : s).toLowerCase().trim()
    .split(/\s+/).filter((w) => w).join(" ");
  const repr = (s) => (s.includes("'") && !s.includes('"') ? '"' + s + '"' : "'" + s + "'");

  /** {age, sex, site} from form fields (blank: not given); null when none is given. Throws
   * an Error with the server's 400 message for a bad value. */
  function parse(form) {
    const out = {};
    const age = String(form.age === undefined || form.age === null ? "" : form.age).trim();
    if (age) {
      const value = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(age) ? Number(age) : NaN;
      if (!(Number.isFinite(value) && value >= 0 && value <= 120)) {
        throw new Error("The field 'age' must be a number of years from 0 to 120 (or left " +
          "out); received " + repr(age.slice(0, 20)) + ".");
      }
      out.age = value;
    }
    const sex = words(form.sex);
    if (sex && !UNKNOWN.has(sex)) {
      if (!SEXES.includes(sex)) {
        throw new Error("The field 'sex' must be one of " + SEXES.join(", ") + " (or left " +
          "out); received " + repr(sex.slice(0, 20)) + ".");
      }
      out.sex = sex;
    }
    const site = words(form.site);
    if (site && !UNKNOWN.has(site)) {
      if (site.length > MAX_SITE_CHARS || !/^\p{L}+$/u.test(site.replace(/[ /]/g, ""))) {
        throw new Error("The field 'site' must be a body site in words, e.g. 'back' or " +
          "'lower extremity' (at most " + MAX_SITE_CHARS + " letters); received " +
          repr(site.slice(0, 20)) + ".");
      }
      out.site = site;
    }
    return Object.keys(out).length ? out : null;
  }

  function key(prior, field, value) {
    if (field !== "age") return value;
    const bins = prior.age_bins || {};
    const years = Math.trunc(Number(bins.years === undefined ? 10 : bins.years));
    const last = parseInt(String(bins.last === undefined ? "80+" : bins.last).replace(/\++$/, ""),
      10);
    const lo = Math.min(Math.floor(value / years) * years, last);
    return lo === last ? lo + "+" : lo + "-" + (lo + years - 1);
  }

  /** [the answer updated by meta, the fields the tables knew]; none known: unchanged. */
  function adjust(answer, prior, meta) {
    const labels = prior.labels;
    let ll = labels.map(() => 0.0);
    const used = [];
    Object.entries(prior.fields).forEach(([field, spec]) => {
      if (meta[field] === undefined || meta[field] === null) return;
      const i = spec.values.indexOf(key(prior, field, meta[field]));
      if (i < 0) return;
      const row = spec.log_likelihood[i];
      ll = ll.map((a, j) => a + Number(row[j]));
      used.push(field);
    });
    if (!used.length) return [answer, []];
    const w = Number(prior.weight);
    const logp = labels.map((lab, j) => Math.log(Math.max(Number(answer.diagnosis[lab]), 1e-12)) +
      w * ll[j]);
    const top = Math.max(...logp);
    const z = logp.reduce((s, v) => s + Math.exp(v - top), 0);
    const diagnosis = {};
    labels.forEach((lab, j) => { diagnosis[lab] = Math.exp(logp[j] - top) / z; });
    const mel = labels.indexOf("mel");
    const pi = prior.class_prior.map(Number);
    const rest = pi.reduce((s, p, i) => (i !== mel ? s + p : s), 0);
    const notMel = ll.reduce((s, v, i) => (i !== mel ? s + Math.exp(v) * pi[i] / rest : s), 0);
    const p = Math.min(Math.max(Number(answer.melanoma), 1e-12), 1 - 1e-12);
    const logit = Math.log(p / (1 - p)) + w * (ll[mel] - Math.log(notMel));
    let best = null;
    labels.forEach((lab) => { if (best === null || diagnosis[lab] > diagnosis[best]) best = lab; });
    return [Object.assign({}, answer, { melanoma: 1.0 / (1.0 + Math.exp(-logit)), diagnosis,
      top: { label: best, probability: diagnosis[best] },
      image_only: { melanoma: answer.melanoma, top: answer.top }, metadata_used: used }), used];
  }

  /** The card's tables when usable here (HAM10000 labels with melanoma), else null. */
  function tables(prior) {
    if (!prior || typeof prior !== "object" || !(prior.labels || []).includes("mel")) return null;
    return prior;
  }

  const api = { parse: parse, adjust: adjust, tables: tables, key: key };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgeMetadata = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
