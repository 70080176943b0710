"""The installable page that works offline: web app manifest, service worker, cache version.

After one online visit in a secure context (HTTPS, or localhost), the service worker
(``templates/sw.js``, served at ``/sw.js`` so that its scope is the whole page) keeps the
page, its scripts and icons, the policy document, the device model and the one LiteRT.js
build this browser runs in one cache. The cache is named after what decides an answer: the
model's sha256, ``Policy.sha256``, the runtime version and a digest of the page's own files;
a new bundle, policy, runtime or page gives a new name, so the next online visit replaces the
old copy. Over plain HTTP at a LAN address there is no service worker and the page needs the
network, as before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .browser import model_url, runtime_status

PACKAGE = Path(__file__).parent
# The header naming the cache version a page or policy response belongs to: the service
# worker stores a fresh copy only when it is its own version (a newer server's page waits
# for the newer worker, which caches it together with its model).
VERSION_HEADER = "X-Dermedge-Offline"
# LiteRT.js builds (static/runtime.js picks one per browser) -> their .js/.wasm stem
BUILDS = {"threaded": "litert_wasm_threaded_internal", "single": "litert_wasm_internal",
          "compat": "litert_wasm_compat_internal"}
RUNTIME_COMMON = ("core/dist/index.js", "wasm-utils/dist/index.js")
# The page's own files the cache keeps (every file under static/ with these endings).
SHELL_SUFFIXES = (".js", ".css", ".png", ".json")
MANIFEST_TYPE = "application/manifest+json"


def page_digest(root: Path = PACKAGE) -> str:
    """sha256 over the page's files (static/ and templates/): a changed page, a new cache."""
    h = hashlib.sha256()
    for folder in ("static", "templates"):
        for p in sorted((root / folder).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(root).as_posix().encode() + b"\0")
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def static_files(root: Path = PACKAGE) -> list[str]:
    """The static files the service worker keeps, as url_for('static') file names."""
    folder = root / "static"
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix in SHELL_SUFFIXES)


def cache_version(service, config: dict[str, Any], digest: str) -> str:
    status = runtime_status(config)
    runtime = status["version"] if status["enabled"] else "server"
    return (f"dermedge-m{service.device.sha256[:12]}-p{service.policy.sha256[:12]}"
            f"-litert{runtime}-page{digest[:10]}")


def offline_config(service, config: dict[str, Any], url_for, base: str,
                   digest: str) -> dict[str, Any]:
    """What the service worker caches: the page shell, and the runtime files per build (it
    keeps only the build named in its URL, ``sw.js?build=...``, the one this browser loads)."""
    status = runtime_status(config)
    page, policy = base, base + "api/v1/policy"
    shell = [page, url_for("page.manifest"), policy,
             *(url_for("static", filename=f) for f in static_files())]
    builds: dict[str, list[str]] = {}
    if status["enabled"]:
        shell.append(model_url(base, service.device.sha256))
        for build, stem in BUILDS.items():
            builds[build] = [url_for("page.runtime", name=n) for n in (
                *RUNTIME_COMMON, f"core/wasm/{stem}.js", f"core/wasm/{stem}.wasm")]
    return {"version": cache_version(service, config, digest), "page": page,
            "network_first": [page, policy], "shell": shell, "builds": builds}


def manifest(url_for, base: str) -> dict[str, Any]:
    """The web app manifest: installable from the browser's menu, opens full screen."""
    icons = [("icon-192.png", "192x192", "any"), ("icon-512.png", "512x512", "any"),
             ("icon-maskable-512.png", "512x512", "maskable")]
    return {"name": "dermedge lesion check (research demo)", "short_name": "dermedge",
            "description": "Phone-to-cloud skin-lesion classifier demo; research tool, not a"
                           " diagnosis.",
            "start_url": base, "scope": base, "display": "standalone",
            "background_color": "#f6f7f9", "theme_color": "#0b6bcb",
            "icons": [{"src": url_for("static", filename=f"icons/{name}"), "sizes": sizes,
                       "type": "image/png", "purpose": purpose}
                      for name, sizes, purpose in icons]}
