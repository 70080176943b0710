"use strict";
// The input gate on the page (issue 36): app.js calls these at two marked hooks. The gate
// runs before any diagnosis is shown: a refused photo is not uploaded, only the gate's
// measures go to POST api/v1/decide with the case fields (the server re-checks them with its
// thresholds, answers "retake" and logs the case), and the page shows what to change instead
// of a diagnosis.
// Sets window.dermedgeGatePage = {outcome, field, localRetake, render, reset}.
(function () {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  /** The gate's verdict on the device answer's photo (gate.js, the server's thresholds). */
  function outcome(answer, policyDoc) {
    return window.dermedgeGate.decide(policyDoc.gate_rules, policyDoc.gate,
      answer.gate_values || {});
  }

  /** The form field the page sends with its device answer: the gate's measures. */
  function field(result) {
    return JSON.stringify({ enabled: result.enabled, passed: result.passed,
      codes: result.codes, values: result.values });
  }

  /** A refused photo's answer computed on the phone (no network): the shape of the server's
   * retake body (edge_demo/service.py refuse), with no diagnosis. */
  function localRetake(result) {
    const fired = result.checks.filter((c) => c.fired).map((c) => c.id);
    return { device: null, cloud: null, gate: result, photo_received: false,
      device_computed_on: "browser", tier_path: "browser",
      fallback: { used: false, wanted: false, rules_fired: [], checks: [],
        reason: "Not considered: the input gate refused the photo." },
      advice: { decision: "retake", message: result.message, rules_fired: fired,
        decided_by: "gate", checks: [] } };
  }

  /** Show a retake answer: what to change, and no diagnosis. */
  function render(body) {
    const adv = $("advice");
    adv.className = "advice retake";
    adv.dataset.decision = "retake";
    adv.replaceChildren(el("strong", "", "Retake the photo"));
    adv.append(el("span", "why", body.advice.message));
    const ul = el("ul", "gate-reasons");
    body.gate.checks.filter((c) => c.fired).forEach((c) => ul.append(el("li", "", c.text)));
    adv.append(ul);
    adv.append(el("span", "why", "No diagnosis is shown for a photo the model cannot judge."));
    ["device", "cloud", "explanation"].forEach((id) => { $(id).hidden = true; });
    $("fallback").replaceChildren();
    $("fallback").hidden = true;
    const onPhone = body.device_computed_on === "browser";
    $("where").textContent = onPhone && !body.photo_received
      ? "Checked on this phone: the photo did not leave the phone."
      : "Checked on the server.";
    $("where").dataset.photoLeft = String(!onPhone || Boolean(body.photo_received));
    $("timings").textContent = body.request_id ? "request " + body.request_id
      : "Checked on this phone (no network).";
    $("result").hidden = false;
    $("result").scrollIntoView({ block: "start" });
  }

  /** Undo render()'s hiding before a diagnosis is shown. */
  function reset() {
    $("device").hidden = false;
    $("fallback").hidden = false;
    delete $("advice").dataset.decision;
  }

  window.dermedgeGatePage = { outcome, field, localRetake, render, reset };
})();
