"""`edge-demo calibrate --cases` and `edge-demo report` on a real case log (tiny bundles).

The referral threshold bounds melanoma sensitivity with 95 % confidence from order
statistics (checked by simulation against a known score distribution); too few melanomas is a
plain refusal that keeps the conservative policy and says how many more are needed; device
answers alone refit only the referral threshold; the report's drift flag uses a prediction
interval for the number of cases seen.
"""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
from demo_fixtures import jpeg_bytes, tiny_bundles

from edge_demo.app import create_app
from edge_demo.caseid import short_code
from edge_demo.caselog import CaseLog, Label
from edge_demo.cli import main
from edge_demo.policy import Policy
from edge_demo.report import prediction_interval
from edge_demo.sitecal import (
    beta_cdf,
    calibrate_site,
    melanomas_needed,
    results_from_cases,
    sensitivity_threshold,
    site_data,
)


def test_melanomas_needed_and_the_bound_hold_by_simulation():
    assert melanomas_needed(0.9) == 29 and melanomas_needed(0.95) == 59
    assert beta_cdf(0.1, 1, 29) >= 0.95 > beta_cdf(0.1, 1, 28)
    assert sensitivity_threshold([0.5] * 28, 0.9)["threshold"] is None
    # scores ~ Beta(2, 2) (CDF 3x^2 - 2x^3): the true sensitivity of the chosen threshold is
    # >= 0.9 in >= 95 % of samples, and the two-sided interval covers it ~95 % of the time
    rng = np.random.default_rng(1)
    above = covered = 0
    trials = 400
    for _ in range(trials):
        s = rng.beta(2, 2, 45)
        out = sensitivity_threshold(s, 0.9)
        t = out["threshold"]
        true = 1 - (3 * t * t - 2 * t ** 3)
        above += true >= 0.9
        covered += out["interval"][0] <= true <= out["interval"][1]
    assert above / trials >= 0.94, above / trials
    assert 0.92 <= covered / trials <= 0.98, covered / trials
    # scores referred by another rule count as caught at any threshold
    out = sensitivity_threshold([float("inf")] * 40 + [0.2, 0.3], 0.9)
    assert out["threshold"] == pytest.approx(0.2) and out["point"] == 1.0


def test_prediction_interval_for_the_cases_seen():
    lo, hi = prediction_interval(20, 100, 100)
    assert 8 <= lo <= 12 and 28 <= hi <= 33  # wider than binomial: the promise is uncertain
    lo2, hi2 = prediction_interval(200, 1000, 100)
    assert hi2 - lo2 < hi - lo  # a promise measured on more cases is tighter
    assert prediction_interval(0, 50, 10)[0] == 0


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


def _site(bundles, folder, n_cases: int, n_mel: int, policy=None, keep=True, seed=0):
    """A case log of ``n_cases`` photos served by the app, labelled with ``n_mel``
    melanomas (the toy model knows nothing: the labels are the site's truth here)."""
    cfg = {"DEVICE_BUNDLE": str(bundles["int8"]), "CLOUD_BUNDLE": str(bundles["float32"]),
           "INTERPRETERS": 1, "LOG_JSON": False, "CASES_DIR": str(folder),
           "KEEP_PHOTOS": keep, "SITE_ID": "clinic-b"}
    if policy is not None:
        cfg["POLICY_FILE"] = str(policy)
    app = create_app(cfg)
    client = app.test_client()
    ids = []
    for i in range(n_cases):
        cid = str(uuid.uuid4())
        r = client.post(f"/api/v1/classify?case_id={cid}&consent_keep=1",
                        data=jpeg_bytes((56 + i % 17, 48 + i % 11), seed=seed * 1000 + i),
                        content_type="image/jpeg")
        assert r.status_code == 200 and r.get_json()["case"]["logged"]
        ids.append(cid)
    app.extensions["edge_demo"]["cases"].close()
    log = CaseLog(folder)
    dx = ["mel"] * n_mel + ["nv", "bkl", "bcc", "nv", "nv"] * n_cases
    log.set_labels([(cid, Label.parse(d, "histopathology", "2026-11-20"))
                    for cid, d in zip(ids, dx[:n_cases], strict=True)], via="test")
    log.close()
    return ids


