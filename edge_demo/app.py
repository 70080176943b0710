"""The Flask app factory: ``create_app(config)`` loads the models once and wires blueprints.

Config keys (defaults < ``EDGE_DEMO_<KEY>`` environment variables < the ``config`` argument):

``DEVICE_BUNDLE``     required; the on-device export bundle folder
``CLOUD_BUNDLE``      optional; the cloud export bundle folder
``POLICY_FILE``       optional; written by ``edge-demo calibrate`` (else conservative defaults)
``MAX_CONTENT_LENGTH`` request size limit in bytes (default 10 MB; larger -> 413 JSON)
``MAX_PIXELS``        declared image size limit, checked before decoding (default 50 MP, a
                      phone's full-resolution photo -> 413)
``MAX_DECODED_PIXELS`` pixels decoded into memory after reduced-scale JPEG decoding (default
                      16 MP; PNG/WebP are decoded at full size -> 413 above it)
``DECODE_BUDGET``     pixels being decoded at once across threads (default 16 MP; bounds memory)
``FAST_DECODE``       decode JPEGs at reduced DCT scale for the model size (default on; off:
                      `edge-demo serve --reference-decode`, the full decode training uses)
``DECODE_MIN_CROP``   the crop reduced-scale decoding keeps where it can, in model sides
                      (default 2; a photo too small for it keeps >= 1, not a full decode)
``ALLOW_UNVALIDATED`` serve bundles whose card says the export validation failed (default off)
``CASES_DIR``         default None: no case log (each case id is still answered once, from a
                      bounded memory table). A folder: the site's SQLite case log, one row per
                      decision (edge_demo/caselog.py); ``/cases`` and its API need the token.
``KEEP_PHOTOS``       default off: with a case log, keep a case's photo (beside the database,
                      under its sha256) when the case says ``consent_keep``; never otherwise
``SITE_ID``, ``TESTER_ID`` the case log's site and tester when the page sends none
``CASES_TOKEN``       the token for ``/cases`` and its API (default: a new random one per start)
``RECENT_CASES``      case ids remembered without a case log (default 2,000)
``INTERPRETERS``      LiteRT interpreters per tier (default 4: one per server thread)
``LOG_JSON``          one JSON line per request on the ``edge_demo.request`` logger (default on)
``EXPLAIN_RUN``       optional; a ``trainer fit`` run directory: enables Grad-CAM heatmaps
                      (``?explain=1``) on its float ``model.keras``; needs TensorFlow + Keras
``BROWSER_INFERENCE`` default on: the page runs the device model in the browser (LiteRT.js)
                      and uploads the photo only on fallback; off: the server runs it
``WEB_RUNTIME_DIR``   default ``edge_demo/web/node_modules``: where ``npm ci`` put LiteRT.js
``STATE_DIR``         the server's own files (local CA, certificates, compressed copies of the
                      static files); default ``~/.local/share/dermedge/edge-demo``
``COMPRESS``          effort for the compressed copies, made once per file content: ``best``
                      (default; brotli 11 + gzip 9), ``fast`` (brotli 5 + gzip 6) or ``off``
``TLS_MODE``          set by ``edge-demo serve``: ``off``, ``local-ca`` or ``own``; the trust
                      page and ``/ca.crt`` follow it
``TLS_CA_CERT``       set by ``edge-demo serve``: the local CA's certificate (PEM) it offers
``GATE``              default on: the input gate refuses blurry, badly lit, too small and
                      non-dermoscopy photos (``retake``); off (``--no-gate``) for research only
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Request,
    current_app,
    g,
    jsonify,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException

from . import browser, delivery, offline
from .caseid import is_case_id, new_case_id
from .caselog import CaseFields, CaseLog, RecentCases
from .cases_api import case_pages
from .errors import EdgeDemoError, RequestError
from .explain import NOT_ENABLED, explain_head
from .gate import parse_page_gate
from .imaging import DEFAULT_MAX_DECODED_PIXELS, DEFAULT_MAX_PIXELS
from .metadata import FIELDS as METADATA_FIELDS
from .metadata import choices as site_choices
from .metadata import parse as parse_metadata
from .server import too_large_message
from .service import DEFAULT_DECODE_BUDGET, DEFAULT_DECODE_MIN_CROP, DemoService

DEFAULT_CONFIG: dict[str, Any] = {
    "DEVICE_BUNDLE": None,
    "CLOUD_BUNDLE": None,
    "POLICY_FILE": None,
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,
    "MAX_PIXELS": DEFAULT_MAX_PIXELS,
    "MAX_DECODED_PIXELS": DEFAULT_MAX_DECODED_PIXELS,
    "DECODE_BUDGET": DEFAULT_DECODE_BUDGET,
    "FAST_DECODE": True,
    "DECODE_MIN_CROP": DEFAULT_DECODE_MIN_CROP,
    "ALLOW_UNVALIDATED": False,
    "CASES_DIR": None,
    "KEEP_PHOTOS": False,
    "SITE_ID": None,
    "TESTER_ID": None,
    "CASES_TOKEN": None,
    "RECENT_CASES": 2_000,
    "INTERPRETERS": 4,
    "LOG_JSON": True,
    "EXPLAIN_RUN": None,
    "BROWSER_INFERENCE": True,
    "WEB_RUNTIME_DIR": None,
    "STATE_DIR": None,
    "COMPRESS": "best",
    "TLS_MODE": "off",
    "TLS_CA_CERT": None,
    "GATE": True,
}
_INT_KEYS = ("MAX_CONTENT_LENGTH", "MAX_PIXELS", "MAX_DECODED_PIXELS", "DECODE_BUDGET",
             "INTERPRETERS", "RECENT_CASES")
_BOOL_KEYS = ("LOG_JSON", "FAST_DECODE", "ALLOW_UNVALIDATED", "BROWSER_INFERENCE",
              "KEEP_PHOTOS", "GATE")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

request_log = logging.getLogger("edge_demo.request")
api = Blueprint("api", __name__, url_prefix="/api/v1")
page = Blueprint("page", __name__)


def env_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``EDGE_DEMO_<KEY>`` variables for the keys of ``DEFAULT_CONFIG``."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key in DEFAULT_CONFIG:
        raw = environ.get(f"EDGE_DEMO_{key}")
        if raw is None or raw == "":
            continue
        if key in _INT_KEYS:
            try:
                out[key] = int(raw)
            except ValueError as exc:
                raise EdgeDemoError(f"EDGE_DEMO_{key} must be an integer; received {raw!r}."
                                    ) from exc
        elif key == "DECODE_MIN_CROP":
            try:
                out[key] = float(raw)
            except ValueError as exc:
                raise EdgeDemoError(f"EDGE_DEMO_{key} must be a number; received {raw!r}."
                                    ) from exc
        elif key in _BOOL_KEYS:
            out[key] = raw.strip().lower() not in ("0", "false", "no", "off")
        else:
            out[key] = raw
    return out


class InMemoryRequest(Request):
    """Keeps uploaded files in memory (bounded by MAX_CONTENT_LENGTH): Werkzeug would spool
    uploads over 500 kB to a temporary file, and nothing uploaded may touch the disk."""

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        return io.BytesIO()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app; raises ``EdgeDemoError`` (clear message) when a model cannot load."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULT_CONFIG)
    app.config.update(env_config())
    if config:
        app.config.update(config)
    for key in _INT_KEYS:
        v = app.config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise EdgeDemoError(f"Config {key} must be a positive integer; received {v!r}.")
    service = DemoService.from_paths(
        app.config["DEVICE_BUNDLE"], app.config["CLOUD_BUNDLE"], app.config["POLICY_FILE"],
        max_pixels=app.config["MAX_PIXELS"],
        max_decoded_pixels=app.config["MAX_DECODED_PIXELS"],
        decode_budget=app.config["DECODE_BUDGET"], pool_size=app.config["INTERPRETERS"],
        allow_unvalidated=bool(app.config["ALLOW_UNVALIDATED"]),
        fast_decode=bool(app.config["FAST_DECODE"]),
        decode_min_crop=float(app.config["DECODE_MIN_CROP"]), gate=bool(app.config["GATE"]))
    if app.config["KEEP_PHOTOS"] and not app.config["CASES_DIR"]:
        raise EdgeDemoError("--keep-photos needs a case log to keep them in: add --cases DIR.")
    cases = (CaseLog(app.config["CASES_DIR"], keep_photos=bool(app.config["KEEP_PHOTOS"]))
             if app.config["CASES_DIR"] else RecentCases(app.config["RECENT_CASES"]))
    explainer = None
    if app.config["EXPLAIN_RUN"]:  # imports TensorFlow only when enabled
        from .explain import Explainer

        explainer = Explainer(app.config["EXPLAIN_RUN"])
    service.warm_up()
    if explainer is not None:
        explainer.warm_up()
    app.extensions["edge_demo"] = {
        "service": service, "explainer": explainer, "cases": cases,
        "cases_token": app.config["CASES_TOKEN"] or secrets.token_urlsafe(24)}
    if app.config["LOG_JSON"] and not request_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
        request_log.setLevel(logging.INFO)
        request_log.propagate = False

    from .certs import default_state_dir

    delivery.init_app(app, Path(app.config["STATE_DIR"] or default_state_dir()))
    app.register_blueprint(api)
    app.register_blueprint(page)
    app.register_blueprint(case_pages)
    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/readyz", "readyz", readyz)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.register_error_handler(RequestError, _request_error)
    app.register_error_handler(EdgeDemoError, _demo_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    return app


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which servers and test runners may swap)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _service() -> DemoService:
    return current_app.extensions["edge_demo"]["service"]


def error_body(status: int, code: str, message: str):
    resp = jsonify({"error": {"code": code, "message": message,
                              "request_id": g.get("request_id")}})
    resp.status_code = status
    return resp


# --- request lifecycle and logs ---------------------------------------------------------
def _start_request() -> None:
    g.t0 = time.perf_counter()
    rid = request.headers.get("X-Request-ID", "")
    g.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
    g.tier_path = None


def _finish_request(resp):
    resp.headers["X-Request-ID"] = g.get("request_id", "")
    if current_app.config["LOG_JSON"]:
        record = {"ts": round(time.time(), 3), "event": "request", "method": request.method,
                  "path": request.path,
                  "status": resp.status_code,
                  "ms": round((time.perf_counter() - g.get("t0", time.perf_counter())) * 1000,
                              3),
                  "request_id": g.get("request_id"), "tier_path": g.get("tier_path"),
                  "error": g.get("error_code")}
        if g.get("case_id"):  # an id, never the case's photo, patient fields or label
            record["case_id"] = g.case_id
            record["duplicate"] = bool(g.get("duplicate"))
        request_log.info(json.dumps(record))
    return resp


def _request_error(exc: RequestError):
    g.error_code = exc.code
    return error_body(exc.status, exc.code, str(exc))


def _demo_error(exc: EdgeDemoError):
    g.error_code = "bad_request"
    return error_body(400, "bad_request", str(exc))


_HTTP_MESSAGES = {
    404: "No such endpoint. See GET /api/v1/models, POST /api/v1/classify, GET /healthz.",
    405: "Method not allowed for this endpoint (classify endpoints take POST with the photo as"
         " the body or in the multipart field 'image').",
}


def _http_error(exc: HTTPException):
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    if status == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if (request.content_length or 0) > limit:
            message = too_large_message(limit)
        else:  # under the body limit: one of the form parser's own limits was hit
            message = (
                f"The form is too large for the form parser: a text field over"
                f" {request.max_form_memory_size:,} bytes or more than"
                f" {request.max_form_parts:,} fields. Send the photo in the field 'image' and"
                " only the small fields age, sex and site.")
            code = "form_too_large"
    else:
        message = _HTTP_MESSAGES.get(status, exc.description or exc.name)
    g.error_code = code
    resp = error_body(status, code, message)
    if status == 405 and exc.valid_methods:
        resp.headers["Allow"] = ", ".join(exc.valid_methods)
    return resp


def _internal_error(exc: Exception):
    logging.getLogger("edge_demo").exception("unhandled error (request_id=%s)",
                                             g.get("request_id"))
    g.error_code = "internal_error"
    return error_body(500, "internal_error", "Internal error while classifying the image;"
                      f" it is logged with request_id {g.get('request_id')}.")


# --- endpoints ------------------------------------------------------------------------
def healthz():
    return jsonify({"status": "ok"})


def readyz():
    """200 with the loaded tiers: an app exists only once its models are loaded and warmed up
    (create_app does both before it returns; `edge-demo serve` answers only after that)."""
    svc = _service()
    return jsonify({"status": "ready", "device": svc.device.name,
                    "cloud": svc.cloud.name if svc.cloud else None})


def _is_raw(mimetype: str) -> bool:
    """The photo is the whole body: what ``fetch(url, {body: file})``, OkHttp's
    ``RequestBody`` and ``curl --data-binary`` send (the server sniffs the bytes either way)."""
    return mimetype.startswith("image/") or mimetype == "application/octet-stream"


_UPLOAD_FORMS = ("the photo as the body (Content-Type image/jpeg, image/png, image/webp or"
                 " application/octet-stream) or multipart/form-data with the photo in the"
                 " field 'image'")


def _metadata() -> dict[str, Any] | None:
    """Patient fields from the query string, or from multipart form fields; a field given in
    both is a 400 (which one would be meant?)."""
    args = request.args
    if request.mimetype != "multipart/form-data":
        return parse_metadata(args)
    form = request.form
    both = [k for k in METADATA_FIELDS if args.get(k, "").strip() and form.get(k, "").strip()]
    if both:
        raise RequestError(f"The field {both[0]!r} is both in the query string and in the form;"
                           " send it once.", code="bad_metadata")
    return parse_metadata({k: form.get(k) or args.get(k) for k in METADATA_FIELDS})


def _upload_bytes() -> bytes:
    ctype = request.mimetype or ""
    if _is_raw(ctype):
        data = request.get_data(cache=False)  # MAX_CONTENT_LENGTH applies (413)
        if not data:
            raise RequestError(f"The request body is empty. Send {_UPLOAD_FORMS}.", status=400,
                               code="empty_body")
        return data
    if ctype != "multipart/form-data":
        if not request.content_length and not ctype:
            raise RequestError(f"The request body is empty. Send {_UPLOAD_FORMS}.",
                               status=400, code="empty_body")
        raise RequestError(f"Expected {_UPLOAD_FORMS}; received Content-Type"
                           f" {ctype or 'none'!r}.", status=415,
                           code="unsupported_media_type")
    f = request.files.get("image")
    if f is None:
        fields = sorted(set(request.files) | set(request.form))
        raise RequestError(f"No file in the multipart field 'image' (received fields {fields})."
                           " Send the photo as image=@photo.jpg, or as the whole body.",
                           status=400, code="missing_image")
    return f.read()


def _explain_head() -> str | None:
    """``?explain=`` checked before any work: 400 when malformed, 501 when not enabled."""
    head = explain_head(request.args.get("explain"))
    if head is not None and current_app.extensions["edge_demo"]["explainer"] is None:
        raise RequestError(NOT_ENABLED, status=501, code="explain_not_enabled")
    return head


def _add_explanation(body: dict[str, Any], data: bytes, head: str, answer: dict) -> None:
    """Grad-CAM for the class of the final ``answer`` (cloud when used, else device)."""
    t0 = time.perf_counter()
    explainer = current_app.extensions["edge_demo"]["explainer"]
    image = _service().decode_image(data)  # full scale: the heatmap overlays the upload
    body["explanation"] = explainer.explain(image, head, answer["top"]["label"])
    body["timings_ms"]["explain"] = round((time.perf_counter() - t0) * 1000.0, 3)


# --- cases: the page's case fields, each case id answered once, the case log ------------
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PERSON_ID = re.compile(r"^[\w .@+-]{1,64}$")
_YES, _NO = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "")
_CLIENT_TEXT = {"user_agent": 300, "runtime": 60, "build": 20, "created_at": 40}


def _cases():
    return current_app.extensions["edge_demo"]["cases"]


def _case_field(name: str) -> str | None:
    """A case field from the multipart form (``/decide``) or the query string."""
    form = request.form if request.mimetype == "multipart/form-data" else {}
    value = form.get(name)
    if value is None:
        value = request.args.get(name)
    return value


def _bad_case(message: str) -> RequestError:
    return RequestError(message, code="bad_case")


def _json_field(name: str, limit: int) -> dict[str, Any] | None:
    raw = _case_field(name)
    if raw is None or raw == "":
        return None
    try:
        doc = json.loads(raw) if len(raw) <= limit else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise _bad_case(f"The field {name!r} must be a JSON object of at most {limit:,}"
                        f" characters; received {raw[:40]!r}.")
    return doc


def _client_field() -> dict[str, Any]:
    """The phone's ``client`` JSON: known keys only, each checked (others are dropped)."""
    doc = _json_field("client", 2000) or {}
    out: dict[str, Any] = {}
    for key, limit in _CLIENT_TEXT.items():
        v = doc.get(key)
        if v is not None:
            if not isinstance(v, str) or len(v) > limit:
                raise _bad_case(f"client.{key} must be text of at most {limit} characters.")
            out[key] = v
    if doc.get("threads") is not None:
        t = doc["threads"]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 1024:
            raise _bad_case(f"client.threads must be a whole number; received {t!r}.")
        out["threads"] = t
    if doc.get("queued") is not None:
        if not isinstance(doc["queued"], bool):
            raise _bad_case("client.queued must be true or false.")
        out["queued"] = doc["queued"]
    return out


