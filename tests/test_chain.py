"""The whole chain on real artifacts: toy data -> `trainer fit` -> `python -m export tflite
--int8` -> `edge-demo serve` (waitress) -> HTTP classify, against the run's Keras model.

The fixtures (conftest.py ``chain_*``) run each stage's real CLI on the previous stage's
output, once per session.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_card import doc_json_after, doc_table_names

from dermedge.card import read_card
from dermedge.image import load_image
from export.refused import REFUSED_NOTICE

N_IMAGES = 6


def post_image(url: str, path: Path) -> dict:
    """POST ``path`` as the multipart field ``image``, the way the page does."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{path.name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() \
        + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/api/v1/classify", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; "
                                                          f"boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


def test_served_answers_match_the_runs_keras_model(chain_run, chain_bundle, chain_server):
    import keras

    card = read_card(chain_bundle)
    assert card.export["validation"]["passed"] is True
    report = json.loads((chain_bundle / "validation.json").read_text())["validation"]
    # What the export measured over the whole val split: the served answers must stay inside it.
    measured = max(report["heads"]["diagnosis"]["max_abs_diff"],
                   report["heads"]["melanoma"]["max_abs_diff"])
    assert measured < 0.25
    splits = pd.read_csv(chain_run / "splits.csv")
    val = splits[splits["split"] == "val"].head(N_IMAGES)
    model = keras.saving.load_model(chain_run / "model.keras", compile=False)
    labels = list(card.diagnosis_labels)
    agree = 0
    for path in val["path"]:
        body = post_image(chain_server, Path(path))
        device = body["device"]
        assert list(device["diagnosis"]) == labels
        out = model(load_image(path, card.input_size)[None].astype("float32"), training=False)
        want_d = np.asarray(out["diagnosis"], np.float64)[0]
        want_m = float(np.asarray(out["melanoma"])[0, 0])
        got_d = np.array([device["diagnosis"][c] for c in labels])
        assert np.max(np.abs(got_d - want_d)) <= measured + 1e-6, path
        assert abs(device["melanoma"] - want_m) <= measured + 1e-6, path
        agree += device["top"]["label"] == labels[int(want_d.argmax())]
    assert agree / len(val) >= report["tolerances"]["diagnosis_agreement"] - 1 / len(val)


def test_the_card_flows_from_run_to_bundle_to_server(chain_run, chain_bundle, chain_server):
    run = read_card(chain_run)
    bundle = read_card(chain_bundle, need_export=True)
    assert run.synthetic is True and bundle.synthetic is True  # trained on `trainer toy-data`
    without_export = bundle.to_dict()
    without_export.pop("export")
    gate = without_export.pop("gate")  # the input gate, measured by the export
    assert without_export == run.to_dict()
    assert gate["ood"]["output"] == "ood" and "ood" in bundle.export["outputs"]
    assert gate["thresholds"]["min_side"] == run.input_size
    with urllib.request.urlopen(chain_server + "/api/v1/models", timeout=10) as r:
        models = json.loads(r.read())
    served = models["device"]["card"]
    assert served["data"]["synthetic"] is True
    assert served["export"]["sha256"] == bundle.export["sha256"]
    assert served["heads"]["melanoma"]["threshold"] == run.melanoma_threshold


def test_artifacts_md_describes_the_real_run_and_bundle(chain_run, chain_bundle):
    """The documented card and export section have the keys the real stages write."""
    real = read_card(chain_run).to_dict()
    doc = doc_json_after("`model_card.json` (schema version 1)")
    assert list(doc) == [k for k in real if k != "metadata_prior"]
    assert set(doc["training"]) == set(real["training"])
    assert set(doc["training"]["distribution"]) == set(real["training"]["distribution"])
    assert set(doc["data"]) == set(real["data"])
    assert set(doc["versions"]) == set(real["versions"])
    export_doc = doc_json_after("## The export bundle")
    export_real = read_card(chain_bundle).export
    assert set(export_doc["export"]) - {"..."} <= set(export_real)
    assert set(export_doc["export"]["inputs"]["image"]) == set(export_real["inputs"]["image"])
    files = sorted(p.name for p in chain_bundle.iterdir())
    # a passing bundle: every documented file but the refused export's notice
    assert files == sorted(set(doc_table_names("## The export bundle")) - {REFUSED_NOTICE})


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(schema_version=7), "schema_version is 7"),
    (lambda c: c["heads"]["diagnosis"].update(labels=[]), "heads.diagnosis.labels"),
])
def test_demo_and_export_refuse_a_broken_real_card(chain_run, chain_bundle, tmp_path, capsys,
                                                   mutate, needle):
    import shutil

    from edge_demo.cli import main as demo_main
    from export.cli import main as export_main

    bundle, run = tmp_path / "bundle", tmp_path / "run"
    shutil.copytree(chain_bundle, bundle)
    shutil.copytree(chain_run, run)
    for folder in (bundle, run):
        card = json.loads((folder / "model_card.json").read_text())
        mutate(card)
        (folder / "model_card.json").write_text(json.dumps(card))
    assert demo_main(["predict", "--device", str(bundle), str(chain_bundle / "USAGE.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-demo") and ": error: " in err and needle in err
    assert "Traceback" not in err
    assert export_main(["tflite", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
