// Cases on the phone, in IndexedDB: the queue of cases answered here that still have to
// reach the server (no network at the time), and the case history (every answer, with
// delete). Queued cases are sent when the network is back: at load, on the "online" event
// and by a retry with backoff; one sender at a time (a Web Lock across tabs where the
// browser has them), each case removed from the queue on a 2xx. The server accepts each
// case id once, so a resend after a lost response is answered, not counted twice.
// Sets window.dermedgeCases = {enqueue, record, sync, queue, history, remove, forget}.

const DB_NAME = "dermedge", DB_VERSION = 1;
const FIRST_RETRY_MS = 5000, MAX_RETRY_MS = 300000;
const $ = (id) => document.getElementById(id);
let dbPromise = null;

function db() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB_NAME, DB_VERSION);
      req.onupgradeneeded = () => {
        req.result.createObjectStore("queue", { keyPath: "case_id" });
        req.result.createObjectStore("history", { keyPath: "case_id" });
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

async function run(store, mode, fn) {
  const d = await db();
  return new Promise((resolve, reject) => {
    const t = d.transaction(store, mode);
    const req = fn(t.objectStore(store));
    t.oncomplete = () => resolve(req ? req.result : undefined);
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error);
  });
}
const put = (store, value) => run(store, "readwrite", (s) => s.put(value));
const get = (store, key) => run(store, "readonly", (s) => s.get(key));
const del = (store, key) => run(store, "readwrite", (s) => s.delete(key));
const all = (store) => run(store, "readonly", (s) => s.getAll());
const byTime = (a, b) => (a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : 0);

function summary(body) {
  return { decision: body.advice.decision, message: body.advice.message,
    photo_received: Boolean(body.photo_received), cloud_used: Boolean(body.fallback.used),
    case: body.case || null, request_id: body.request_id || null };
}

/** Keep a case answered by the server in the history. */
export async function record(item, body) {
  await put("history", { case_id: item.case_id, code: item.code, created_at: item.created_at,
    status: "answered", answered_by: "server", sent_at: new Date().toISOString(),
    queued: Boolean(item.queued), answer: summary(body) });
  render();
}

/** Queue a case answered on the phone: {case_id, code, created_at, fields, photo, local}. */
export async function enqueue(item) {
  await put("queue", Object.assign({}, item, { queued_at: new Date().toISOString(),
    attempts: 0, refused: null }));
  await put("history", { case_id: item.case_id, code: item.code, created_at: item.created_at,
    status: "waiting", answered_by: "phone", queued: true, answer: summary(item.local),
    photo_waiting: Boolean(item.photo) });
  schedule(FIRST_RETRY_MS);
  render();
}

function formOf(item) {
  const data = new FormData();
  Object.entries(item.fields).forEach(([k, v]) => data.append(k, v));
  const client = JSON.parse(item.fields.client || "{}");
  client.queued = true;
  data.set("client", JSON.stringify(client));
  if (item.photo) data.append("image", item.photo, item.photo_name || "photo.jpg");
  return data;
}

let retryMs = FIRST_RETRY_MS, timer = null, nextTry = null, inFlight = null;

function schedule(ms) {
  if (timer !== null) clearTimeout(timer);
  nextTry = Date.now() + ms;
  timer = setTimeout(() => { timer = null; nextTry = null; sync("retry"); }, ms);
}

async function sendAll() {
  const items = (await all("queue")).sort(byTime);
  let sent = 0;
  for (const item of items) {
    if (item.refused) continue;
    if (!(await get("queue", item.case_id))) continue;  // deleted meanwhile
    let resp;
    try {
      resp = await fetch("api/v1/decide", { method: "POST", body: formOf(item) });
    } catch (err) {
      return { sent, offline: true };
    }
    const body = await resp.json().catch(() => null);
    if (resp.ok && body) {
      await record(Object.assign({}, item, { queued: true }), body);
      await del("queue", item.case_id);
      sent += 1;
    } else if (resp.status >= 500 || resp.status === 408 || resp.status === 429) {
      await put("queue", Object.assign({}, item, { attempts: item.attempts + 1 }));
      return { sent, offline: true };
    } else {  // the server refuses it: kept for the tester to read and delete, not retried
      const message = body && body.error ? body.error.message : "HTTP " + resp.status;
      await put("queue", Object.assign({}, item, { attempts: item.attempts + 1,
        refused: message }));
      const h = await get("history", item.case_id);
      if (h) await put("history", Object.assign(h, { status: "refused", refused: message }));
    }
  }
  return { sent, offline: false };
}