def _consent(name: str) -> bool | None:
    raw = _case_field(name)
    if raw is None:
        return None
    v = raw.strip().lower()
    if v not in _YES + _NO:
        raise _bad_case(f"The field {name!r} must be 1 (consent given) or 0; received"
                        f" {raw[:20]!r}.")
    return v in _YES


def _case_fields() -> CaseFields:
    """The request's case (HELPERS contract: case_id, consent_upload, consent_keep,
    tester_id, site_id, client, model_sha256, policy_sha256, gate); a server-made case id
    when the client sends none. Bad fields are a 400 ``bad_case`` naming the field."""
    cfg = current_app.config
    raw_id = (_case_field("case_id") or "").strip().lower()
    if raw_id and not is_case_id(raw_id):
        raise _bad_case("The field 'case_id' must be a UUID version 4 in lower case (what"
                        f" static/caseid.js makes); received {raw_id[:40]!r}.")
    people = {}
    for name, default in (("site_id", cfg["SITE_ID"]), ("tester_id", cfg["TESTER_ID"])):
        v = (_case_field(name) or "").strip() or default
        if v is not None and not _PERSON_ID.match(v):
            raise _bad_case(f"The field {name!r} must be 1 to 64 letters, digits, spaces or"
                            f" . _ @ + -; received {v[:40]!r}.")
        people[name] = v
    shas = {}
    for name in ("model_sha256", "policy_sha256"):
        v = (_case_field(name) or "").strip().lower() or None
        if v is not None and not _SHA256.match(v):
            raise _bad_case(f"The field {name!r} must be a sha256 in hex (64 characters);"
                            f" received {v[:40]!r}.")
        shas[name] = v
    case = CaseFields(
        id=raw_id or new_case_id(), server_made=not raw_id, **people,
        consent_upload=_consent("consent_upload"), consent_keep=_consent("consent_keep"),
        client=_client_field(), **shas, gate=_json_field("gate", 8000))
    g.case_id = case.id
    return case


