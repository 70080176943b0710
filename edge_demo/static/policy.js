"use strict";
// The fallback/referral rules of policy_rules.json, evaluated in the browser: a line-by-line
// mirror of evaluate() and Policy.decide in edge_demo/policy.py (tests/test_policy_table.py
// runs both on one table of cases). Loaded as a classic script (window.dermedgePolicy) and
// by Node (require).
(function (root) {
  const fmt = (x, d) => Number(x).toFixed(d === undefined ? 2 : d);  // Python's _f
  // Python's _digits: more decimals when a value and a different threshold print the same
  function digits(value, thresholds) {
    let d = 2;
    while (value !== null && d < 6 &&
           thresholds.some((t) => value !== t && fmt(value, d) === fmt(t, d))) d += 1;
    return d;
  }
  const OPS = {
    "<": (v, t) => v < t,
    ">=": (v, t) => v >= t,
    "in": (v, t) => t[0] <= v && v <= t[1],
  };

  function evaluate(rule, answer, params) {
    if (rule.when) {
      const on = params[rule.when];
      if (on === null || on === undefined || on === false) return null;
    }
    const top = answer.top.label;
    const values = { top_probability: Number(answer.top.probability),
      melanoma: Number(answer.melanoma) };
    const value = rule.value ? values[rule.value] : null;
    const key = rule.threshold;
    const threshold = Array.isArray(key) ? key.map((k) => Number(params[k]))
      : (key === null ? null : Number(params[key]));
    let fired;
    if (rule.op === "always") fired = true;
    else if (rule.op === "top_in_and_>=") {
      fired = params[rule.classes].includes(top) && value >= threshold;
    } else fired = OPS[rule.op](value, threshold);
    const bounds = Array.isArray(threshold) ? threshold : (threshold === null ? [] : [threshold]);
    const d = digits(value, bounds);
    const fields = { top: top, value: value === null ? "" : fmt(value, d) };
    if (Array.isArray(threshold)) {
      fields.low = fmt(threshold[0], d); fields.high = fmt(threshold[1], d);
    } else if (threshold !== null) fields.threshold = fmt(threshold, d);
    if (rule.classes) fields.classes = "[" + params[rule.classes].map((c) => "'" + c + "'").join(", ") + "]";
    const text = rule[fired ? "fired" : "not_fired"].replace(/\{(\w+)\}/g, (_, k) => fields[k]);
    return { id: rule.id, fired: fired, value: value, threshold: threshold, op: rule.op, text: text };
  }

  /** Stage 1 on the device answer: every enabled check and whether any fired. */
  function fallbackChecks(rules, policy, answer) {
    const checks = rules.fallback.map((r) => evaluate(r, answer, policy)).filter((c) => c);
    return { checks: checks, rules_fired: checks.filter((c) => c.fired).map((c) => c.id),
      wanted: checks.some((c) => c.fired) };
  }

  const repr = (s) => (s.includes("'") && !s.includes('"') ? '"' + s + '"' : "'" + s + "'");

  /** Both stages, as Policy.decide: every check, the advice and its sentences. ``policy`` is
   * the thresholds; ``deviceThreshold``/``cloudThreshold`` are the tiers' card thresholds,
   * used when refer_threshold is unset. */
  function decide(rules, policy, device, cloud, deviceThreshold, cloudThreshold) {
    const fb = fallbackChecks(rules, policy, device);
    let reason;
    if (fb.wanted) {
      reason = "Sent to the cloud model: " + fb.checks.filter((c) => c.fired).map((c) => c.text)
        .join("; ") + ".";
    } else {
      reason = "The device model is confident enough (top " + repr(device.top.label) + " at " +
        fmt(device.top.probability) + "); no fallback rule fired.";
    }
    const useCloud = fb.wanted && cloud !== null && cloud !== undefined;
    const final = useCloud ? cloud : device;
    const by = useCloud ? "cloud" : "device";
    let thr = policy.refer_threshold;
    if (thr === null || thr === undefined) {
      thr = useCloud && cloudThreshold !== null && cloudThreshold !== undefined ? cloudThreshold
        : (deviceThreshold === undefined ? 0.5 : deviceThreshold);
    }
    const params = Object.assign({}, policy, { refer_threshold: Number(thr),
      cloud_used: useCloud, fallback_unanswered: fb.wanted && !useCloud });
    const checks = rules.advice.map((r) => evaluate(r, final, params)).filter((c) => c);
    const fired = checks.filter((c) => c.fired);
    let decision, message;
    if (fired.length) {
      decision = "refer";
      message = "Refer to a dermatologist (" + by + " model): " + fired.map((c) => c.text)
        .join("; ") + ".";
    } else {
      decision = "no_action";
      const mel = Number(final.melanoma), d = digits(mel, [Number(thr)]);
      message = "No action suggested by the model (" + by + " model: melanoma risk " +
        fmt(mel, d) + " < " + fmt(thr, d) + ", top diagnosis " + repr(final.top.label) +
        " at " + fmt(final.top.probability) + ").";
    }
    return { fallback_checks: fb.checks, fallback_rules: fb.rules_fired, wants_fallback: fb.wanted,
      advice_checks: checks, advice_rules: fired.length ? fired.map((c) => c.id)
        : ["no_referral_rule"], decision: decision, message: message, fallback_reason: reason,
      decided_by: by };
  }

  const api = { evaluate: evaluate, fallbackChecks: fallbackChecks, decide: decide, fmt: fmt };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgePolicy = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