/** Send every queued case now; concurrent calls share one run (and one Web Lock). */
export function sync(reason) {
  if (inFlight) return inFlight;
  const locked = navigator.locks && navigator.locks.request
    ? navigator.locks.request("dermedge-queue", sendAll) : sendAll();
  inFlight = locked.then(async (res) => {
    const left = (await all("queue")).filter((i) => !i.refused).length;
    if (res.offline && left) {
      schedule(retryMs);
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    } else {
      retryMs = FIRST_RETRY_MS;
    }
    return Object.assign(res, { reason: reason || "", left });
  }).finally(() => { inFlight = null; render(); });
  return inFlight;
}

export async function remove(caseId) {
  await del("queue", caseId);
  const h = await get("history", caseId);
  if (h && h.status !== "answered") {
    await put("history", Object.assign(h, { status: "deleted", photo_waiting: false }));
  }
  render();
}

export async function forget(caseId) {
  await del("history", caseId);
  render();
}

const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const when = (iso) => new Date(iso).toLocaleString([], { dateStyle: "short",
  timeStyle: "short" });
const DECISIONS = { refer: "Refer", no_action: "No action", retake: "Retake the photo" };

function button(text, label, onClick) {
  const b = el("button", "small", text);
  b.type = "button";
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

let rendering = Promise.resolve();
export function render() {
  rendering = rendering.then(async () => {
    const queue = (await all("queue")).sort(byTime);
    const history = (await all("history")).sort(byTime).reverse();
    const waiting = queue.filter((i) => !i.refused).length;
    const status = $("queue-status");
    status.dataset.count = String(queue.length);
    status.textContent = queue.length === 0 ? "No case is waiting to be sent."
      : queue.length + (queue.length === 1 ? " case is" : " cases are") + " waiting to be" +
        " sent" + (waiting && nextTry ? " (next try in " +
          Math.max(1, Math.round((nextTry - Date.now()) / 1000)) + " s, or when the network" +
          " is back)" : "") + ".";
    const ql = $("queue-list");
    ql.replaceChildren(...queue.map((i) => {
      const li = el("li");
      li.dataset.caseId = i.case_id;
      li.append(el("strong", "", i.code), " " + when(i.created_at) + " · " +
        (DECISIONS[i.local.advice.decision] || i.local.advice.decision) + " on the phone · " +
        (i.photo ? "the photo will be sent (consented)" : "the photo stays on the phone") +
        (i.refused ? " · refused by the server: " + i.refused : ""));
      li.append(button("Delete", "Delete queued case " + i.code, () => remove(i.case_id)));
      return li;
    }));
    $("history-summary").textContent = "Case history (" + history.length + ")";
    const hl = $("history-list");
    hl.replaceChildren(...history.map((h) => {
      const li = el("li");
      li.dataset.caseId = h.case_id;
      li.dataset.status = h.status;
      const by = h.status === "answered" ? (h.queued ? "answered by the server after the" +
        " network came back" : "answered by the server") : h.status === "waiting"
        ? "answered on the phone, waiting to be sent" : h.status === "refused"
          ? "refused by the server: " + h.refused : "answered on the phone, deleted unsent";
      li.append(el("strong", "", h.code), " " + when(h.created_at) + " · " +
        (DECISIONS[h.answer.decision] || h.answer.decision) + " · " + by);
      li.append(el("span", "meta why", h.answer.message));
      li.append(button("Delete", "Delete case " + h.code + " from the history",
        () => forget(h.case_id)));
      return li;
    }));
  }).catch(() => {});
  return rendering;
}

window.dermedgeCases = { enqueue, record, sync, remove, forget, render,
  queue: () => all("queue"), history: () => all("history") };
window.addEventListener("online", () => sync("online"));
render();
window.dermedgeCases.ready = sync("load");