def _duplicate(first: dict[str, Any], case: CaseFields):
    """The first response to this case id, marked as a repeat (nothing runs, nothing logs)."""
    g.duplicate = True
    g.tier_path = first.get("tier_path")
    body = {**first, "request_id": g.request_id,
            "case": case.section(logged=_cases().logged, duplicate=True)}
    return jsonify(body)


def _log_case(case: CaseFields, body: dict[str, Any], *, endpoint: str, raw: dict,
              photo: bytes | None, meta: dict[str, Any] | None) -> None:
    """Add the ``case`` section and log the decision; a failed write is reported in the
    answer (``logged: false``), never a failed request."""
    store = _cases()
    body["case"] = case.section(logged=store.logged, duplicate=False)
    stored = {k: v for k, v in body.items() if k != "explanation"}
    try:
        added = store.add(case, stored, endpoint=endpoint, raw=raw, photo=photo, patient=meta)
        if store.logged and not added:  # a row with this id was written meanwhile
            body["case"] = {**body["case"], "logged": False,
                            "error": "a case with this id is already in the case log"}
    except Exception as exc:  # noqa: BLE001 - the tester still gets the answer
        logging.getLogger("edge_demo").exception("could not log case %s", case.id)
        body["case"] = {**body["case"], "logged": False,
                        "error": f"the case log could not be written ({type(exc).__name__})"}


