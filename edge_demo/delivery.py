"""How the page and its files reach a phone: cross-origin isolation headers, versioned and
compressed static files (``assets.AssetStore``), the version identities the page caches by,
and the plain-HTTP trust page with the local CA's certificate."""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
from pathlib import Path

from flask import Blueprint, current_app, jsonify, render_template, request
from werkzeug.security import safe_join

from . import browser
from .assets import REVALIDATE, AssetStore
from .errors import RequestError

bp = Blueprint("delivery", __name__)

# Every response: the page is cross-origin isolated (SharedArrayBuffer, hence LiteRT.js'
# threaded build) once it is in a secure context; every resource it loads is same-origin.
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin",
             "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".webmanifest": "application/manifest+json",
         ".css": "text/css", ".svg": "image/svg+xml", ".png": "image/png",
         ".html": "text/html", ".tflite": "application/octet-stream"}
CA_MIME = "application/x-x509-ca-cert"  # what Android's and iOS' certificate installers open
# small dynamic GET answers the page loads on every visit: gzipped and given an ETag
DYNAMIC = frozenset({"page.index", "api.policy", "delivery.version", "delivery.trust"})


def init_app(app, state_dir: Path) -> None:
    """Wire the asset store, the static route, versioned URLs and the headers into ``app``."""
    store = AssetStore(state_dir / "compressed", app.config["COMPRESS"])
    app.extensions["edge_demo"]["assets"] = store
    app.view_functions["static"] = static_file
    app.url_defaults(_versioned_urls)
    app.after_request(_headers)
    app.register_blueprint(bp)


def assets() -> AssetStore:
    return current_app.extensions["edge_demo"]["assets"]


def mimetype(name: str) -> str:
    ext = Path(name).suffix.lower()
    return TYPES.get(ext) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def static_file(filename: str):
    """``/static/<file>``: content-hash ETag, compressed copies, a year of caching at ``?v=``."""
    path = safe_join(current_app.static_folder, filename)
    if path is None or not Path(path).is_file():
        raise RequestError(f"No static file {filename!r}.", status=404, code="not_found")
    asset = assets().file(path, mimetype(filename))
    return assets().respond(request, asset, request.args.get("v"))


def _versioned_urls(endpoint: str, values: dict) -> None:
    """``url_for`` gives versioned URLs: ``/static/app.js?v=<sha>``, ``/runtime/<id>/...``."""
    if endpoint == "static" and "v" not in values and values.get("filename"):
        path = safe_join(current_app.static_folder, values["filename"])
        if path is not None and Path(path).is_file():
            values["v"] = assets().file(path, mimetype(path)).version
    elif endpoint == "page.runtime" and values.get("name"):
        rid = browser.runtime_id(current_app.config, assets())
        if rid is not None and not values["name"].startswith(rid + "/"):
            values["name"] = f"{rid}/{values['name']}"


def _headers(resp):
    for name, value in ISOLATION.items():
        resp.headers.setdefault(name, value)
    if (request.method == "GET" and request.endpoint in DYNAMIC and resp.status_code == 200
            and not resp.direct_passthrough):
        _conditional_gzip(resp)
    return resp


def _conditional_gzip(resp) -> None:
    """An ETag from the body, 304 when the client has it, gzip when it is worth it."""
    body = resp.get_data()
    resp.headers["Cache-Control"] = REVALIDATE
    resp.headers["Vary"] = "Accept-Encoding"
    tag = hashlib.sha256(body).hexdigest()[:32]
    wants_gzip = len(body) >= 1024 and request.accept_encodings.quality("gzip") > 0
    resp.set_etag(tag + ("-gz" if wants_gzip else ""))
    if request.if_none_match.contains(tag) or request.if_none_match.contains(tag + "-gz"):
        resp.status_code = 304
        resp.set_data(b"")
        return
    if wants_gzip:
        resp.set_data(gzip.compress(body, compresslevel=6, mtime=0))
        resp.headers["Content-Encoding"] = "gzip"


def precompress(app) -> tuple[AssetStore, int]:
    """Queue the page's files for compression, smallest first (the model and the runtime's
    WebAssembly take longest); returns the store and how many files were queued."""
    store: AssetStore = app.extensions["edge_demo"]["assets"]
    svc = app.extensions["edge_demo"]["service"]
    items = [store.file(p, mimetype(p.name)) for p in sorted(Path(app.static_folder).rglob("*"))
             if p.is_file()]
    if browser.runtime_status(app.config)["enabled"]:
        root = browser.runtime_root(app.config)
        items += [store.file(root / n, mimetype(n)) for n in sorted(browser.RUNTIME_FILES)]
    items.append(store.blob(svc.device._model_bytes, svc.device.sha256,
                            "application/octet-stream"))
    # the threaded build first among the big ones: a cross-origin isolated page loads it
    items.sort(key=lambda a: (a.size > 1 << 20, "threaded" not in str(a.path), a.size))
    return store, store.compress_soon(items)


def version_body(service, config) -> dict:
    """What the page versions its cache by: the model, the policy and the runtime."""
    runtime = browser.runtime_status(config)
    rid = browser.runtime_id(config, assets()) if runtime["enabled"] else None
    model, policy = service.device.sha256, service.policy.sha256
    key = hashlib.sha256(f"{model}:{policy}:{rid}".encode()).hexdigest()[:16]
    return {"model_sha256": model, "policy_sha256": policy,
            "runtime": {"version": runtime["version"], "id": rid,
                        "enabled": runtime["enabled"]},
            "cache_key": key, "tls": config["TLS_MODE"]}


@bp.get("/api/v1/version")
def version():
    return jsonify(version_body(current_app.extensions["edge_demo"]["service"],
                                current_app.config))


def _ca_cert() -> Path | None:
    path = current_app.config.get("TLS_CA_CERT")
    return Path(path) if path and current_app.config["TLS_MODE"] == "local-ca" else None


@bp.get("/trust")
def trust():
    """How to trust this server's CA on Android and iOS, and what HTTPS adds."""
    from .certs import common_name, fingerprint

    ca = _ca_cert()
    return render_template("trust.html", mode=current_app.config["TLS_MODE"],
                           ca_name=common_name(ca) if ca else None,
                           ca_fingerprint=fingerprint(ca) if ca else None,
                           https_url=f"https://{request.host}/", secure=request.is_secure)


@bp.get("/ca.crt")
def ca_certificate():
    """The local CA's certificate (DER), for a phone to install and trust."""
    from .certs import der

    ca = _ca_cert()
    if ca is None:
        why = ("it uses its operator's own certificate (--tls-cert)"
               if current_app.config["TLS_MODE"] == "own" else
               "it does not serve HTTPS (start it with --tls on)")
        raise RequestError(f"This server has no CA certificate to offer: {why}.", status=404,
                           code="no_local_ca")
    resp = current_app.response_class(der(ca), mimetype=CA_MIME)
    resp.headers["Content-Disposition"] = 'attachment; filename="dermedge-demo-ca.crt"'
    resp.headers["Cache-Control"] = REVALIDATE
    return resp