def test_too_few_melanomas_is_a_plain_refusal(bundles, tmp_path, capsys):
    _site(bundles, tmp_path / "c", 24, 6)
    out = tmp_path / "policy.json"
    rc = main(["calibrate", "--cases", str(tmp_path / "c"), "--device", str(bundles["int8"]),
               "--cloud", str(bundles["float32"]), "--target-sensitivity", "0.9",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3
    assert "REFUSED" in err and "6 labelled melanomas" in err
    assert "needs at least 29" in err and "Label 23 more melanomas" in err
    assert "mode: both tiers" in err
    pol = Policy.load(out)
    conservative = Policy.conservative(0.31)  # the cloud card's threshold (tiny bundles)
    assert pol.thresholds() == conservative.thresholds() and pol.temperature == {}
    assert pol.provenance["refused"] is True and pol.provenance["melanomas_needed"] == 29
    assert pol.coverage == ()


def test_site_calibration_records_its_promise_and_provenance(bundles, tmp_path, capsys):
    ids = _site(bundles, tmp_path / "c", 90, 36)
    out = tmp_path / "site.json"
    rc = main(["calibrate", "--cases", str(tmp_path / "c"), "--device", str(bundles["int8"]),
               "--cloud", str(bundles["float32"]), "--target-sensitivity", "0.9",
               "--target-fallback", "0.3", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "with 95% confidence (36 labelled melanomas)" in printed.out
    pol = Policy.load(out)
    prov = pol.provenance
    assert prov["site"] == "clinic-b" and prov["mode"] == "both tiers"
    assert prov["n_used"] == 90 and prov["n_melanoma"] == 36 and not prov["refused"]
    assert prov["case_dates"][0] <= prov["case_dates"][1]
    assert prov["label_dates"] == ["2026-11-20", "2026-11-20"]
    assert "verification" in prov and prov["verification"]["sources"] == {"histopathology": 90}
    promise = prov["promise"]
    for key in ("fallback_rate", "referral_rate", "melanoma_specificity"):
        lo, hi = promise[key + "_ci"]
        assert 0 <= lo <= promise[key] <= hi <= 1, key
    # sensitivity: the interval of the true rate at an order-statistic threshold (selection
    # included), so the sample's own 100 % may lie above it
    lo, hi = promise["melanoma_sensitivity_ci"]
    assert 0.75 < lo < hi <= 1 and promise["melanoma_sensitivity_bound"] == 0.9
    assert promise["fallback_rate"] <= 0.3 + 1e-9
    assert promise["melanoma_sensitivity"] >= 0.9
    assert set(prov["temperature_fit"]) == {"device", "cloud"}
    chosen = [r for r in pol.coverage if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["n"] == 90
    # the server serves it and the page states the site's operating point
    app = create_app({"DEVICE_BUNDLE": str(bundles["int8"]),
                      "CLOUD_BUNDLE": str(bundles["float32"]), "POLICY_FILE": str(out),
                      "INTERPRETERS": 1, "LOG_JSON": False})
    op = app.test_client().get("/api/v1/policy").get_json()["operating_point"]
    assert op["split"] == "site cases" and op["n"] == 90
    assert op["melanoma_sensitivity"]["ci95"] == promise["melanoma_sensitivity_ci"]
    assert ids


def test_device_answers_only_refit_just_the_referral_threshold(bundles, tmp_path, capsys):
    base = Policy(min_confidence=0.35, mel_band_low=0.2, mel_band_high=0.4,
                  temperature={"device": {"melanoma": 1.5}})
    base_file = base.save(tmp_path / "base.json")
    _site(bundles, tmp_path / "c", 60, 30, policy=base_file, keep=False)
    out = tmp_path / "p.json"
    rc = main(["calibrate", "--cases", str(tmp_path / "c"), "--device", str(bundles["int8"]),
               "--cloud", str(bundles["float32"]), "--policy", str(base_file),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "mode: device only" in err and "refitting only the referral threshold" in err
    assert "no labelled case has a kept photo" in err
    pol = Policy.load(out)
    same = {k: v for k, v in pol.thresholds().items() if k != "refer_threshold"}
    assert same == {k: v for k, v in base.thresholds().items() if k != "refer_threshold"}
    assert pol.temperature == base.temperature and pol.refer_threshold is not None
    assert pol.provenance["mode"] == "device only"
    # calibrate_site itself: the replayed answers are the logged ones
    log = CaseLog(tmp_path / "c")
    data = site_data(log)
    results, mode = results_from_cases(data.cases)
    log.close()
    assert mode == "device only" and len(results) == 60
    cal = calibrate_site(results, device_threshold=0.31, conservative=Policy.conservative(0.31),
                         base=base, refit_fallback=False)
    assert cal.policy.refer_threshold == pol.refer_threshold


def test_report_flags_drift_only_outside_the_prediction_interval(bundles, tmp_path, capsys):
    row = {"chosen": True, "n": 400, "n_melanoma": 40, "n_not_melanoma": 360,
           "fallback_rate": 0.05, "referral_rate": 1.0, "melanoma_sensitivity": 1.0,
           "melanoma_specificity": 0.0}
    promised = Policy(coverage=(row,), provenance={"split": "val"}).save(tmp_path / "p.json")
    ids = _site(bundles, tmp_path / "c", 30, 5, policy=promised)
    out = tmp_path / "report"
    assert main(["report", "--cases", str(tmp_path / "c"), "--out", str(out), "--policy",
                 str(promised)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    fb, ref = rep["rates"]["fallback"], rep["rates"]["referral"]
    assert fb["n"] == 30 and fb["promise"] == 0.05
    lo, hi = fb["prediction_counts"]
    assert fb["drift"] is (not lo <= fb["k"] <= hi)
    assert fb["k"] > hi and fb["drift"]  # the default thresholds fall back on most cases
    assert ref["drift"] is (not ref["prediction_counts"][0] <= ref["k"] <=
                            ref["prediction_counts"][1])
    assert "DRIFT" in printed
    assert rep["cases"]["total"] == 30 and rep["labelled"]["n_melanoma"] == 5
    assert rep["labelled"]["verification"]["sources"] == {"histopathology": 30}
    assert sum(b["n"] for b in rep["reliability"]["bins"]) == 30
    assert rep["latency"] and rep["latency"][0]["build"] == "server"
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 4 and "Reliability" in html and "DRIFT" in html
    # the export lists the same cases with their labels
    csv_out = tmp_path / "cases.csv"
    assert main(["cases", "export", "--cases", str(tmp_path / "c"), "--out",
                 str(csv_out)]) == 0
    got = {r["case_id"]: r for r in csv.DictReader(csv_out.read_text().splitlines())}
    assert set(got) == set(ids)
    assert sum(r["label_diagnosis"] == "mel" for r in got.values()) == 5
    assert short_code(ids[0]) == got[ids[0]]["code"]