@api.post("/classify")
def classify():
    head = _explain_head()
    meta = _metadata()  # checked before the upload is read
    case = _case_fields()
    store = _cases()
    with store.claims.hold(case.id):
        first = store.first_response(case.id)
        if first is not None:
            return _duplicate(first, case)
        data = _upload_bytes()
        raw: dict[str, Any] = {}
        body = _service().classify(data, meta, raw=raw)
        if head is not None and body["device"] is not None:  # no heatmap for a refused photo
            _add_explanation(body, data, head, body["cloud"] or body["device"])
        g.tier_path = body["tier_path"]
        body["request_id"] = g.request_id
        _log_case(case, body, endpoint="classify", raw=raw, photo=data, meta=meta)
    return jsonify(body)


@api.post("/cloud/classify")
def cloud_classify():
    svc = _service()
    if svc.cloud is None:
        raise RequestError("No cloud tier is loaded on this server (start it with --cloud).",
                           status=404, code="no_cloud_tier")
    head = _explain_head()
    meta = _metadata()
    data = _upload_bytes()
    body = svc.classify_cloud(data, meta)
    if head is not None:
        _add_explanation(body, data, head, body["cloud"])
    g.tier_path = "cloud"
    body["request_id"] = g.request_id
    return jsonify(body)


@api.get("/models")
def models():
    explainer = current_app.extensions["edge_demo"]["explainer"]
    return jsonify({**_service().models(),
                    "explain": explainer.summary() if explainer is not None else None})


