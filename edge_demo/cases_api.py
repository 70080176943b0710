"""``/cases`` and ``/api/v1/cases``: the site lead's view of the case log, behind a token.

The server prints ``/cases?token=...`` once at start (as Jupyter does). Opening it sets a
cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS) and redirects to ``/cases``,
so the token leaves the address bar; API clients send ``Authorization: Bearer TOKEN``.
No token: 401; a wrong one: 403. These responses are never cached and send no referrer.
"""

from __future__ import annotations

import hmac
import io
from typing import Any

from flask import (
    Blueprint,
    current_app,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    send_file,
)

from .caselog import DIAGNOSES, OTHER, SOURCES, CaseLog, Label, export_csv
from .errors import EdgeDemoError, RequestError

COOKIE = "edge_demo_cases"
case_pages = Blueprint("cases", __name__)


def _state() -> dict[str, Any]:
    return current_app.extensions["edge_demo"]


def _log() -> CaseLog:
    store = _state()["cases"]
    if not isinstance(store, CaseLog):
        raise RequestError("This server keeps no case log; start it with `edge-demo serve"
                           " --cases DIR`.", status=404, code="no_case_log")
    return store


def _given_token() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE)


def _check(token: str | None) -> None:
    if not token:
        raise RequestError("The case log needs its token: open the /cases?token=... address"
                           " the server printed at start, or send Authorization: Bearer"
                           " TOKEN.", status=401, code="token_required")
    if not hmac.compare_digest(token.encode(), _state()["cases_token"].encode()):
        raise RequestError("Wrong token for the case log: use the one the server printed at"
                           " this start (it changes at each start).", status=403,
                           code="bad_token")


@case_pages.after_request
def _private(resp):
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


@case_pages.get("/cases")
def page():
    _log()
    token = request.args.get("token")
    if token is not None:
        _check(token)
        resp = redirect(request.script_root + "/cases", code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                        secure=request.is_secure, path=request.script_root + "/")
        return resp
    _check(_given_token())
    svc = _state()["service"]
    return render_template("cases.html", diagnoses=DIAGNOSES, other=OTHER, sources=SOURCES,
                           service=svc)


def _api() -> CaseLog:
    log = _log()
    _check(_given_token())
    return log


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A case for the page's table: what it shows, no model outputs or stored response."""
    keep = ("id", "code", "created_at", "site_id", "tester_id", "tier_path", "decision",
            "device_top", "device_melanoma", "cloud_top", "cloud_melanoma", "fallback_rules",
            "gate_passed", "consent_keep", "photo_received", "build", "queued")
    out = {k: row.get(k) for k in keep}
    out["photo_kept"] = bool(row.get("photo"))
    out["patient"] = row.get("patient")
    out["label"] = None if row.get("label_diagnosis") is None else {
        "diagnosis": row["label_diagnosis"], "other": row["label_other"],
        "source": row["label_source"], "date": row["label_date"]}
    return out


@case_pages.get("/api/v1/cases")
def list_cases():
    log = _api()
    try:
        limit = min(max(int(request.args.get("limit", 500)), 1), 10_000)
    except ValueError:
        raise RequestError("limit must be a whole number.", code="bad_request") from None
    return jsonify({"count": log.count(), "cases": [_public(r) for r in log.cases(limit=limit)]})


@case_pages.put("/api/v1/cases/<ref>/label")
def put_label(ref: str):
    log = _api()
    doc = request.get_json(silent=True)
    if not isinstance(doc, dict):
        raise RequestError("Send the label as JSON: {\"diagnosis\", \"source\", \"date\","
                           " \"other\"}.", code="bad_label")
    try:
        case_id = log.resolve(ref)
        label = Label.parse(doc.get("diagnosis"), doc.get("source"), doc.get("date"),
                            doc.get("other"))
    except EdgeDemoError as exc:
        raise RequestError(str(exc), status=404 if "No case" in str(exc) else 400,
                           code="bad_label") from None
    log.set_labels([(case_id, label)], via="page")
    return jsonify({"id": case_id, "label": label.to_dict()})


@case_pages.delete("/api/v1/cases/<ref>")
def delete_case(ref: str):
    log = _api()
    try:
        case_id = log.resolve(ref)
    except EdgeDemoError as exc:
        raise RequestError(str(exc), status=404, code="no_such_case") from None
    return jsonify({"deleted": log.delete([case_id]), "id": case_id})


@case_pages.get("/api/v1/cases/<ref>/photo")
def photo(ref: str):
    log = _api()
    try:
        path = log.photo_path(log.resolve(ref))
    except EdgeDemoError as exc:
        raise RequestError(str(exc), status=404, code="no_such_case") from None
    if path is None or not path.is_file():
        raise RequestError("No photo was kept for this case (kept only with --keep-photos"
                           " and the tester's consent).", status=404, code="no_photo")
    return send_file(path, max_age=0)


@case_pages.get("/api/v1/cases/export.csv")
def export():
    log = _api()
    buf = io.StringIO()
    export_csv(log, buf)
    resp = make_response(buf.getvalue())
    resp.headers["Content-Type"] = "text/csv; charset=utf-8"
    resp.headers["Content-Disposition"] = "attachment; filename=cases.csv"
    return resp


@case_pages.get("/api/v1/cases/report")
def short_report():
    from .report import field_report, short_version

    log = _api()
    return jsonify(short_version(field_report(log, _state()["service"].policy)))
