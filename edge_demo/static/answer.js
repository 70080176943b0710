"use strict";
// The complete answer on the phone: what POST api/v1/decide returns for a device answer when
// no photo reaches the server (edge_demo/browser.py decide + DemoService.respond), computed
// from the policy document (GET api/v1/policy: thresholds, rules, the device card's metadata
// tables and threshold). An offline answer is therefore the server's answer; the tests run
// both on one table. Loaded as a classic script (window.dermedgeAnswer) and by Node.
(function (root) {
  const P = root.dermedgePolicy || require("./policy.js");
  const M = root.dermedgeMetadata || require("./metadata.js");
  const T = root.dermedgeTemperature || require("./temperature.js");
  const G = root.dermedgeGate || require("./gate.js");
  const NOT_SENT = " The photo was not sent, so the device answer stands.";
  const NO_CLOUD = " No cloud tier is configured, so the device answer stands.";

  /** The policy's temperatures for the device tier ({melanoma, diagnosis}; none: T = 1). */
  const deviceTemps = (doc) => ((doc.policy && doc.policy.temperature) || {}).device;

  /** The melanoma threshold that fits the answer: the tables' own after metadata, at the
   * policy's melanoma temperature (device_threshold, the card's, comes mapped already). */
  function threshold(doc, answer) {
    if (answer && answer.metadata_used && answer.metadata_used.length) {
      const t = (deviceTemps(doc) || {}).melanoma;
      return T.scaleProbability(Number(doc.device_metadata.melanoma_threshold),
        t === undefined ? 1 : Number(t));
    }
    return doc.device_threshold;
  }

  /** The policy's decision on the tiers' answers, as the response body (DemoService.respond;
   * the page only ever decides without a cloud answer). */
  function respond(doc, device, meta, wanted, note) {
    const d = P.decide(doc.rules, doc.policy.policy, device, null, threshold(doc, device), null);
    let reason = d.fallback_reason;
    reason += wanted && !doc.models.cloud ? NO_CLOUD : note;
    return {
      device: device,
      fallback: { used: false, wanted: wanted, rules_fired: d.fallback_rules, reason: reason,
        checks: d.fallback_checks },
      cloud: null,
      advice: { decision: d.decision, message: d.message, rules_fired: d.advice_rules,
        decided_by: d.decided_by, checks: d.advice_checks },
      disclaimer: doc.disclaimer,
      metadata: { received: meta || {}, used: { device: device.metadata_used || [], cloud: [] },
        tables: doc.metadata_tables },
      models: doc.models,
    };
  }

  /** The input gate's section: gate.js on the page's measures of the photo and the device
   * answer's ood, as the server re-checks them (edge_demo/browser.py decide). */
  function gateSection(doc, answer) {
    const values = Object.assign({}, answer.gate_values || {});
    if (answer.ood !== undefined && answer.ood !== null) values.ood = answer.ood;
    return G.decide(doc.gate_rules, doc.gate, values);
  }

  /** The page's device answer (photo alone) + patient details -> the body the server would
   * return with no photo: the policy's temperature, then the tables, both policy stages,
   * every check and sentence (DemoService.adjust's order). */
  function localDecide(doc, answer, meta, askCloud) {
    const prior = meta ? M.tables(doc.device_metadata) : null;
    const scaled = T.apply(answer, deviceTemps(doc));
    const device = prior ? M.adjust(scaled, prior, meta)[0] : scaled;
    const wants = P.fallbackChecks(doc.rules, doc.policy.policy, device).wanted;
    const body = respond(doc, device, meta, wants, wants ? NOT_SENT : "");
    body.fallback.asked = Boolean(askCloud);
    body.gate = gateSection(doc, answer);
    return Object.assign(body, { photo_received: false, tier_path: "browser",
      device_computed_on: "browser" });
  }

  const api = { localDecide: localDecide, respond: respond, threshold: threshold,
    gateSection: gateSection };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgeAnswer = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