@page.get("/")
def index():
    svc = _service()
    sites = sorted(set(site_choices(svc.device.card)) |
                   set(site_choices(svc.cloud.card) if svc.cloud else ()))
    base = request.script_root + "/"
    cfg = browser.browser_config(svc, current_app.config, base,
                                 delivery.version_body(svc, current_app.config))
    cfg["offline"] = {"version": _offline_version(), "worker": url_for("page.service_worker")}
    cfg["cases"] = _case_settings()
    resp = current_app.make_response(render_template(
        "index.html", service=svc, sites=sites, defaults=svc.policy.source == "defaults",
        explainer=current_app.extensions["edge_demo"]["explainer"], browser=cfg,
        synthetic=_synthetic(svc)))
    resp.headers[offline.VERSION_HEADER] = cfg["offline"]["version"]
    return resp


# --- the installable, offline page (edge_demo/offline.py) -----------------------------
def _page_digest() -> str:
    state = current_app.extensions["edge_demo"]
    if "page_digest" not in state:  # the page's files do not change while serving
        state["page_digest"] = offline.page_digest()
    return state["page_digest"]


def _offline_version() -> str:
    return offline.cache_version(_service(), current_app.config, _page_digest())


@page.get("/sw.js")
def service_worker():
    """The service worker, at the root so that its scope is the whole page."""
    cfg = offline.offline_config(_service(), current_app.config, url_for,
                                 request.script_root + "/", _page_digest())
    resp = current_app.response_class(
        render_template("sw.js", offline=cfg, version_header=offline.VERSION_HEADER),
        mimetype="text/javascript")
    resp.headers["Cache-Control"] = "no-cache"  # a new bundle must reach the next visit
    return resp


