// dermedge's service worker (edge_demo/offline.py): keeps the page, its scripts, the policy
// document, the device model and the one LiteRT.js build this browser loads (named in this
// script's URL: sw.js?build=threaded|single|compat) in one cache named after the model's
// sha256, the policy's sha256, the runtime version and the page's files. The page and the
// policy come from the network when it answers (else from the cache); everything else from
// the cache. Photos and answers (POST) are never cached here: the page queues them itself.
"use strict";
const OFFLINE = {{ offline|tojson }};
const BUILD = new URL(self.location.href).searchParams.get("build") || "single";
const CACHE = OFFLINE.version + "-" + BUILD;
const abs = (u) => new URL(u, self.location.origin).href;
const KEEP = OFFLINE.shell.concat(OFFLINE.builds[BUILD] || []).map(abs);
const KEPT = new Set(KEEP);
// a kept file asked for without its version (a module's relative import of a versioned
// script): this cache's copy, which belongs to the same page
const BY_PATH = new Map(KEEP.map((u) => [new URL(u).pathname, u]));
const NETWORK_FIRST = new Set(OFFLINE.network_first.map(abs));
const PAGE = abs(OFFLINE.page);
const NETWORK_TIMEOUT_MS = 4000;  // a slow network: answer from the cache after this
const VERSION_HEADER = "{{ version_header }}";

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    // all or nothing; "no-cache": revalidated with the server, so a file the page has just
    // downloaded comes from the HTTP cache (a 304), and a changed one is downloaded
    await cache.addAll(KEEP.map((u) => new Request(u, { cache: "no-cache" })));
    await self.skipWaiting();
  })().catch(async (err) => {
    await caches.delete(CACHE);
    throw err;
  }));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    const names = await caches.keys();
    await Promise.all(names.filter((n) => n.startsWith("dermedge-") && n !== CACHE)
      .map((n) => caches.delete(n)));
    await self.clients.claim();
  })());
});

self.addEventListener("message", (event) => {
  if (event.data && event.data.type === "version" && event.ports[0]) {
    event.ports[0].postMessage({ cache: CACHE, build: BUILD, files: KEEP.length });
  }
});

function withTimeout(promise, ms) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("network timeout")), ms);
    promise.then((r) => { clearTimeout(t); resolve(r); }, (e) => { clearTimeout(t); reject(e); });
  });
}

async function networkFirst(request, key) {
  const cache = await caches.open(CACHE);
  try {
    const response = await withTimeout(fetch(request), NETWORK_TIMEOUT_MS);
    // keep it only if it belongs to this worker's version (a newer server's page is kept
    // by the newer worker, together with its model)
    if (response.ok && response.headers.get(VERSION_HEADER) === OFFLINE.version) {
      await cache.put(key, response.clone());
    }
    return response;
  } catch (err) {
    const cached = await cache.match(key);
    if (cached) return cached;
    throw err;
  }
}

async function cacheFirst(request, key) {
  const cached = await caches.match(key, { cacheName: CACHE });
  return cached || fetch(request);
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  url.hash = "";
  if (url.origin !== self.location.origin) return;
  if (request.mode === "navigate") {
    if (url.origin + url.pathname !== PAGE) return;  // other pages (e.g. /cases): network
    event.respondWith(networkFirst(request, PAGE));
  } else if (NETWORK_FIRST.has(url.href)) {
    event.respondWith(networkFirst(request, url.href));
  } else if (KEPT.has(url.href)) {
    event.respondWith(cacheFirst(request, url.href));
  } else if (!url.search && BY_PATH.has(url.pathname)) {
    event.respondWith(cacheFirst(request, BY_PATH.get(url.pathname)));
  }
});
