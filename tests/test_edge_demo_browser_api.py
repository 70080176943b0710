"""The server side of the in-browser device tier (Flask test client, tiny bundles)."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from demo_fixtures import jpeg_bytes, tiny_bundles

from edge_demo.app import create_app
from edge_demo.cli import main
from edge_demo.policy import Policy, rules

NO_FALLBACK = {"min_confidence": 0.0, "mel_band_low": None, "mel_band_high": None,
               "second_opinion": False}
ALWAYS = {**NO_FALLBACK, "min_confidence": 1.0}


def make_app(tmp_path, policy=None, **config):
    b = tiny_bundles()
    cfg = {"DEVICE_BUNDLE": str(b["int8"]), "CLOUD_BUNDLE": str(b["float32"]),
           "INTERPRETERS": 1, "LOG_JSON": False,
           "WEB_RUNTIME_DIR": str(tmp_path / "no-runtime"), **config}
    if policy is not None:
        cfg["POLICY_FILE"] = str(Policy(**policy).save(tmp_path / "policy.json"))
    return create_app(cfg)


def device_answer(mel=0.05, top="nv", p=0.9):
    labels = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    diag = {lab: (p if lab == top else (1 - p) / 6) for lab in labels}
    return json.dumps({"melanoma": mel, "diagnosis": diag, "latency_ms": 12.5})


def decide(client, answer, photo: bytes | None = None, **fields):
    data = {"device_answer": answer, **fields}
    if photo is not None:
        data["image"] = (io.BytesIO(photo), "photo.jpg")
    return client.post("/api/v1/decide", data=data, content_type="multipart/form-data")


def test_policy_endpoint_publishes_thresholds_rules_and_no_operating_point(tmp_path):
    client = make_app(tmp_path).test_client()
    body = client.get("/api/v1/policy").get_json()
    assert body["policy"]["source"] == "defaults"
    assert body["policy"]["policy"]["min_confidence"] == 0.6
    assert body["rules"] == rules()
    assert body["operating_point"] is None  # defaults were not calibrated on anything
    assert "calibrate on a labelled sample of its own" in body["calibrate_note"]


def test_operating_point_has_95_percent_intervals(tmp_path):
    row = {"chosen": True, "n": 200, "n_melanoma": 40, "n_not_melanoma": 160,
           "fallback_rate": 0.2, "referral_rate": 0.37, "melanoma_sensitivity": 0.95,
           "melanoma_specificity": 0.7}
    pol = Policy(coverage=(row,), provenance={"split": "val", "data": "/x/splits.csv"})
    pol.save(tmp_path / "p.json")
    client = make_app(tmp_path, POLICY_FILE=str(tmp_path / "p.json")).test_client()
    op = client.get("/api/v1/policy").get_json()["operating_point"]
    assert op["n"] == 200 and op["split"] == "val" and op["data"] == "splits.csv"
    lo, hi = op["fallback_rate"]["ci95"]
    assert op["fallback_rate"]["value"] == 0.2 and 0.15 < lo < 0.2 < hi < 0.27
    lo, hi = op["melanoma_sensitivity"]["ci95"]
    assert op["melanoma_sensitivity"]["n"] == 40 and 0.82 < lo < 0.95 < hi <= 1.0


def test_confident_answer_is_decided_without_a_photo(tmp_path):
    client = make_app(tmp_path, NO_FALLBACK).test_client()
    body = decide(client, device_answer()).get_json()
    assert body["photo_received"] is False and body["cloud"] is None
    assert body["tier_path"] == "browser" and body["device"]["computed_on"] == "browser"
    assert body["device"]["top"] == {"label": "nv", "probability": 0.9}
    assert body["advice"]["decided_by"] == "device"
    assert body["timings_ms"]["device"] == 12.5


def test_fallback_with_the_photo_runs_the_cloud(tmp_path):
    client = make_app(tmp_path, ALWAYS).test_client()
    body = decide(client, device_answer(), jpeg_bytes()).get_json()
    assert body["photo_received"] is True and body["fallback"]["used"] is True
    assert body["cloud"] is not None and body["tier_path"] == "browser+cloud"
    assert body["advice"]["decided_by"] == "cloud"
    body = decide(client, device_answer()).get_json()  # fallback wanted, photo not sent
    assert body["fallback"]["wanted"] is True and body["fallback"]["used"] is False
    assert "The photo was not sent" in body["fallback"]["reason"]
    assert body["advice"]["rules_fired"] == ["fallback_unavailable"]


def test_tester_can_ask_for_the_cloud(tmp_path):
    client = make_app(tmp_path, NO_FALLBACK).test_client()
    body = decide(client, device_answer(), jpeg_bytes(), ask_cloud="1").get_json()
    assert body["cloud"] is not None and body["fallback"]["asked"] is True
    assert body["fallback"]["used"] is False and body["advice"]["decided_by"] == "device"


@pytest.mark.parametrize("answer, match", [
    (None, "'device_answer' is missing"),
    ("{not json", "must be JSON"),
    (json.dumps({"melanoma": 0.1, "diagnosis": {"nv": 1.0}}), "a probability for each of"),
    (device_answer(mel=1.5), r"numbers in \[0, 1\]"),
])
def test_bad_device_answers_are_400(tmp_path, answer, match):
    client = make_app(tmp_path).test_client()
    data = {} if answer is None else {"device_answer": answer}
    resp = client.post("/api/v1/decide", data=data, content_type="multipart/form-data")
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["code"] == "bad_device_answer"
    assert re.search(match, err["message"])


def test_runtime_files_only_when_installed_and_listed(tmp_path):
    client = make_app(tmp_path).test_client()
    resp = client.get("/runtime/core/dist/index.js")
    assert resp.status_code == 404 and "npm ci --prefix edge_demo/web" in \
        resp.get_json()["error"]["message"]
    fake = tmp_path / "rt" / "@litertjs"
    from edge_demo.browser import RUNTIME_FILES

    for name in RUNTIME_FILES:
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text("// " + name)
    client = make_app(tmp_path, WEB_RUNTIME_DIR=str(tmp_path / "rt")).test_client()
    with client.get("/runtime/core/wasm/litert_wasm_internal.wasm") as resp:
        assert resp.status_code == 200 and resp.mimetype == "application/wasm"
        assert resp.get_data(as_text=True) == "// core/wasm/litert_wasm_internal.wasm"
    assert client.get("/runtime/core/package.json").status_code == 404
    assert client.get("/runtime/../../app.py").status_code == 404
    html = client.get("/").get_data(as_text=True)
    assert "device.js" in html and '"enabled": true' in html
    off = make_app(tmp_path, WEB_RUNTIME_DIR=str(tmp_path / "rt"), BROWSER_INFERENCE=False)
    html = off.test_client().get("/").get_data(as_text=True)
    assert "device.js" not in html and "turned off on this server" in html


def test_device_model_is_served_with_its_sha256(tmp_path):
    app = make_app(tmp_path)
    resp = app.test_client().get("/api/v1/device/model.tflite")
    svc = app.extensions["edge_demo"]["service"]
    assert resp.status_code == 200 and resp.headers["X-Model-SHA256"] == svc.device.sha256
    assert resp.data == (svc.device.bundle / "model.tflite").read_bytes()


def test_synthetic_model_banner(tmp_path):
    b = tiny_bundles()
    html = {}
    for synthetic in (True, False):
        dev = tmp_path / f"int8-{synthetic}"
        shutil.copytree(b["int8"], dev)
        card = json.loads((dev / "model_card.json").read_text())
        card["data"]["synthetic"] = synthetic
        (dev / "model_card.json").write_text(json.dumps(card))
        html[synthetic] = make_app(tmp_path, DEVICE_BUNDLE=str(dev), CLOUD_BUNDLE=None
                                   ).test_client().get("/").get_data(as_text=True)
    assert 'id="synthetic-note"' in html[True] and "synthetic toy images" in html[True]
    assert 'id="synthetic-note"' not in html[False]


def test_cli_policy_type_error_is_one_paragraph_exit_2(tmp_path, capsys):
    doc = Policy().to_dict()
    doc["policy"]["malignant_classes"] = 5
    (tmp_path / "p.json").write_text(json.dumps(doc))
    b = tiny_bundles()
    rc = main(["predict", "--device", str(b["int8"]), "--policy", str(tmp_path / "p.json"),
               str(tmp_path / "none.jpg")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("edge-demo: error: Policy.malignant_classes must be a list")
    assert err.count("\n") == 1


def test_serve_help_shows_the_browser_option(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-browser-inference" in out and "uploads the photo only on fallback" in out
