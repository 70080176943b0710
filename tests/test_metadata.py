"""Patient metadata (age/sex/site) as naive-Bayes evidence on top of the image model."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_fit import toy_data_fixture, trained_run_fixture  # noqa: F401 - session fixtures

from dermedge.labels import DIAGNOSIS_LABELS
from trainer.errors import DermedgeError
from trainer.metadata import (
    age_bin,
    apply_prior,
    field_value,
    fit_prior,
    has_metadata,
    log_likelihood,
    strongest,
)

K = len(DIAGNOSIS_LABELS)
MEL, NV, BKL = (DIAGNOSIS_LABELS.index(d) for d in ("mel", "nv", "bkl"))


def _records(rows):
    return pd.DataFrame(rows, columns=["dx", "age", "sex", "site"])


@pytest.fixture
def train():
    # 4 nv on the back aged 30-39, 2 mel on the face aged 70-79, 2 bkl on the face, one with
    # no metadata at all (it counts for the class prior only).
    rows = [("nv", 35, "male", "back")] * 4 + [("mel", 72, "female", "face")] * 2 + \
        [("bkl", 75, "male", "face"), ("bkl", np.nan, None, "unknown")]
    return _records(rows)


def test_age_bins_and_unknown_values():
    assert [age_bin(a) for a in (0, 9.9, 10, 45, 80, 85, 120)] == \
        ["0-9", "0-9", "10-19", "40-49", "80+", "80+", "80+"]
    assert [age_bin(a) for a in (None, np.nan, -1, 130, "old")] == [None] * 5
    assert field_value("site", "  Lower   Extremity ") == "lower extremity"
    assert [field_value("sex", v) for v in ("unknown", "", None, np.nan, "N/A")] == [None] * 5


def test_tables_are_smoothed_counts_per_class(train):
    prior = fit_prior(train, smoothing=1.0, weight=1.0)
    assert prior["labels"] == list(DIAGNOSIS_LABELS)
    np.testing.assert_allclose(prior["class_prior"][NV], 4 / 8, atol=1e-6)
    site = prior["fields"]["site"]
    assert site["values"] == ["back", "face"] and site["images"] == 7  # "unknown" is no value
    lik = np.exp(np.asarray(site["log_likelihood"]))
    # nv: back 4 + 1, face 0 + 1 over 6; mel: back 0 + 1, face 2 + 1 over 4; empty classes 1/2.
    np.testing.assert_allclose(lik[:, NV], [5 / 6, 1 / 6], atol=1e-5)
    np.testing.assert_allclose(lik[:, MEL], [1 / 4, 3 / 4], atol=1e-5)
    np.testing.assert_allclose(lik[:, DIAGNOSIS_LABELS.index("df")], [0.5, 0.5], atol=1e-5)
    np.testing.assert_allclose(lik.sum(axis=0), 1.0, atol=1e-5)
    assert prior["fields"]["age"]["values"] == ["30-39", "70-79"]
    assert prior["fields"]["sex"]["values"] == ["female", "male"]
    assert prior["fit_on"] == {"split": "train", "images": 8}
    json.dumps(prior)  # the card section is plain JSON


def test_bayes_rule_by_hand(train):
    prior = fit_prior(train, smoothing=1.0, weight=1.0)
    cases = _records([("nv", 71, "female", "face")])
    probs = np.full((1, K), 1 / K)
    p_mel = np.array([0.2])
    new_mel, new, used = apply_prior(prior, p_mel, probs, cases)
    assert used.tolist() == [3]
    ll, _ = log_likelihood(prior, cases)
    expect = probs[0] * np.exp(ll[0])
    np.testing.assert_allclose(new[0], expect / expect.sum(), rtol=1e-9)
    assert new[0].argmax() == MEL  # face, 70s, female: all melanoma in the table
    pi = np.asarray(prior["class_prior"])
    rest = np.arange(K) != MEL
    lr = np.exp(ll[0, MEL]) / (np.exp(ll[0, rest]) @ (pi[rest] / pi[rest].sum()))
    odds = 0.2 / 0.8 * lr
    assert new_mel[0] == pytest.approx(odds / (1 + odds), rel=1e-9)
    # weight tempers the evidence: 0 changes nothing, 0.5 is the square root of the ratio.
    m0, p0, _ = apply_prior(prior, p_mel, probs, cases, weight=0.0)
    np.testing.assert_allclose(p0, probs, atol=1e-12)
    assert m0[0] == pytest.approx(0.2)
    m5, _, _ = apply_prior(prior, p_mel, probs, cases, weight=0.5)
    odds5 = 0.2 / 0.8 * math.sqrt(lr)
    assert m5[0] == pytest.approx(odds5 / (1 + odds5), rel=1e-9)


def test_cases_without_usable_metadata_keep_the_image_answer(train):
    prior = fit_prior(train)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(K), size=3).astype(np.float32)
    p_mel = rng.uniform(size=3).astype(np.float32)
    cases = _records([("nv", None, None, None), ("nv", np.nan, "unknown", "moon"),
                      ("nv", 200, "", "unknown")])
    new_mel, new, used = apply_prior(prior, p_mel, probs, cases)
    assert used.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(new, probs.astype(np.float64))
    np.testing.assert_array_equal(new_mel, p_mel.astype(np.float64))
    # plain dicts (a form, a phone) work like records, and a partial case uses what it has
    _, part, used = apply_prior(prior, p_mel[:1], probs[:1], [{"site": "back"}])
    assert used.tolist() == [1] and part[0, NV] > probs[0, NV]
    assert not has_metadata(cases.iloc[:1]) and has_metadata([{"age": 40}])


def test_bad_input_is_named(train):
    with pytest.raises(DermedgeError, match="carry no age, sex or site"):
        fit_prior(_records([("nv", None, None, None)]))
    with pytest.raises(DermedgeError, match="weight must be a number in"):
        fit_prior(train, weight=-1)
    with pytest.raises(DermedgeError, match="smoothing must be > 0"):
        fit_prior(train, smoothing=0)
    with pytest.raises(DermedgeError, match="not HAM10000 classes"):
        fit_prior(_records([("melanoma", 40, "male", "back")]))
    with pytest.raises(DermedgeError, match="one row per case"):
        apply_prior(fit_prior(train), np.zeros(2), np.zeros((2, K)), _records([]))


def test_strongest_evidence_names_the_class_it_raises(train):
    top = strongest(fit_prior(train), top=3)
    assert len(top) == 3 and all(r["ratio"] > 1 for r in top)
    assert top[0]["ratio"] >= top[1]["ratio"] >= top[2]["ratio"]
    assert {(r["field"], r["value"], r["class"]) for r in top} & {
        ("site", "face", "mel"), ("age", "70-79", "mel"), ("sex", "female", "mel")}


# ----------------------------------------------------------------------------- on a run
@pytest.fixture
def run_copy(trained_run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, dst)
    return dst


def test_fit_stores_the_tables_and_evaluate_applies_them(trained_run, tmp_path):
    from trainer.evaluate import evaluate

    card = json.loads((trained_run.run_dir / "model_card.json").read_text())
    prior = card["metadata_prior"]  # the toy data has age/sex/site, so fit counted them
    assert set(prior["fields"]) == {"age", "sex", "site"}
    assert prior["fit_on"]["images"] == card["data"]["splits"]["train"]
    assert prior["val"]["images"] == card["data"]["splits"]["val"]
    assert prior["metrics"]["val_image_only"] == card["metrics"]["val"]
    assert 0 < prior["melanoma_threshold"] < 1

    m = evaluate(trained_run.run_dir, out=tmp_path / "ev", progress=False, gallery=0)
    meta = m["metadata"]
    assert meta["applied"] is True and meta["weight"] == prior["weight"]
    assert meta["cases_with_metadata"] == prior["val"]["with_metadata"] > 0
    assert meta["image_only"]["balanced_accuracy"] == pytest.approx(
        card["metrics"]["val"]["balanced_accuracy"], abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(
        prior["metrics"]["val"]["balanced_accuracy"], abs=1e-9)
    assert m["melanoma"]["threshold"] == prior["melanoma_threshold"]
    assert "Patient metadata (age/sex/site, weight 0.5) applied to" in \
        (tmp_path / "ev" / "report.md").read_text()


def test_metadata_command_refits_reports_and_removes(run_copy, capsys):
    from trainer.cli import main
    from trainer.evaluate import evaluate

    assert main(["metadata", str(run_copy), "--weight", "1", "--smoothing", "2"]) == 0
    out = capsys.readouterr().out
    assert "metadata tables from" in out and "balanced accuracy" in out and "->" in out
    card = json.loads((run_copy / "model_card.json").read_text())
    assert card["metadata_prior"]["weight"] == 1.0 and card["metadata_prior"]["smoothing"] == 2.0
    assert main(["metadata", str(run_copy), "--remove"]) == 0
    assert "removed" in capsys.readouterr().out
    assert "metadata_prior" not in json.loads((run_copy / "model_card.json").read_text())
    m = evaluate(run_copy, out=run_copy / "ev", progress=False, gallery=0)
    assert m["metadata"]["applied"] is False and "trainer metadata" in m["metadata"]["reason"]


@pytest.mark.parametrize("args, message", [
    (["--weight", "-2"], "weight must be a number in [0, 4]"),
    (["--remove", "--weight", "1"], "--remove takes no --weight"),
    (["--blank"], "carry no age, sex or site"),
])
def test_metadata_command_bad_input_exits_2_and_keeps_the_card(run_copy, capsys, args, message):
    from trainer.cli import main

    if args == ["--blank"]:  # a run whose data had no metadata
        splits = pd.read_csv(run_copy / "splits.csv")
        splits[["age", "sex", "site"]] = np.nan
        splits.to_csv(run_copy / "splits.csv", index=False)
        args = []
    before = (run_copy / "model_card.json").read_bytes()
    assert main(["metadata", str(run_copy), *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err
    assert (run_copy / "model_card.json").read_bytes() == before


def test_bundle_usage_explains_the_tables(train):
    from export.bundle import usage_md

    q = {"scale": 1.0 / 256, "zero_point": 0}
    card = {"name": "r", "backbone": "b", "input": {"shape": [32, 32, 3]},
            "heads": {"melanoma": {"threshold": 0.3},
                      "diagnosis": {"labels": list(DIAGNOSIS_LABELS)}},
            "export": {"mode": "int8", "size_bytes": 10, "sha256": "0" * 64,
                       "validation": {"passed": True}, "signature": "serving_default",
                       "inputs": {"image": {"dtype": "uint8", "shape": [1, 32, 32, 3],
                                            "quantization": {"scale": 1.0, "zero_point": 0}}},
                       "outputs": {h: {"dtype": "uint8", "shape": [1, n], "quantization": q}
                                   for h, n in (("melanoma", 1), ("diagnosis", K))}}}
    assert "Patient metadata" not in usage_md(card)
    card["metadata_prior"] = fit_prior(train) | {"melanoma_threshold": 0.2345}
    text = usage_md(card)
    assert "## Patient metadata (optional)" in text and "**0.2345**" in text
    assert "(age, sex, site;" in text and "0.5 × log_likelihood" in text
