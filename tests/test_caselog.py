"""The case log (edge_demo/caselog.py) through the app: a real SQLite file, real tiny bundles.

Each case id is answered once (in SQLite with a case log, in memory without); photos are kept
only with --keep-photos and the case's consent; /cases and its API need the token; a deleted
case leaves no bytes in the database; the schema migrates; labels come in through the API and
the CSV, and `cases export` writes both tiers' answers with them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sqlite3
import stat
import uuid

import pytest
from demo_fixtures import jpeg_bytes, tiny_bundles

from edge_demo.app import create_app
from edge_demo.caseid import short_code
from edge_demo.caselog import MIGRATIONS, SCHEMA_VERSION, CaseLog
from edge_demo.cli import main
from edge_demo.errors import EdgeDemoError

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


def make_app(bundles, **config):
    return create_app({"DEVICE_BUNDLE": str(bundles["int8"]),
                       "CLOUD_BUNDLE": str(bundles["float32"]), "INTERPRETERS": 1,
                       "LOG_JSON": False, "CASES_TOKEN": TOKEN, **config})


@pytest.fixture
def logged(bundles, tmp_path):
    """An app with a case log that keeps photos with consent."""
    app = make_app(bundles, CASES_DIR=str(tmp_path / "cases"), KEEP_PHOTOS=True,
                   SITE_ID="clinic-a")
    yield app, tmp_path / "cases"
    app.extensions["edge_demo"]["cases"].close()


def classify(client, photo: bytes, **fields):
    q = "&".join(f"{k}={v}" for k, v in fields.items())
    return client.post("/api/v1/classify" + (f"?{q}" if q else ""), data=photo,
                       content_type="image/jpeg")


def rows(folder) -> list[dict]:
    db = sqlite3.connect(folder / "cases.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM cases")]
    finally:
        db.close()


def test_each_case_id_is_answered_and_logged_once(logged):
    app, folder = logged
    client = app.test_client()
    cid = str(uuid.uuid4())
    first = classify(client, jpeg_bytes(seed=1), case_id=cid, tester_id="t-1", age=63)
    body = first.get_json()
    assert first.status_code == 200
    assert body["case"] == {"id": cid, "code": short_code(cid), "logged": True,
                            "duplicate": False}
    # a repeat (a retried upload, a queued case sent twice) with another photo: the first
    # answer comes back; nothing runs, nothing is logged again
    again = classify(client, jpeg_bytes(seed=2, size=(80, 60)), case_id=cid)
    body2 = again.get_json()
    assert again.status_code == 200 and body2["case"]["duplicate"] is True
    assert body2["request_id"] == again.headers["X-Request-ID"] != body["request_id"]
    for key in ("device", "cloud", "fallback", "advice", "timings_ms", "metadata"):
        assert body2[key] == body[key], key
    assert len(rows(folder)) == 1
    row = rows(folder)[0]
    assert row["id"] == cid and row["code"] == short_code(cid)
    assert (row["site_id"], row["tester_id"]) == ("clinic-a", "t-1")  # site: the server's
    assert json.loads(row["patient"]) == {"age": 63.0}
    assert row["decision"] == body["advice"]["decision"]
    assert row["policy_sha256"] == app.extensions["edge_demo"]["service"].policy.sha256
    raw = json.loads(row["device_raw"])
    assert raw["melanoma"] == pytest.approx(body["device"]["image_only"]["melanoma"]
                                            if "image_only" in body["device"]
                                            else body["device"]["melanoma"])
    # a request without a case id gets a server-made one, logged too
    other = classify(client, jpeg_bytes(seed=1)).get_json()["case"]
    assert other["id"] != cid and other["logged"] and not other["duplicate"]
    assert len(rows(folder)) == 2


def test_without_a_case_log_ids_are_remembered_in_memory_and_bounded(bundles):
    client = make_app(bundles, RECENT_CASES=2).test_client()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    assert classify(client, jpeg_bytes(), case_id=ids[0]).get_json()["case"] == {
        "id": ids[0], "code": short_code(ids[0]), "logged": False, "duplicate": False}
    assert classify(client, jpeg_bytes(), case_id=ids[0]).get_json()["case"]["duplicate"]
    for cid in ids[1:]:
        classify(client, jpeg_bytes(), case_id=cid)
    # the oldest fell out of the bounded table: answered afresh
    assert not classify(client, jpeg_bytes(), case_id=ids[0]).get_json()["case"]["duplicate"]


@pytest.mark.parametrize("field, value, says", [
    ("case_id", "not-a-uuid", "UUID version 4"),
    ("case_id", "0123abcd-ef01-1234-9678-9abcdef01234", "UUID version 4"),  # version 1
    ("tester_id", "x" * 65, "tester_id"),
    ("consent_keep", "maybe", "consent_keep"),
    ("model_sha256", "abc", "sha256"),
    ("client", "[1]", "JSON object"),
    ("client", json.dumps({"threads": "four"}), "client.threads"),
])
def test_bad_case_fields_are_400_naming_the_field(bundles, field, value, says):
    client = make_app(bundles).test_client()
    r = client.post("/api/v1/classify", query_string={field: value}, data=jpeg_bytes(),
                    content_type="image/jpeg")
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["code"] == "bad_case" and says in err["message"]


def test_photos_are_kept_only_with_keep_photos_and_consent(bundles, logged, tmp_path):
    app, folder = logged
    client = app.test_client()
    photo = jpeg_bytes(seed=5)
    kept = classify(client, photo, case_id=str(uuid.uuid4()), consent_keep=1)
    classify(client, jpeg_bytes(seed=6), case_id=str(uuid.uuid4()), consent_keep=0)
    classify(client, jpeg_bytes(seed=7))  # no consent field: not kept
    files = sorted((folder / "photos").iterdir())
    assert [p.name for p in files] == [hashlib.sha256(photo).hexdigest() + ".jpg"]
    assert files[0].read_bytes() == photo
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "cases.sqlite3").stat().st_mode) == 0o600
    by_id = {r["id"]: r for r in rows(folder)}
    assert by_id[kept.get_json()["case"]["id"]]["photo"] == files[0].name
    # a case log without --keep-photos keeps none, consent or not
    plain = make_app(bundles, CASES_DIR=str(tmp_path / "plain"))
    classify(plain.test_client(), photo, consent_keep=1)
    assert not (tmp_path / "plain" / "photos").exists()
    with pytest.raises(EdgeDemoError, match="--keep-photos needs a case log"):
        make_app(bundles, KEEP_PHOTOS=True)


def test_decide_waits_for_the_photo_the_policy_wants(bundles, tmp_path):
    """A browser answer that needs the cloud, posted without the photo: the case stays open;
    the same case id with the photo is answered with the cloud and logged once; a tester who
    declined the upload (consent_upload=0) gets the device answer, logged."""
    app = make_app(bundles, CASES_DIR=str(tmp_path / "c"))
    client = app.test_client()
    unsure = json.dumps({"melanoma": 0.4, "diagnosis": {"akiec": 0.1, "bcc": 0.1, "bkl": 0.1,
                         "df": 0.1, "mel": 0.3, "nv": 0.2, "vasc": 0.1}, "latency_ms": 5})
    cid = str(uuid.uuid4())
    r = client.post("/api/v1/decide", data={"device_answer": unsure, "case_id": cid},
                    content_type="multipart/form-data").get_json()
    assert r["fallback"]["wanted"] and r["case"]["awaiting_photo"] and not r["case"]["logged"]
    assert rows(tmp_path / "c") == []
    r = client.post("/api/v1/decide", data={"device_answer": unsure, "case_id": cid,
                                            "image": (io.BytesIO(jpeg_bytes()), "p.jpg")},
                    content_type="multipart/form-data").get_json()
    assert r["cloud"] is not None and r["case"]["logged"] and not r["case"]["duplicate"]
    declined = str(uuid.uuid4())
    r = client.post("/api/v1/decide", data={"device_answer": unsure, "case_id": declined,
                                            "consent_upload": "0"},
                    content_type="multipart/form-data").get_json()
    assert r["cloud"] is None and r["case"]["logged"]
    assert "fallback_unavailable" in r["advice"]["rules_fired"]
    got = {x["id"]: x for x in rows(tmp_path / "c")}
    assert set(got) == {cid, declined}
    assert got[cid]["photo_received"] == 1 and got[declined]["consent_upload"] == 0


def test_cases_api_needs_the_token_and_keeps_it_out_of_logs(bundles, tmp_path):
    app = make_app(bundles, CASES_DIR=str(tmp_path / "cases"), LOG_JSON=True)
    client = app.test_client()
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger("edge_demo.request").addHandler(handler)
    try:
        cid = str(uuid.uuid4())
        classify(client, jpeg_bytes(), case_id=cid, age=71, sex="female", site="back")
        code = short_code(cid)
        for url in ("/api/v1/cases", "/api/v1/cases/report", "/api/v1/cases/export.csv",
                    "/cases"):
            r = client.get(url)
            assert r.status_code == 401, url
            assert r.get_json()["error"]["code"] == "token_required"
            r = client.get(url, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 403 and r.get_json()["error"]["code"] == "bad_token"
        assert client.delete(f"/api/v1/cases/{code}").status_code == 401
        assert client.put(f"/api/v1/cases/{code}/label", json={}).status_code == 401
        listed = client.get("/api/v1/cases", headers=AUTH)
        assert listed.status_code == 200 and listed.headers["Cache-Control"] == "no-store"
        assert listed.get_json()["cases"][0]["code"] == code
        r = client.put(f"/api/v1/cases/{code}/label", headers=AUTH, json={
            "diagnosis": "other", "other": "SECRET-LABEL-TEXT", "source": "dermatologist",
            "date": "2026-11-30"})
        assert r.status_code == 200
        # the page: the token in the URL once, then an HttpOnly, SameSite=Strict cookie
        r = client.get(f"/cases?token={TOKEN}")
        assert r.status_code == 303 and r.headers["Location"].endswith("/cases")
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        page = client.get("/cases")
        assert page.status_code == 200 and b"Enter a reference diagnosis" in page.data
        assert page.headers["Referrer-Policy"] == "no-referrer"
        secure = app.test_client().get(f"/cases?token={TOKEN}", base_url="https://lan.test")
        assert "; Secure" in secure.headers["Set-Cookie"]
    finally:
        logging.getLogger("edge_demo.request").removeHandler(handler)
        app.extensions["edge_demo"]["cases"].close()
    text = "\n".join(records)
    assert records and cid in text  # the request log names the case by id
    for secret in (TOKEN, "SECRET-LABEL-TEXT", "female", "back", "dermatologist"):
        assert secret not in text, secret
    for rec in map(json.loads, records):
        assert not {"age", "sex", "site", "patient", "metadata", "label"} & set(rec), rec


@pytest.mark.parametrize("label, status, says", [
    ({"diagnosis": "melanoma", "source": "histopathology", "date": "2026-11-30"}, 400,
     "must be one of akiec"),
    ({"diagnosis": "other", "source": "histopathology", "date": "2026-11-30"}, 400,
     "needs its text"),
    ({"diagnosis": "mel", "source": "biopsy", "date": "2026-11-30"}, 400, "histopathology"),
    ({"diagnosis": "mel", "source": "follow-up", "date": "30/11/2026"}, 400, "YYYY-MM-DD"),
    ({"diagnosis": "mel", "source": "follow-up", "date": "2999-01-01"}, 400, "future"),
])
def test_bad_labels_say_what_is_wrong(logged, label, status, says):
    app, _ = logged
    client = app.test_client()
    code = classify(client, jpeg_bytes()).get_json()["case"]["code"]
    r = client.put(f"/api/v1/cases/{code}/label", headers=AUTH, json=label)
    assert r.status_code == status and says in r.get_json()["error"]["message"]
    r = client.put("/api/v1/cases/ZZZZ-ZZZZ/label", headers=AUTH,
                   json={"diagnosis": "mel", "source": "follow-up", "date": "2026-11-30"})
    assert r.status_code == 404 and "No case with the code" in r.get_json()["error"]["message"]


def test_delete_leaves_no_trace_in_the_database_files(logged):
    app, folder = logged
    client = app.test_client()
    marker = "MARKER-tester-77"
    cid = str(uuid.uuid4())
    photo = jpeg_bytes(seed=9)
    keep = classify(client, jpeg_bytes(seed=10), case_id=str(uuid.uuid4()), tester_id="t-2")
    classify(client, photo, case_id=cid, tester_id=marker, consent_keep=1)
    client.put(f"/api/v1/cases/{short_code(cid)}/label", headers=AUTH,
               json={"diagnosis": "other", "other": "MARKER-label-88", "source": "follow-up",
                     "date": "2026-11-01"})
    blob = b"".join(p.read_bytes() for p in folder.glob("cases.sqlite3*"))
    assert marker.encode() in blob  # it is there before the delete
    r = client.delete(f"/api/v1/cases/{short_code(cid)}", headers=AUTH)
    assert r.status_code == 200 and r.get_json()["deleted"] == 1
    blob = b"".join(p.read_bytes() for p in folder.glob("cases.sqlite3*"))
    assert marker.encode() not in blob and b"MARKER-label-88" not in blob
    assert not (folder / "photos" / (hashlib.sha256(photo).hexdigest() + ".jpg")).exists()
    assert [r["id"] for r in rows(folder)] == [keep.get_json()["case"]["id"]]
    assert client.delete(f"/api/v1/cases/{short_code(cid)}", headers=AUTH).status_code == 404


def test_schema_migrates_in_place_and_refuses_a_newer_one(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    db = sqlite3.connect(folder / "cases.sqlite3")
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    cid = str(uuid.uuid4())
    db.execute("INSERT INTO cases (id, code, created_at, endpoint, tier_path, policy_sha256,"
               " device_raw, fallback_wanted, fallback_used, fallback_rules, decision,"
               " advice_rules, photo_received, response) VALUES (?, ?, 'x', 'classify',"
               " 'device', 'p', '{}', 0, 0, '[]', 'no_action', '[]', 0, '{}')",
               (cid, short_code(cid)))
    db.commit()
    db.close()
    log = CaseLog(folder)
    try:
        assert log.version == SCHEMA_VERSION == 2
        assert [r["id"] for r in log.cases()] == [cid]
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # tightened on open
    finally:
        log.close()
    db = sqlite3.connect(folder / "cases.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(EdgeDemoError, match="schema version 99.*knows up to 2"):
        CaseLog(folder)


def _labels_csv(path, rows_):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "diagnosis", "other", "source", "date"])
        w.writerows(rows_)
    return path


def test_cli_imports_exports_and_deletes(logged, tmp_path, capsys):
    app, folder = logged
    client = app.test_client()
    codes = [classify(client, jpeg_bytes(seed=s), case_id=str(uuid.uuid4()),
                      consent_keep=1).get_json()["case"]["code"] for s in range(3)]
    cases = ["--cases", str(folder)]
    bad = _labels_csv(tmp_path / "bad.csv", [
        [codes[0], "mel", "", "histopathology", "2026-11-02"],
        ["NOPE-NOPE", "nv", "", "dermatologist", "2026-11-02"],
        [codes[1], "spitz", "", "dermatologist", "2026-11-02"]])
    assert main(["cases", "import", str(bad), *cases]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 rows cannot be used, so none was imported" in err
    assert "row 3" in err and "row 4" in err
    good = _labels_csv(tmp_path / "good.csv", [
        [codes[0].lower().replace("-", ""), "mel", "", "histopathology", "2026-11-02"],
        [codes[1], "other", "seborrhoeic wart", "follow-up", "2026-11-03"]])
    assert main(["cases", "import", str(good), *cases]) == 0
    out = tmp_path / "cases.csv"
    assert main(["cases", "export", *cases, "--out", str(out)]) == 0
    exported = {r["code"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert set(exported) == set(codes)
    assert (exported[codes[0]]["label_diagnosis"], exported[codes[0]]["label_source"]) == (
        "mel", "histopathology")
    assert exported[codes[1]]["label_other"] == "seborrhoeic wart"
    assert exported[codes[2]]["label_diagnosis"] == ""
    for r in exported.values():  # both tiers' answers: the default policy falls back here
        assert r["device_top"] and r["cloud_top"] and float(r["device_raw_melanoma"]) >= 0
        assert r["photo_kept"] == "1"
    # the API's CSV is the same export
    api_csv = client.get("/api/v1/cases/export.csv", headers=AUTH).get_data(as_text=True)
    assert api_csv == out.read_text()
    assert main(["cases", "delete", codes[0], "NOPE-NOPE", *cases]) == 2  # none deleted
    assert len(rows(folder)) == 3
    assert main(["cases", "delete", codes[0], *cases]) == 0
    assert {r["code"] for r in rows(folder)} == set(codes[1:])
    assert main(["cases", "export", "--cases", str(tmp_path / "none")]) == 2
    assert "No case log" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none" / "cases.sqlite3")
