// Offline use: registers the service worker (the server's /sw.js) for the LiteRT.js build
// this browser loads, asks for persistent storage, and says on the page what works without
// the network. Service workers need a secure context (HTTPS, or localhost): over plain HTTP
// at a LAN address the page needs the network, as before, and says so.
// Sets window.dermedgeOffline = {ready: Promise<{cache, persisted}>}.

import { chooseBuild } from "./runtime.js";

const config = JSON.parse(document.getElementById("browser-config").textContent);
const box = document.getElementById("offline-status");
const IOS = /iPad|iPhone|iPod/.test(navigator.userAgent) ||
  (navigator.platform === "MacIntel" && navigator.maxTouchPoints > 1);
const STANDALONE = (window.matchMedia && matchMedia("(display-mode: standalone)").matches) ||
  navigator.standalone === true;

function say(state, text) {
  box.dataset.state = state;
  box.textContent = text;
}

/** The version the active worker caches (it answers only once its files are all stored). */
function askVersion(worker) {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    const t = setTimeout(() => resolve(null), 3000);
    channel.port1.onmessage = (ev) => { clearTimeout(t); resolve(ev.data); };
    worker.postMessage({ type: "version" }, [channel.port2]);
  });
}

/** The version the active worker stores. The active worker is asked once, then again only
 * when another worker has taken over: a message is work for a worker, and a worker kept busy
 * by questions every 250 ms is never replaced (the browser waits until it is idle). Asks the
 * server for a new worker every 5 s meanwhile. */
async function waitForVersion(reg, want, timeoutMs) {
  const t0 = performance.now();
  let checked = t0;
  let asked = null;
  while (performance.now() - t0 < timeoutMs) {
    const worker = reg.active;
    if (worker && worker !== asked) {
      asked = worker;
      const v = await askVersion(worker);
      if (v && v.cache === want) return v;
      if (!v) asked = null;  // no answer (still starting): ask it again
    }
    if (!reg.installing && !reg.waiting && performance.now() - checked > 5000) {
      checked = performance.now();
      reg.update().catch(() => {});
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  return null;
}

function workers(reg) {
  return ["installing", "waiting", "active"].map((k) => k + ": " +
    (reg[k] ? reg[k].state : "none")).join(", ");
}

async function persist() {
  if (!navigator.storage || !navigator.storage.persist) return null;
  try {
    return (await navigator.storage.persisted()) || (await navigator.storage.persist());
  } catch (e) {
    return null;
  }
}

function storageText(persisted) {
  let text = persisted === true ? " Storage is persistent (granted): the browser keeps it."
    : persisted === false ? " Persistent storage was not granted: the browser may clear the" +
      " stored copy when the phone runs short of space."
      : " This browser cannot make the stored copy persistent.";
  if (IOS && !STANDALONE) {
    text += " On iOS, a page that is not added to the Home Screen can lose its stored data" +
      " after 7 days without a visit: add it (Share, Add to Home Screen).";
  }
  return text;
}

async function register() {
  if (!window.isSecureContext) {
    say("insecure", "Offline use is off: over plain HTTP at a network address browsers keep" +
      " no offline copy (service workers need HTTPS), so here the page needs the network." +
      " Trust this server once and open its https:// address (see above) to use it offline.");
    return null;
  }
  if (!("serviceWorker" in navigator) || !("caches" in window)) {
    say("unsupported", "This browser has no service workers: the page needs the network.");
    return null;
  }
  // the runtime and the model first: the worker then revalidates them (304s), not
  // downloads them again
  const runs = window.dermedgeDevice ? await window.dermedgeDevice.ready.then(() => true,
    () => false) : false;
  if (!runs) {
    say("unsupported", "Offline use needs the model to run in this browser, which it does" +
      " not here: the page needs the network.");
    return null;
  }
  const build = chooseBuild().build;
  const want = config.offline.version + "-" + build;
  say("installing", navigator.serviceWorker.controller
    ? "Checking the copy of this page stored on this phone…"
    : "Storing this page, the model and the policy on this phone for use without a network…");
  const reg = await navigator.serviceWorker.register(config.offline.worker + "?build=" + build,
    { scope: "./" });
  reg.update().catch(() => {});  // a new bundle on the server: its worker replaces this one
  const [version, persisted] = await Promise.all([waitForVersion(reg, want, 120000),
    persist()]);
  if (!version) {
    say("error", "The page could not be stored for offline use yet (it needs one complete" +
      " visit with the network); it will try again at the next visit. (Workers: " +
      workers(reg) + ".)");
    return null;
  }
  say("ready", "Works offline: this page, the model (sha256 " + config.sha256.slice(0, 12) +
    "), the policy (sha256 " + config.policy_sha256.slice(0, 12) + ") and the " + build +
    " runtime are stored on this phone. Without a network it answers on the phone and" +
    " queues the case." + storageText(persisted));
  return { cache: version.cache, build: build, persisted: persisted };
}

window.dermedgeOffline = { ready: register().catch((err) => {
  say("error", "Offline use could not be set up: " + (err && err.message ? err.message : err));
  return null;
}) };
