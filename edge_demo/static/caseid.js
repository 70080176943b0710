"use strict";
// Case ids made on the phone: a mirror of edge_demo/caseid.py (tests run both on one table).
// Loaded as a classic script (window.dermedgeCaseId) and by Node (require).
(function (root) {
  const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
  const CASE_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

  /** A random UUID v4; crypto.randomUUID needs a secure context, getRandomValues does not. */
  function newCaseId(cryptoImpl) {
    const c = cryptoImpl || root.crypto;
    if (c.randomUUID) return c.randomUUID();
    const b = new Uint8Array(16);
    c.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" +
      h.slice(16, 20) + "-" + h.slice(20);
  }

  function isCaseId(value) { return typeof value === "string" && CASE_ID.test(value); }

  /** XXXX-XXXX: the id's first 40 bits in Crockford base32. */
  function shortCode(caseId) {
    if (!isCaseId(caseId)) throw new Error("not a case id: " + caseId);
    const hex = caseId.replace(/-/g, "").slice(0, 10);
    let out = "";
    for (let i = 0; i < 8; i++) {  // 40 bits = 8 groups of 5, most significant first
      const bitPos = 5 * i;
      const chunk = parseInt(hex.slice(0, 10), 16);  // 40 bits fit a double exactly
      const v = Math.floor(chunk / 2 ** (35 - bitPos)) % 32;
      out += CROCKFORD[v];
    }
    return out.slice(0, 4) + "-" + out.slice(4);
  }

  const api = { newCaseId: newCaseId, isCaseId: isCaseId, shortCode: shortCode };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  root.dermedgeCaseId = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
