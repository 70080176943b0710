"use strict";
(function () {
  const NAMES = { akiec: "actinic keratosis", bcc: "basal cell carcinoma", bkl: "benign keratosis",
    df: "dermatofibroma", mel: "melanoma", nv: "melanocytic nevus", vasc: "vascular lesion" };
  const $ = (id) => document.getElementById(id);
  const form = $("upload-form"), input = $("image-input"), preview = $("preview");
  const button = $("submit");
  const pct = (p) => (100 * p).toFixed(1) + "%";
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
    $(prefix + "-latency").textContent = "Inference " + tier.latency_ms.toFixed(1) + " ms";
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
    const t = body.timings_ms;
    $("timings").textContent = "Decode " + t.decode.toFixed(1) + " ms · device " +
      t.device.toFixed(1) + " ms · cloud " + t.cloud.toFixed(1) + " ms · total " +
      t.total.toFixed(1) + " ms · request " + body.request_id;
    $("result").hidden = false;
    $("result").scrollIntoView({ block: "start" });
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = input.files && input.files[0];
    if (!file) return;
    button.disabled = true;
    $("error").hidden = true; $("result").hidden = true;
    $("status").textContent = "Classifying…";
    const data = new FormData();
    data.append("image", file);
    ["age", "sex", "site"].forEach((k) => {
      const v = $(k + "-input").value.trim();
      if (v) data.append(k, v);
    });
    try {
      const explain = $("explain-input") && $("explain-input").checked;
      const url = "api/v1/classify" + (explain ? "?explain=1" : "");
      const resp = await fetch(url, { method: "POST", body: data });
      const body = await resp.json().catch(() => null);
      if (!resp.ok) {
        const msg = body && body.error ? body.error.message : "HTTP " + resp.status;
        throw new Error(msg);
      }
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