@page.get("/manifest.webmanifest")
def manifest():
    resp = jsonify(offline.manifest(url_for, request.script_root + "/"))
    resp.mimetype = offline.MANIFEST_TYPE
    return resp


def _case_settings() -> dict[str, Any]:
    """What the page needs to know about the case log (never the token)."""
    store, cfg = _cases(), current_app.config
    return {"log": store.logged, "keep_photos": store.keep_photos,
            "site_id": cfg["SITE_ID"], "tester_id": cfg["TESTER_ID"]}


def _synthetic(svc) -> bool:
    """True when a loaded model was trained on synthetic (toy) data, per its model card."""
    for tier in (svc.device, svc.cloud):
        data = (tier.card if tier is not None else {}).get("data")
        if isinstance(data, dict) and data.get("synthetic") is True:
            return True
    return False


# --- the in-browser device tier (edge_demo/browser.py) ---------------------------------
@api.get("/policy")
def policy():
    resp = jsonify(browser.policy_body(_service()))
    resp.headers[offline.VERSION_HEADER] = _offline_version()
    return resp


@api.get("/device/model.tflite")
def device_model():
    """The device tier's model.tflite, the very bytes the server loaded (and hashed); its
    ETag is their sha256 (plus ``-br``/``-gz`` for a compressed copy); ``?v=`` caches it."""
    svc = _service()
    store = delivery.assets()
    asset = store.blob(svc.device._model_bytes, svc.device.sha256, "application/octet-stream")
    return store.respond(request, asset, request.args.get("v") or request.args.get("sha256"),
                         {"X-Model-SHA256": svc.device.sha256})


