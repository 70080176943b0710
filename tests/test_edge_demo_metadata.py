"""Optional age/sex/site on a demo request: applied with the bundle card's metadata tables."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from ci import need

need("flask", "the demo extra installs it")
need("ai_edge_litert", "the core install has it")

from demo_fixtures import (  # noqa: E402
    META_THRESHOLD,
    demo_prior,
    jpeg_bytes,
    tiny_bundles,
    with_metadata_tables,
)

from dermedge.labels import DIAGNOSIS_LABELS  # noqa: E402
from edge_demo.app import create_app  # noqa: E402
from edge_demo.cli import main as demo_main  # noqa: E402
from edge_demo.metadata import adjust, parse  # noqa: E402
from trainer.metadata import apply_prior  # noqa: E402


@pytest.fixture(scope="module")
def meta_bundles(tmp_path_factory):
    """The tiny int8/float32 bundles, copied, with metadata tables in their cards."""
    root = tmp_path_factory.mktemp("meta-bundles")
    return {kind: with_metadata_tables(tiny_bundles()[kind], root / kind)
            for kind in ("int8", "float32")}


def _client(device, cloud):
    return create_app({"DEVICE_BUNDLE": str(device), "CLOUD_BUNDLE": str(cloud),
                       "INTERPRETERS": 1, "LOG_JSON": False}).test_client()


def _post(client, **fields):
    return client.post("/api/v1/classify",
                       data={"image": (io.BytesIO(jpeg_bytes()), "p.jpg"), **fields},
                       content_type="multipart/form-data")


def test_metadata_updates_both_tiers_like_the_trainer(meta_bundles):
    client = _client(meta_bundles["int8"], meta_bundles["float32"])
    plain = _post(client).get_json()
    assert "metadata_used" not in plain["device"] and plain["metadata"]["received"] == {}
    body = _post(client, age="77", sex="Female", site="face").get_json()
    assert body["metadata"]["received"] == {"age": 77.0, "sex": "female", "site": "face"}
    assert body["metadata"]["tables"] == {"device": True, "cloud": True}
    prior = demo_prior()
    for tier in ("device", "cloud"):
        before, after = plain[tier], body[tier]
        assert after["metadata_used"] == ["age", "sex", "site"]
        assert after["image_only"] == {"melanoma": before["melanoma"], "top": before["top"]}
        # the demo's consumer code gives the trainer's numbers
        probs = np.array([[before["diagnosis"][k] for k in DIAGNOSIS_LABELS]])
        p_mel, expect, used = apply_prior(prior, np.array([before["melanoma"]]), probs,
                                          [{"age": 77, "sex": "female", "site": "face"}])
        assert used.tolist() == [3]
        np.testing.assert_allclose([after["diagnosis"][k] for k in DIAGNOSIS_LABELS],
                                   expect[0], rtol=1e-9, atol=1e-12)
        assert after["melanoma"] == pytest.approx(p_mel[0], rel=1e-9)
        assert after["top"]["label"] == "mel"  # face, 70s, female: all melanoma in the table
    assert body["metadata"]["used"] == {"device": ["age", "sex", "site"],
                                        "cloud": ["age", "sex", "site"]}
    # the referral threshold is the tables' own, chosen for the updated probabilities
    risk = next(c for c in body["advice"]["checks"] if c["id"] == "melanoma_risk")
    assert risk["threshold"] == META_THRESHOLD


def test_partial_unknown_or_absent_tables_keep_the_photo_answer(meta_bundles):
    client = _client(meta_bundles["int8"], meta_bundles["float32"])
    plain = _post(client).get_json()
    odd = _post(client, site="left earlobe", sex="unknown").get_json()  # not in the tables
    assert odd["device"] == plain["device"] | {"latency_ms": odd["device"]["latency_ms"]}
    assert odd["metadata"]["used"] == {"device": [], "cloud": []}
    part = _post(client, site="back").get_json()
    assert part["device"]["metadata_used"] == ["site"]
    assert part["device"]["diagnosis"]["nv"] > plain["device"]["diagnosis"]["nv"]
    bare = tiny_bundles()  # cards without tables: metadata is accepted and ignored
    b = _post(_client(bare["int8"], bare["float32"]), age="50", site="back").get_json()
    assert b["metadata"]["tables"] == {"device": False, "cloud": False}
    assert "metadata_used" not in b["device"]


def test_metadata_in_the_query_string_with_the_photo_as_the_body(meta_bundles):
    client = _client(meta_bundles["int8"], meta_bundles["float32"])
    want = _post(client, age="77", sex="female", site="face").get_json()
    raw = client.post("/api/v1/classify?age=77&sex=female&site=face", data=jpeg_bytes(),
                      content_type="image/jpeg").get_json()
    assert raw["metadata"] == want["metadata"]
    assert raw["device"]["diagnosis"] == want["device"]["diagnosis"]
    # multipart takes query fields too, but one field in both places is ambiguous
    mixed = client.post("/api/v1/classify?site=face",
                        data={"image": (io.BytesIO(jpeg_bytes()), "p.jpg"), "age": "77"},
                        content_type="multipart/form-data").get_json()
    assert mixed["metadata"]["received"] == {"age": 77.0, "site": "face"}
    both = client.post("/api/v1/classify?age=60",
                       data={"image": (io.BytesIO(jpeg_bytes()), "p.jpg"), "age": "77"},
                       content_type="multipart/form-data")
    assert both.status_code == 400
    err = both.get_json()["error"]
    assert err["code"] == "bad_metadata" and "'age'" in err["message"]
    bad = client.post("/api/v1/classify?age=old", data=jpeg_bytes(), content_type="image/jpeg")
    assert bad.status_code == 400 and "'age' must be a number" in bad.get_json()["error"][
        "message"]


@pytest.mark.parametrize("fields, message", [
    ({"age": "old"}, "'age' must be a number of years from 0 to 120"),
    ({"age": "-4"}, "'age' must be a number of years"),
    ({"sex": "x"}, "'sex' must be one of male, female"),
    ({"site": "<script>"}, "'site' must be a body site in words"),
])
def test_bad_metadata_is_a_400_json_error(meta_bundles, fields, message):
    resp = _post(_client(meta_bundles["int8"], meta_bundles["float32"]), **fields)
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["code"] == "bad_metadata" and message in err["message"]


def test_page_offers_the_sites_the_tables_know(meta_bundles):
    html = _client(meta_bundles["int8"], meta_bundles["float32"]).get("/").get_data(
        as_text=True)
    assert 'id="age-input"' in html and 'id="sex-input"' in html
    for site in ("back", "face", "scalp"):
        assert f'<option value="{site}">{site}</option>' in html


def test_cli_predict_takes_metadata(meta_bundles, capsys, tmp_path):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(jpeg_bytes())
    assert demo_main(["predict", "--device", str(meta_bundles["int8"]), "--site", "face",
                      "--age", "75", str(photo)]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["device"]["metadata_used"] == ["age", "site"]
    assert demo_main(["predict", "--device", str(meta_bundles["int8"]), "--age", "abc",
                      str(photo)]) == 2
    assert "'age' must be a number" in capsys.readouterr().err


def test_parse_and_adjust_units():
    assert parse({}) is None and parse({"age": " ", "sex": "", "site": "unknown"}) is None
    assert parse({"age": "45.5", "site": " Lower  Extremity "}) == \
        {"age": 45.5, "site": "lower extremity"}
    answer = {"melanoma": 0.3, "diagnosis": dict.fromkeys(DIAGNOSIS_LABELS, 1 / 7),
              "top": {"label": "akiec", "probability": 1 / 7}, "latency_ms": 1.0}
    same, used = adjust(answer, demo_prior(), {"site": "moon"})
    assert same is answer and used == []
    new, used = adjust(answer, demo_prior(), {"age": 79.9})  # bin "70-79": mel and bcc ages
    assert used == ["age"] and new["top"]["label"] in ("mel", "bcc")
    assert new["melanoma"] > 0.3 and new["image_only"]["melanoma"] == 0.3
    assert adjust(answer, demo_prior(), {"age": 120.0})[1] == []  # "80+": not in these tables
