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
  let policyDoc = null;  // GET api/v1/policy: thresholds + the rules policy.js evaluates
  let deviceState = { ok: false, reason: browserConfig.reason };
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    $("result").hidden = true; $("error").hidden = true; $("status").textContent = "";
    if (!file) { preview.hidden = true; button.disabled = true; return; }
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    button.disabled = false;
  });

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
    if (body.advice.decision === "retake") { window.dermedgeGatePage.render(body); return; }
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
    const t = body.timings_ms;
    $("timings").textContent = "Decode " + t.decode.toFixed(1) + " ms · device " +
      t.device.toFixed(1) + " ms · cloud " + t.cloud.toFixed(1) + " ms · total " +
      t.total.toFixed(1) + " ms · request " + body.request_id;
    $("result").hidden = false;
    $("result").scrollIntoView({ block: "start" });
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

  async function post(url, data, type) {
    const init = { method: "POST", body: data };
    if (type) init.headers = { "Content-Type": type };
    const resp = await fetch(url, init);
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      throw new Error(body && body.error ? body.error.message : "HTTP " + resp.status);
    }
    return body;
  }

  function patientFields() {
    const out = [];
    ["age", "sex", "site"].forEach((k) => {
      const v = $(k + "-input").value.trim();
      if (v) out.push([k, v]);
    });
    return out;
  }

  function formData(withPhoto, file) {
    const data = new FormData();
    if (withPhoto) data.append("image", file);
    patientFields().forEach(([k, v]) => data.append(k, v));
    return data;
  }

  /** The device tier in this browser; the photo goes up only when a fallback rule fires. */
  async function classifyInBrowser(file) {
    let answer;
    try {
      answer = await window.dermedgeDevice.classifyFile(file);
    } catch (err) {
      if (err && err.name === "InvalidStateError" || /decode|source image/i.test(String(err))) {
        throw new Error("the file is not an image this browser can decode; choose a JPEG," +
          " PNG or WebP photo.");
      }
      throw err;
    }
    // --- input gate hook (issue 36, gate_page.js): a refused photo is not uploaded and gets
    // no diagnosis; the server re-checks the page's measures and answers "retake" ---
    const refused = await window.dermedgeGatePage.refuse(answer, policyDoc, formData(false, file));
    if (refused) {
      window.dermedgeLast = { answer: answer, fallback: null, sentPhoto: false, body: refused };
      return refused;
    }
    // --- end of the input gate hook ---
    const local = window.dermedgePolicy.fallbackChecks(policyDoc.rules, policyDoc.policy.policy,
      answer);
    const ask = $("ask-cloud-input") && $("ask-cloud-input").checked;
    const send = ask || (local.wanted && browserConfig.cloud);
    window.dermedgeLast = { answer: answer, fallback: local, sentPhoto: send };
    const data = formData(send, file);
    data.append("device_answer", JSON.stringify(answer));
    data.append("gate", window.dermedgeGatePage.field(answer.gate));  // input gate hook
    if (ask) data.append("ask_cloud", "1");
    let body = await post("api/v1/decide", data);
    if (body.fallback.wanted && !body.photo_received && browserConfig.cloud) {
      // the patient details moved the answer into a fallback rule (server-side tables)
      const again = formData(true, file);
      again.append("device_answer", JSON.stringify(answer));
      again.append("gate", window.dermedgeGatePage.field(answer.gate));  // input gate hook
      body = await post("api/v1/decide", again);
      window.dermedgeLast.sentPhoto = true;
    }
    window.dermedgeLast.body = body;
    return body;
  }

  /** The photo is the request body (no multipart to build or parse); fields ride in the URL. */
  async function classifyOnServer(file, explain) {
    const query = new URLSearchParams(patientFields());
    if (explain) query.append("explain", "1");
    const url = "api/v1/classify" + (query.toString() ? "?" + query : "");
    const body = await post(url, file, file.type || "application/octet-stream");
    window.dermedgeLast = { answer: null, fallback: null, sentPhoto: true, body: body };
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
      status.textContent = "The device model runs in this browser (LiteRT.js " +
        (info.version || "") + ", WebAssembly; loaded in " + info.loadMs.toFixed(0) +
        " ms). The photo stays on this phone unless the policy sends it to the cloud.";
      status.dataset.state = "browser";
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
    $("error").hidden = true; $("result").hidden = true;
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