@page.get("/runtime/<path:name>")
def runtime(name: str):
    """The pinned LiteRT.js files (from `npm ci` in edge_demo/web); nothing else is served."""
    return browser.runtime_file(current_app.config, name, delivery.assets(), request)


@api.post("/decide")
def decide():
    """The page's device answer (+ the photo only on fallback) -> the classify body."""
    svc = _service()
    meta = _metadata()
    case = _case_fields()
    store = _cases()
    with store.claims.hold(case.id):
        first = store.first_response(case.id)
        if first is not None:
            return _duplicate(first, case)
        page_gate = parse_page_gate(request.form.get("gate")) if svc.gate.enabled else None
        raw_answer = request.form.get("device_answer")
        # a photo the page's gate refused comes without a device answer (the server re-checks)
        device = (browser.parse_device_answer(raw_answer, svc.device.labels)
                  if raw_answer or page_gate is None else None)
        f = request.files.get("image")
        data = f.read() if f is not None else None
        ask = request.form.get("ask_cloud", "").lower() in _YES
        raw: dict[str, Any] = {}
        body = browser.decide(svc, device, data, meta, ask_cloud=ask, page_gate=page_gate,
                              raw=raw)
        g.tier_path = body["tier_path"]
        body["request_id"] = g.request_id
        if (body["fallback"]["wanted"] and not data and svc.cloud is not None
                and case.consent_upload is not False):
            # The policy wants the cloud (e.g. the patient fields moved the answer) but the
            # photo stayed on the phone: the case stays open until the page sends the photo
            # with the same case id, or says the tester declined the upload (consent_upload=0).
            body["case"] = {**case.section(logged=False, duplicate=False),
                            "awaiting_photo": True}
        else:
            _log_case(case, body, endpoint="decide", raw=raw, photo=data, meta=meta)
    if current_app.config["LOG_JSON"]:  # the study log: answers, never the photo
        request_log.info(json.dumps({
            "ts": round(time.time(), 3), "event": "result", "request_id": g.request_id,
            "case_id": case.id,
            "tier_path": body["tier_path"], "photo_received": body["photo_received"],
            "device": body["device"] and {"melanoma": device["melanoma"],
                                          "top": device["top"],
                                          "latency_ms": device["latency_ms"]},
            "gate": {"passed": body["gate"]["passed"], "codes": body["gate"]["codes"]},
            "cloud": body["cloud"] and {"melanoma": body["cloud"]["melanoma"],
                                        "top": body["cloud"]["top"]},
            "fallback_rules": body["fallback"]["rules_fired"],
            "advice": body["advice"]["decision"]}))
    return jsonify(body)
