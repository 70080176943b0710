"use strict";
// The site lead's /cases page: the field report, label entry and the case table. The token
// is in an HttpOnly cookie (set when the server's /cases?token=... address was opened).
(function () {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  };
  const pct = (p) => (p === null || p === undefined ? "n/a" : (100 * p).toFixed(1) + "%");
  const ci = (c) => (c ? " [" + pct(c[0]) + ", " + pct(c[1]) + "]" : "");

  async function api(url, init) {
    const resp = await fetch(url, Object.assign({ credentials: "same-origin" }, init || {}));
    const body = await resp.json().catch(() => null);
    if (!resp.ok) throw new Error(body && body.error ? body.error.message : "HTTP " + resp.status);
    return body;
  }

  function renderReport(r) {
    const box = $("report-body");
    box.replaceChildren();
    box.append(el("p", "", r.headline));
    const ul = el("ul", "report-lines");
    r.lines.forEach((line) => {
      const li = el("li", line.flag ? "flag" : "", line.text);
      if (line.flag) li.dataset.flag = "1";
      ul.append(li);
    });
    box.append(ul);
    if (r.notes) r.notes.forEach((n) => box.append(el("p", "meta", n)));
  }

  function cell(tr, text, cls) { tr.append(el("td", cls || "", text)); }

  function renderCases(doc) {
    $("case-count").textContent = "(" + doc.count + ")";
    const body = document.querySelector("#cases-table tbody");
    body.replaceChildren();
    doc.cases.forEach((c) => {
      const tr = el("tr");
      tr.dataset.code = c.code;
      cell(tr, c.code, "code");
      cell(tr, (c.created_at || "").replace("T", " ").slice(0, 19));
      cell(tr, c.tester_id || "");
      cell(tr, c.site_id || "");
      cell(tr, c.decision);
      cell(tr, c.device_top ? c.device_top + " · mel " + pct(c.device_melanoma) : "");
      cell(tr, c.cloud_top ? c.cloud_top + " · mel " + pct(c.cloud_melanoma) : "");
      cell(tr, c.photo_kept ? "kept" : (c.photo_received ? "not kept" : "stayed on phone"));
      cell(tr, c.label ? (c.label.diagnosis === "other" ? "other: " + c.label.other
        : c.label.diagnosis) + " (" + c.label.source + ", " + c.label.date + ")" : "", "label");
      const td = el("td");
      const del = el("button", "small delete", "Delete");
      del.type = "button";
      del.addEventListener("click", () => {
        if (del.dataset.armed) { remove(c.code); return; }
        del.dataset.armed = "1";
        del.textContent = "Confirm delete";
      });
      td.append(del);
      tr.append(td);
      body.append(tr);
    });
  }

  async function refresh() {
    try {
      renderCases(await api("api/v1/cases"));
      renderReport(await api("api/v1/cases/report"));
    } catch (err) {
      $("cases-status").textContent = "Could not load the cases: " + err.message;
    }
  }

  async function remove(code) {
    try {
      await api("api/v1/cases/" + encodeURIComponent(code), { method: "DELETE" });
      $("cases-status").textContent = "Deleted case " + code + " (its row, label and photo).";
    } catch (err) {
      $("cases-status").textContent = "Could not delete " + code + ": " + err.message;
    }
    refresh();
  }

  $("label-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const code = f.case.value.trim();
    const label = { diagnosis: f.diagnosis.value, other: f.other.value, source: f.source.value,
      date: f.date.value };
    $("label-status").textContent = "Saving…";
    try {
      const out = await api("api/v1/cases/" + encodeURIComponent(code) + "/label", {
        method: "PUT", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(label) });
      $("label-status").textContent = "Saved: " + code + " is " + out.label.diagnosis + ".";
      $("label-status").dataset.ok = "1";
      f.case.value = "";
    } catch (err) {
      $("label-status").textContent = "Not saved: " + err.message;
      $("label-status").dataset.ok = "0";
    }
    refresh();
  });
  $("label-date").value = new Date().toISOString().slice(0, 10);
  refresh();
})();
