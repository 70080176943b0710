"use strict";
(function () {
  const NAMES = { akiec: "actinic keratosis", bcc: "basal cell carcinoma", bkl: "benign keratosis",
    df: "dermatofibroma", mel: "melanoma", nv: "melanocytic nevus", vasc: "vascular lesion" };
  const $ = (id) => document.getElementById(id);
  const form = $("upload-form"), input = $("image-input"), preview = $("preview");
  const button = $("submit");
  const pct = (p) => (100 * p).toFixed(1) + "%";
  const browserConfig = JSON.parse($("browser-config").textContent);
  if (!window.isSecureContext) $("http-notice").hidden = false;  // no offline, install, threads
  let policyDoc = null;  // GET api/v1/policy: thresholds, rules, the card's metadata tables
  let deviceState = { ok: false, reason: browserConfig.reason };
  let deviceInfo = null;  // {build, threads, version} once the model is loaded here
  // The case being photographed: its id is made when the photo is taken; the device answer
  // is computed right away (while the tester fills in the details).
  let current = null;
  const TESTER_KEYS = [["tester-id", "dermedge.tester_id"], ["site-id", "dermedge.site_id"]];
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  /** A case starts when the photo is taken: its id, short code and the phone's clock. */
  function newCase(file) {
    const id = window.dermedgeCaseId.newCaseId();
    return { file: file, case_id: id, code: window.dermedgeCaseId.shortCode(id),
      created_at: new Date().toISOString(), answer: null };
  }

  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    $("result").hidden = true; $("error").hidden = true; $("status").textContent = "";
    ["consent-upload", "consent-keep"].forEach((id) => { if ($(id)) $(id).checked = false; });
    if ($("consent-keep")) $("consent-keep").disabled = true;
    if (!file) {
      preview.hidden = true; button.disabled = true; current = null;
      $("case-code").hidden = true;
      return;
    }
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    button.disabled = false;
    current = newCase(file);
    $("case-code-value").textContent = current.code;
    $("case-code").hidden = false;
    if (deviceState.ok) {  // the photo alone, on this phone, before the tester presses Classify
      current.answer = window.dermedgeDevice.classifyFile(file);
      current.answer.catch(() => {});
    }
  });

  if ($("consent-keep")) {
    $("consent-upload").addEventListener("change", () => {
      $("consent-keep").disabled = !$("consent-upload").checked;
      if (!$("consent-upload").checked) $("consent-keep").checked = false;
    });
  }

  function showTester() {
    const t = $("tester-id").value.trim(), s = $("site-id").value.trim();
    $("tester-summary").textContent = t || s ? "(" + (t || "no tester id") + " at " +
      (s || "no site id") + ")" : "(not set)";
  }
  TESTER_KEYS.forEach(([id, key]) => {
    try { $(id).value = localStorage.getItem(key) || ""; } catch (e) { /* storage off */ }
    $(id).addEventListener("input", () => {
      try { localStorage.setItem(key, $(id).value.trim()); } catch (e) { /* storage off */ }
      showTester();
    });
  });
  showTester();

  function renderTier(prefix, tier, model) {
    $(prefix + "-model").textContent = model ? model.name + " · " + model.mode : "";
    $(prefix + "-risk").textContent = "Melanoma risk: " + pct(tier.melanoma);
    const list = $(prefix + "-top");
    list.replaceChildren();
    Object.entries(tier.diagnosis).sort((a, b) => b[1] - a[1]).slice(0, 3).forEach(([lab, p]) => {
      const li = el("li");
      li.append(el("span", "lab", NAMES[lab] ? lab + " · " + NAMES[lab] : lab));
      const bar = el("span", "bar"), fill = el("span");
      fill.style.width = pct(p); bar.append(fill); li.append(bar);
      li.append(el("span", "p", pct(p)));
      list.append(li);
    });
    $(prefix + "-latency").textContent = "Inference " + tier.latency_ms.toFixed(1) + " ms" +
      (prefix === "device" ? (tier.computed_on === "browser" ? " on this phone (in the browser)"
        : " on the server") : " on the server");
    const meta = $(prefix + "-metadata");
    if (tier.metadata_used && tier.metadata_used.length) {
      meta.textContent = "Updated with the patient's " + tier.metadata_used.join(", ") +
        " (photo alone: melanoma risk " + pct(tier.image_only.melanoma) + ", top " +
        tier.image_only.top.label + " " + pct(tier.image_only.top.probability) + ")";
      meta.hidden = false;
    } else {
      meta.hidden = true;
    }
  }

  function render(body) {
    // --- input gate hook (issue 36, gate_page.js): a retake answer shows no diagnosis ---
    if (body.advice.decision === "retake") {
      window.dermedgeGatePage.render(body);
      renderCase(body);
      return;
    }
    window.dermedgeGatePage.reset();
    // --- end of the input gate hook ---
    const adv = $("advice");
    adv.className = "advice " + body.advice.decision;
    adv.replaceChildren(el("strong", "", body.advice.decision === "refer"
      ? "Refer to a dermatologist" : "No action suggested by the model"));
    adv.append(el("span", "why", body.advice.message + " Rules: " +
      body.advice.rules_fired.join(", ") + "."));
    adv.append(el("span", "why", body.disclaimer));
    renderTier("device", body.device, body.models.device);
    const fb = $("fallback");
    fb.replaceChildren(el("h2", "", body.fallback.used ? "Fell back to the cloud model"
      : (body.fallback.wanted ? "Cloud fallback wanted but unavailable" : "No cloud fallback")));
    fb.append(el("p", "", body.fallback.reason));
    if (body.fallback.rules_fired.length) {
      const ul = el("ul", "rules");
      body.fallback.rules_fired.forEach((r) => ul.append(el("li", "", r)));
      fb.append(ul);
    }
    if (body.cloud) { renderTier("cloud", body.cloud, body.models.cloud); $("cloud").hidden = false; }
    else { $("cloud").hidden = true; }
    const ex = body.explanation;
    if (ex) {
      $("heatmap").src = ex.png;
      $("explanation-model").textContent = ex.model + " · Grad-CAM";
      $("explanation-note").textContent = "Heatmap for " + (ex.head === "melanoma"
        ? "the melanoma risk" : (NAMES[ex["class"]] || ex["class"])) + " (" + pct(ex.probability) +
        " on the float model). Red: regions that raised that score; the dimmed margins are " +
        "outside the square the model sees.";
      $("explanation").hidden = false;
    } else {
      $("explanation").hidden = true;
      $("heatmap").removeAttribute("src");
    }
    renderWhere(body);
    renderCase(body);
    const t = body.timings_ms;
    $("timings").textContent = t ? "Decode " + t.decode.toFixed(1) + " ms · device " +
      t.device.toFixed(1) + " ms · cloud " + t.cloud.toFixed(1) + " ms · total " +
      t.total.toFixed(1) + " ms · request " + body.request_id
      : "Answered on this phone: model " + body.device.latency_ms.toFixed(1) + " ms.";
    $("result").hidden = false;
    $("result").scrollIntoView({ block: "start" });
    performance.mark("dermedge-answer");  // benchmarks/browser_latency.py reads it
  }

  /** What the server did with the case: logged in the site's case log, or a repeat. */
  function renderCase(body) {
    const c = body.case, box = $("case-status");
    box.textContent = !c ? "" : "Case " + c.code + (c.logged ? " · logged in the site's case log"
      : "") + (c.duplicate ? " · already answered (this is the first answer)" : "");
    box.dataset.code = c ? c.code : "";
    box.hidden = !c;
  }

  function renderWhere(body) {
    const dev = body.device, onPhone = dev.computed_on === "browser";
    const parts = [onPhone ? "Device answer: on this phone, " + dev.latency_ms.toFixed(0) + " ms"
      : "Device answer: on the server, " + dev.latency_ms.toFixed(0) + " ms" +
        (deviceState.reason ? " (" + deviceState.reason + ")" : "")];
    if (body.cloud) parts.push("cloud answer: cloud, " + body.cloud.latency_ms.toFixed(0) + " ms");
    const left = onPhone ? body.photo_received : true;
    parts.push(left ? "the photo left the phone" : "the photo did not leave the phone");
    $("where").textContent = parts.join(" · ") + ".";
    $("where").dataset.photoLeft = String(left);
  }

  /** POST; a network failure (or a gateway's 502-504, or no answer in 30 s) is marked
   * ``offline`` so that the case is queued instead of lost. */
  async function post(url, data, type) {
    const init = { method: "POST", body: data };
    if (type) init.headers = { "Content-Type": type };
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 30000);
    init.signal = abort.signal;
    let resp;
    try {
      resp = await fetch(url, init);
    } catch (err) {
      throw Object.assign(new Error("the server cannot be reached"), { offline: true });
    } finally {
      clearTimeout(timer);
    }
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      throw Object.assign(new Error(body && body.error ? body.error.message
        : "HTTP " + resp.status), { offline: [502, 503, 504].includes(resp.status) });
    }
    return body;
  }

  function patientForm() {
    const out = {};
    ["age", "sex", "site"].forEach((k) => { out[k] = $(k + "-input").value.trim(); });
    return out;
  }

  function patientFields() {
    return Object.entries(patientForm()).filter(([, v]) => v);
  }

  const consented = (id) => Boolean($(id) && $(id).checked);

  /** The case fields of the contract (docs/BROWSER.md), as [name, value] pairs. */
  function caseFields(c, build) {
    const out = [["case_id", c.case_id]];
    // "0" says the tester declined: the server logs the phone's answer at once instead of
    // waiting for a photo the policy wants (case.awaiting_photo)
    out.push(["consent_upload", consented("consent-upload") ? "1" : "0"]);
    if (consented("consent-upload") && consented("consent-keep")) out.push(["consent_keep", "1"]);
    TESTER_KEYS.forEach(([id]) => {
      const v = $(id).value.trim();
      if (v) out.push([id.replace("-", "_"), v]);
    });
    out.push(["client", JSON.stringify({ user_agent: navigator.userAgent,
      runtime: build === "server" ? "server" : "litert.js " + (browserConfig.version || ""),
      build: build, threads: build === "server" ? null : (deviceInfo ? deviceInfo.threads : 1),
      created_at: c.created_at, queued: false })]);
    out.push(["model_sha256", browserConfig.sha256], ["policy_sha256",
      policyDoc ? policyDoc.sha256 : browserConfig.policy_sha256]);
    return out;
  }

  function note(text) {
    $("case-note").textContent = text;
    $("case-note").hidden = !text;
  }

  /** The device tier in this browser: the complete answer is computed here (answer.js, the
   * server's rules and tables); the photo goes up only when the cloud model is needed and
   * the tester recorded consent. Without a network the case is queued on the phone. */
  async function classifyInBrowser(file) {
    const c = current && current.file === file ? current : newCase(file);
    let answer;
    try {
      answer = await (c.answer || window.dermedgeDevice.classifyFile(file));
    } catch (err) {
      if (err && err.name === "InvalidStateError" || /decode|source image/i.test(String(err))) {
        throw new Error("the file is not an image this browser can decode; choose a JPEG," +
          " PNG or WebP photo.");
      }
      throw err;
    }
    const build = deviceInfo && deviceInfo.build === "threaded" ? "threaded" : "single";
    // --- input gate hook (issue 36, gate_page.js): a refused photo is not uploaded and gets
    // no diagnosis; only the gate's measures go up, the server re-checks them and answers
    // "retake" (offline: the phone's own retake answer, queued without the photo) ---
    answer.gate = window.dermedgeGatePage.outcome(answer, policyDoc);
    const gateField = ["gate", window.dermedgeGatePage.field(answer.gate)];
    if (!answer.gate.passed) {
      const fields = [...caseFields(c, build), ...patientFields(), gateField];
      const retake = window.dermedgeGatePage.localRetake(answer.gate);
      const item = { case_id: c.case_id, code: c.code, created_at: c.created_at,
        fields: Object.fromEntries(fields), photo: null, photo_name: file.name || "photo.jpg",
        local: retake };
      window.dermedgeLast = { answer: answer, local: retake, caseId: item.case_id,
        fallback: null, sentPhoto: false, needCloud: false, queued: false };
      const data = new FormData();
      fields.forEach(([k, v]) => data.append(k, v));
      let body;
      try {
        if (navigator.onLine === false) throw Object.assign(new Error("offline"), { offline: true });
        body = await post("api/v1/decide", data);
      } catch (err) {
        if (!err.offline || !window.dermedgeCases) throw err;
        await window.dermedgeCases.enqueue(item);
        window.dermedgeLast.queued = true;
        window.dermedgeLast.body = retake;
        note("No network: the photo was checked on this phone. The case is queued (without" +
          " the photo) and is sent when the network is back.");
        return retake;
      }
      window.dermedgeLast.body = body;
      note("");
      if (window.dermedgeCases) window.dermedgeCases.record(item, body).catch(() => {});
      return body;
    }
    // --- end of the input gate hook ---
    const meta = window.dermedgeMetadata.parse(patientForm());  // the server's 400 messages
    const ask = Boolean($("ask-cloud-input") && $("ask-cloud-input").checked);
    const local = window.dermedgeAnswer.localDecide(policyDoc, answer, meta, ask);
    const needCloud = ask || (local.fallback.wanted && browserConfig.cloud);
    // consent to keep the photo in the site's case log sends it too (the cloud model still
    // runs only when needed); the keep box can be ticked only with the upload box
    const keep = consented("consent-upload") && consented("consent-keep");
    const send = (needCloud && consented("consent-upload")) || keep;
    const fields = [...caseFields(c, build), ...patientFields(),
      ["device_answer", JSON.stringify(answer)], gateField];
    if (ask) fields.push(["ask_cloud", "1"]);
    const item = { case_id: c.case_id, code: c.code, created_at: c.created_at,
      fields: Object.fromEntries(fields), photo: send ? file : null,
      photo_name: file.name || "photo.jpg", local: local };
    const noConsent = needCloud && !consented("consent-upload") ? "The cloud model was needed, but there is no" +
      " consent to send the photo: it stayed on this phone and the phone's answer stands." : "";
    const scaled = window.dermedgeTemperature.apply(answer,
      (policyDoc.policy.temperature || {}).device);  // what the rules see (answer.js)
    window.dermedgeLast = { answer: answer, local: local, caseId: item.case_id,
      fallback: window.dermedgePolicy.fallbackChecks(policyDoc.rules, policyDoc.policy.policy,
        scaled), sentPhoto: false, needCloud: needCloud, queued: false };
    const data = new FormData();
    fields.forEach(([k, v]) => data.append(k, v));
    if (send) data.append("image", file);
    let body;
    try {
      if (navigator.onLine === false) throw Object.assign(new Error("offline"), { offline: true });
      body = await post("api/v1/decide", data);
    } catch (err) {
      if (!err.offline || !window.dermedgeCases) throw err;
      await window.dermedgeCases.enqueue(item);
      const waiting = (await window.dermedgeCases.queue()).length;
      window.dermedgeLast.queued = true;
      window.dermedgeLast.body = local;
      note("No network: this answer was computed on this phone with the server's rules. The" +
        " case is queued on the phone (" + waiting + " waiting) and is sent when the network" +
        " is back" + (send ? ", with its photo (consented)." : "; the photo stays here.") +
        (noConsent ? " " + noConsent : ""));
      return local;
    }
    let sent = send;
    if (body.case && body.case.awaiting_photo && consented("consent-upload") && !send) {
      // the server's rules wanted the cloud where this page's did not: the same case with
      // its photo (consented), answered and logged once
      data.append("image", file);
      body = await post("api/v1/decide", data);
      sent = true;
    }
    window.dermedgeLast.sentPhoto = sent;
    window.dermedgeLast.body = body;
    note(noConsent);
    if (window.dermedgeCases) window.dermedgeCases.record(item, body).catch(() => {});
    return body;
  }

  /** The photo is the request body (no multipart to build or parse); fields ride in the URL.
   * The photo leaves the phone here, so only with the tester's consent for this case. */
  async function classifyOnServer(file, explain) {
    if (!consented("consent-upload")) {
      throw new Error((explain ? "the heatmap is computed on the server" : "this browser" +
        " cannot run the model (" + (deviceState.reason || "not loaded") + ")") + ", so the" +
        " photo must be sent: tick the consent box for this case first (or leave it, and the" +
        " photo stays on this phone without an answer).");
    }
    const c = current && current.file === file ? current : newCase(file);
    const query = new URLSearchParams([...patientFields(), ...caseFields(c, "server")]);
    if (explain) query.append("explain", "1");
    const url = "api/v1/classify" + (query.toString() ? "?" + query : "");
    const body = await post(url, file, file.type || "application/octet-stream");
    window.dermedgeLast = { answer: null, fallback: null, sentPhoto: true, body: body,
      caseId: c.case_id };
    note("");
    if (window.dermedgeCases) {
      window.dermedgeCases.record(c, body).catch(() => {});
    }
    return body;
  }

  function renderOperatingPoint(doc) {
    const box = $("operating-point-body");
    box.replaceChildren();
    const op = doc.operating_point;
    if (!op) {
      box.append(el("p", "meta", "These are default thresholds, not calibrated on any" +
        " labelled data, so there is no measured fallback or referral rate to state. " +
        doc.calibrate_note));
      return;
    }
    box.append(el("p", "meta", "On the split it was calibrated on (" + (op.split || "?") +
      ", n = " + op.n + "), the active policy did this (95 % intervals):"));
    const table = el("table");
    [["fallback_rate", "Sent to the cloud"], ["referral_rate", "Referred"],
      ["melanoma_sensitivity", "Melanoma sensitivity"],
      ["melanoma_specificity", "Melanoma specificity"]].forEach(([k, name]) => {
      const v = op[k], tr = el("tr");
      tr.append(el("th", "", name));
      tr.append(el("td", "", v.value === null ? "n/a" : pct(v.value)));
      tr.append(el("td", "", v.ci95 ? pct(v.ci95[0]) + " to " + pct(v.ci95[1]) : ""));
      tr.append(el("td", "meta", v.n ? "n = " + v.n : ""));
      table.append(tr);
    });
    box.append(table);
    box.append(el("p", "meta", op.note));
    const f = (k) => (op[k].value === null ? "n/a" : pct(op[k].value));
    $("operating-point-summary").textContent = "On its calibration split this policy sent " +
      f("fallback_rate") + " to the cloud and referred " + f("referral_rate") +
      " (melanoma sensitivity " + f("melanoma_sensitivity") + "); intervals and caveats";
  }

  fetch("api/v1/policy").then((r) => r.json()).then((doc) => {
    policyDoc = doc;
    renderOperatingPoint(doc);
  }).catch((err) => {
    $("operating-point-body").textContent = "Could not load the policy: " + err.message;
  });

  const status = $("device-status");
  if (browserConfig.enabled && window.dermedgeDevice === undefined) {
    // device.js is a module; wait for it to define window.dermedgeDevice
    document.addEventListener("DOMContentLoaded", watchDevice);
  } else {
    watchDevice();
  }
  function watchDevice() {
    if (!browserConfig.enabled) { status.dataset.state = "server"; return; }
    if (!window.dermedgeDevice) {
      deviceState = { ok: false, reason: "this browser cannot load JavaScript modules" };
      status.textContent = "This browser cannot run the device model (" + deviceState.reason +
        "): the server runs it, so the photo is uploaded.";
      status.dataset.state = "server";
      return;
    }
    window.dermedgeDevice.ready.then((info) => {
      deviceState = { ok: true, reason: null };
      deviceInfo = info;
      const build = info.build + " build, " + info.threads + (info.threads === 1 ? " thread"
        : " threads") + (info.why ? " (" + info.why + ")" : "");
      status.textContent = "The device model runs in this browser (LiteRT.js " +
        (info.version || "") + ", WebAssembly, " + build + "; loaded in " +
        info.loadMs.toFixed(0) + " ms). The photo stays on this phone unless the cloud model" +
        " is needed and the patient consents.";
      status.dataset.state = "browser";
      status.dataset.build = info.build;
      status.dataset.threads = String(info.threads);
      $("runs-build").textContent = " · LiteRT.js " + (info.version || "") + ", " +
        info.build + " build, " + info.threads + (info.threads === 1 ? " thread" : " threads");
      if (current && current.answer === null) {
        current.answer = window.dermedgeDevice.classifyFile(current.file);
        current.answer.catch(() => {});
      }
    }, (err) => {
      deviceState = { ok: false, reason: "the model failed to load in this browser: " +
        (err && err.message ? err.message : String(err)) };
      status.textContent = "This browser cannot run the device model (" + deviceState.reason +
        "): the server runs it, so the photo is uploaded.";
      status.dataset.state = "server";
    });
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = input.files && input.files[0];
    if (!file) return;
    button.disabled = true;
    $("error").hidden = true; $("result").hidden = true; note("");
    $("status").textContent = "Classifying…";
    try {
      const explain = $("explain-input") && $("explain-input").checked;
      // a heatmap needs the photo on the server, so it takes the server path
      const body = deviceState.ok && policyDoc && !explain ? await classifyInBrowser(file)
        : await classifyOnServer(file, explain);
      render(body);
      $("status").textContent = "";
    } catch (err) {
      $("status").textContent = "";
      $("error").textContent = "Could not classify: " + err.message;
      $("error").hidden = false;
    } finally {
      button.disabled = false;
    }
  });
})();
