"""export: conversion per mode, names by signature, int8 checks, validation gates, bundle, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import make_run_dir, set_constant_heads

from dermedge.artifacts import read_bundle
from dermedge.labels import DIAGNOSIS_LABELS
from dermedge.litert import LiteModel, run_tflite
from export.api import QuantizationConfig, Tolerances, export_run
from export.cli import main
from export.errors import DermedgeError, QuantizationCheckError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")

MODES = {"float32": QuantizationConfig.float32(), "float16": QuantizationConfig.float16(),
         "dynamic": QuantizationConfig.dynamic(), "int8": QuantizationConfig.int8(30)}
BUNDLE_FILES = {"model.tflite", "labels_diagnosis.txt", "labels_melanoma.txt", "model_card.json",
                "validation.json", "validation.md", "USAGE.md"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs"), size=32)


@pytest.fixture(scope="module")
def bundles(run_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("exports")
    # 28 val images: the input gate's ood threshold sits at their top, where one of them may
    # flip between the float and the converted model (the default is for real validation sets)
    tol = {m: Tolerances.for_mode(m).with_overrides({"gate_agreement": 0.95}) for m in MODES}
    return {m: export_run(run_dir, cfg, out / m, tolerances=tol[m]) for m, cfg in MODES.items()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_converts_and_bundle_matches_contract(bundles, mode):
    res = bundles[mode]
    assert res.passed is True, res.failed
    assert {p.name for p in res.path.iterdir()} == BUNDLE_FILES
    data = (res.path / "model.tflite").read_bytes()
    card = json.loads((res.path / "model_card.json").read_text())
    ex = card["export"]
    assert ex["mode"] == mode and ex["signature"] == "serving_default"
    assert ex["size_bytes"] == len(data) and ex["sha256"] == hashlib.sha256(data).hexdigest()
    assert ex["validation"]["passed"] is True
    assert card["heads"]["diagnosis"]["labels"] == list(DIAGNOSIS_LABELS)
    assert (res.path / "labels_diagnosis.txt").read_text().split() == list(DIAGNOSIS_LABELS)
    assert (res.path / "labels_melanoma.txt").read_text().split() == ["melanoma"]
    # The card's tensor details are the model's, by name.
    lite = LiteModel.load(res.path / "model.tflite")
    sig = lite.interpreter.get_signature_list()["serving_default"]
    # the heads, and the input gate's ood score (export/gate.py), by name; dynamic-range
    # quantization would lose the score's residual term, so it ships none and says why
    heads = {"melanoma", "diagnosis"} | ({"ood"} if mode != "dynamic" else set())
    assert sig["inputs"] == ["image"] and set(sig["outputs"]) == heads
    assert lite.io == {"inputs": ex["inputs"], "outputs": ex["outputs"]}
    assert ex["outputs"]["melanoma"]["shape"] == [1, 1]
    if mode == "dynamic":
        assert card["gate"]["thresholds"]["ood_max"] is None and card["gate"]["ood"] is None
        assert card["gate"]["validation"] is None and "dynamic-range" in card["gate"]["note"]
        assert card["gate"]["thresholds"]["sharpness_min"] is not None  # quality: measured
    else:
        assert ex["outputs"]["ood"]["shape"] == [1, 1]
        assert card["gate"]["thresholds"]["ood_max"] is not None
        assert card["gate"]["validation"]["passed"] is True
    assert ex["outputs"]["diagnosis"]["shape"] == [1, 7]
    # Mobile-ready: the signature's batch is fixed to 1 (LiteRT.js refuses a dynamic batch).
    detail = lite.interpreter.get_signature_runner("serving_default").get_input_details()
    assert list(detail["image"]["shape_signature"]) == [1, 32, 32, 3]
    report = json.loads((res.path / "validation.json").read_text())
    assert report["validation"]["passed"] is True and report["validation"]["n"] == 28
    assert "PASSED" in (res.path / "validation.md").read_text()
    usage = (res.path / "USAGE.md").read_text()
    assert "runSignature" in usage and 'output(named: "melanoma")' in usage
    assert f"`{ex['inputs']['image']['dtype']}`" in usage


def test_fix_batch_changes_only_the_signature(run_dir):
    from export.batch import batch_size, fix_batch
    from export.convert import convert_model
    from export.rundir import open_run

    conv = convert_model(open_run(run_dir).load_model(), QuantizationConfig.float32())
    assert batch_size(conv.tflite) is None  # the converter's file: dynamic batch
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    fixed, report = fix_batch(conv.tflite, images)
    assert batch_size(fixed) == 1 and report["tensors_changed"] > 0
    a, b = LiteModel.load(conv.tflite), LiteModel.load(fixed)
    for name, out in a.predict(images, batch_size=3).items():  # a batched call still works
        np.testing.assert_array_equal(out, b.predict(images, batch_size=3)[name])
    assert fix_batch(fixed, images) == (fixed, {"batch": 1, "tensors_changed": 0})


def test_float_modes_match_keras_tightly(bundles):
    for mode in ("float32", "float16"):
        v = bundles[mode].report["validation"]
        assert v["heads"]["diagnosis"]["top1_agreement"] == 1.0
        assert v["heads"]["diagnosis"]["max_abs_diff"] < (1e-4 if mode == "float32" else 2e-2)


def test_agreement_by_margin_separates_near_ties_from_confident_flips(bundles):
    from export.validate import agreement_by_margin

    # 3 near-ties (margin 0.02) all flipped, 2 confident answers (margin 0.9) kept
    pf = np.array([[0.51, 0.49, 0]] * 3 + [[0.95, 0.05, 0]] * 2)
    pl = np.array([[0.49, 0.51, 0]] * 3 + [[0.90, 0.10, 0]] * 2)
    rows = {tuple(b["margin"]): b for b in agreement_by_margin(pf, pl)}
    assert rows[(0.0, 0.05)] == {"margin": [0.0, 0.05], "n": 3, "agreement": 0.0}
    assert rows[(0.4, 1.0)]["n"] == 2 and rows[(0.4, 1.0)]["agreement"] == 1.0
    assert rows[(0.1, 0.2)] == {"margin": [0.1, 0.2], "n": 0, "agreement": None}
    # in a real report the bins cover every validation image
    v = bundles["int8"].report["validation"]
    assert sum(b["n"] for b in v["heads"]["diagnosis"]["agreement_by_margin"]) == v["n"]
    assert "by the float model's top-1 − top-2 margin" in (
        bundles["int8"].path / "validation.md").read_text()


def test_int8_is_really_int8(bundles):
    ex = bundles["int8"].card["export"]
    assert ex["inputs"]["image"]["dtype"] == "uint8"
    # Raw camera pixels map one to one: scale 1, zero point 0.
    assert ex["inputs"]["image"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert {o["dtype"] for o in ex["outputs"].values()} == {"uint8"}
    assert ex["checks"]["verified_mode"] == "int8"
    assert ex["checks"]["integer_tensor_fraction"] > 0.8
    assert ex["representative_images"] == 30
    # a dynamic-range model must not pass as int8
    from export.convert import verify_mode

    dyn = (bundles["dynamic"].path / "model.tflite").read_bytes()
    with pytest.raises(QuantizationCheckError, match="not a real int8"):
        verify_mode(dyn, "int8", "uint8")
    verify_mode(dyn, "dynamic")  # and it is a real dynamic-range model


@pytest.mark.parametrize("mode", list(MODES))
def test_heads_are_addressed_by_name(tmp_path, mode):
    """Constant heads (melanoma 0.9, diagnosis argmax df) would fail if heads were swapped."""
    import keras

    from trainer.model import build_model

    keras.utils.set_random_seed(0)
    model = set_constant_heads(build_model("tiny_cnn", input_size=32, weights=None),
                               p_melanoma=0.9, diagnosis_argmax=3)
    run = make_run_dir(tmp_path, size=32, model=model, train_per_class=2, val_per_class=1)
    cfg = QuantizationConfig.int8(14) if mode == "int8" else MODES[mode]
    res = export_run(run, cfg, tmp_path / "b", validate=False)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = run_tflite(res.path, imgs)
    assert out["melanoma"].shape == (3, 1) and out["diagnosis"].shape == (3, 7)
    np.testing.assert_allclose(out["melanoma"], 0.9, atol=0.01)
    assert (out["diagnosis"].argmax(1) == 3).all()
    np.testing.assert_allclose(out["diagnosis"].sum(1), 1.0, atol=0.02)


def test_run_tflite_matches_keras(bundles, run_dir):
    import keras

    from trainer.data import load_image, read_splits

    splits = read_splits(run_dir / "splits.csv")
    imgs = np.stack([load_image(p, 32) for p in splits["path"][:6]])
    model = keras.saving.load_model(run_dir / "model.keras")
    ref = model(imgs.astype(np.float32), training=False)
    for mode, tol in (("float32", 1e-5), ("int8", 0.05)):
        out = run_tflite(read_bundle(bundles[mode].path), imgs, batch_size=4)
        for head in ("melanoma", "diagnosis"):
            np.testing.assert_allclose(out[head], np.asarray(ref[head]), atol=tol)


def test_failed_gate_exits_3_names_metric_and_keeps_report(run_dir, tmp_path, capsys):
    out = tmp_path / "dyn"
    rc = main(["tflite", str(run_dir), "--dynamic", "--out", str(out),
               "--tolerance", "max_abs_diff=0", "diagnosis_agreement=1.0"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "Validation FAILED" in err and "max_abs_diff" in err and "exceeds the maximum" in err
    report = json.loads((out / "validation.json").read_text())
    assert report["validation"]["passed"] is False
    assert json.loads((out / "model_card.json").read_text())["export"]["validation"]["passed"] \
        is False
    assert "FAILED" in (out / "validation.md").read_text()


def test_cli_exports_default_out_and_reexport_replaces(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tflite", str(run_dir)]) == 0
    out = tmp_path / "exports" / "tiny-float32"
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    assert "validation: passed" in capsys.readouterr().out
    assert main(["tflite", str(run_dir), "--out", str(out), "--no-validate"]) == 0
    assert json.loads((out / "validation.json").read_text())["validation"]["skipped"] is True
    assert _leftovers(out.parent) == []


def test_keep_float_and_debugger(run_dir, tmp_path, capsys):
    out = tmp_path / "kf"
    rc = main(["tflite", str(run_dir), "--int8", "--representative", "20", "--out", str(out),
               "--keep-float", "block3_conv", "MEAN", "--debug"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "validation.json").read_text())
    assert report["denylisted"]["ops"] == ["MEAN"]
    assert any("block3_conv" in n for n in report["denylisted"]["nodes"])
    top = report["debug"]["top"]
    assert 1 <= len(top) <= 10
    assert [r["rmse_over_scale"] for r in top] == sorted((r["rmse_over_scale"] for r in top),
                                                         reverse=True)
    assert "largest error" in (out / "validation.md").read_text()
    card = json.loads((out / "model_card.json").read_text())
    assert card["export"]["inputs"]["image"]["dtype"] == "uint8"
    assert card["export"]["keep_float"] == ["block3_conv", "MEAN"]


def test_int8_io_choice(run_dir, tmp_path):
    res = export_run(run_dir, QuantizationConfig.int8(20, io_dtype="float32"), tmp_path / "f",
                     validate=True)
    ex = res.card["export"]
    assert ex["inputs"]["image"]["dtype"] == "float32"
    assert ex["outputs"]["melanoma"]["dtype"] == "float32"
    assert ex["checks"]["integer_tensor_fraction"] > 0.5 and res.passed


def test_int8_uint8_in_float32_out(run_dir, tmp_path):
    """Camera pixels in, dequantized probabilities out: a full-integer body, float outputs."""

    res = export_run(run_dir, QuantizationConfig.int8(20, output_dtype="float32"),
                     tmp_path / "mixed", validate=True)
    ex = res.card["export"]
    assert ex["inputs"]["image"]["dtype"] == "uint8"
    assert ex["inputs"]["image"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert {o["dtype"] for o in ex["outputs"].values()} == {"float32"}
    assert ex["checks"]["verified_mode"] == "int8"
    assert ex["checks"]["integer_tensor_fraction"] > 0.5
    report = json.loads((tmp_path / "mixed" / "validation.json").read_text())
    assert report["config"]["output_dtype"] == "float32" and report["validation"]["n"] > 0
    usage = (tmp_path / "mixed" / "USAGE.md").read_text()
    assert "uint8 RGB pixels 0–255" in usage and "they are float32 probabilities" in usage
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = run_tflite(tmp_path / "mixed", x)
    assert out["diagnosis"].dtype == np.float32
    # dequantized from the int8 softmax: each of 7 values within half a 1/256 step
    np.testing.assert_allclose(out["diagnosis"].sum(axis=1), 1.0, atol=3.5 / 256)
    # the outputs are what the mode checker now expects, and not what a uint8-out model has
    from export.convert import verify_mode

    tfl = (tmp_path / "mixed" / "model.tflite").read_bytes()
    verify_mode(tfl, "int8", "uint8", "float32")
    with pytest.raises(QuantizationCheckError, match="uint8 but are"):
        verify_mode(tfl, "int8", "uint8")


def test_keep_float_heads_with_uint8_input_and_float_output(run_dir, tmp_path):
    cfg = QuantizationConfig.int8(20, output_dtype="float32",
                                  keep_float=("FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"))
    res = export_run(run_dir, cfg, tmp_path / "fh", validate=False)
    ex = res.card["export"]
    assert ex["inputs"]["image"]["dtype"] == "uint8"
    assert {o["dtype"] for o in ex["outputs"].values()} == {"float32"}
    report = json.loads((tmp_path / "fh" / "validation.json").read_text())
    assert set(report["denylisted"]["ops"]) == {"FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"}
    assert ex["keep_float"] == ["FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"]
    # with integer outputs the float heads cannot be honoured: a clear error, no bundle
    bad = QuantizationConfig.int8(20, keep_float=("FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"))
    with pytest.raises(DermedgeError, match="Pass --output-io float32"):
        export_run(run_dir, bad, tmp_path / "bad", validate=False)
    assert not (tmp_path / "bad").exists()


def test_float_heads_flag(run_dir, tmp_path, capsys):
    out = tmp_path / "fh"
    rc = main(["tflite", str(run_dir), "--int8", "--representative", "20", "--float-heads",
               "--keep-float", "MEAN", "--out", str(out), "--no-validate"])
    assert rc == 0, capsys.readouterr().err
    ex = json.loads((out / "model_card.json").read_text())["export"]
    assert ex["inputs"]["image"]["dtype"] == "uint8"
    assert {o["dtype"] for o in ex["outputs"].values()} == {"float32"}
    assert ex["keep_float"] == ["MEAN", "FULLY_CONNECTED", "SOFTMAX", "LOGISTIC"]
    assert ex["checks"]["verified_mode"] == "int8"


def _break(run: Path, how: str) -> Path:
    if how == "no_card":
        (run / "model_card.json").unlink()
    elif how == "bad_json":
        (run / "model_card.json").write_text("{not json")
    elif how == "card_fields":
        card = json.loads((run / "model_card.json").read_text())
        del card["heads"]["melanoma"]["threshold"]
        card["input"]["shape"] = [32, 3]
        (run / "model_card.json").write_text(json.dumps(card))
    elif how == "corrupt_model":
        (run / "model.keras").write_bytes(b"PK\x03\x04 this is not a keras file")
    elif how == "no_model":
        (run / "model.keras").unlink()
    return run


@pytest.mark.parametrize("how, args, message", [
    ("missing", [], "does not exist"),
    ("no_card", [], "no model_card.json"),
    ("bad_json", [], "not valid JSON"),
    ("card_fields", [], "heads.melanoma.threshold"),
    ("corrupt_model", [], "Cannot load"),
    ("no_model", [], "no model.keras"),
    ("ok", ["--int8", "--representative", "100"], "has only 42"),
    ("ok", ["--int8", "--representative", "5"], "at least 10"),
    ("ok", ["--int8", "--float16"], "not allowed with"),
    ("ok", ["--io", "uint8"], "only applies to int8"),
    ("ok", ["--float16", "--output-io", "uint8"], "only applies to int8"),
    ("ok", ["--float16", "--float-heads"], "Drop --float-heads"),
    ("ok", ["--int8", "--float-heads", "--output-io", "uint8"], "--output-io is uint8"),
    ("ok", ["--keep-float", "block3_conv"], "only applies to int8"),
    ("ok", ["--tolerance", "diagnosis_agrement=0.9"], "did you mean 'diagnosis_agreement'"),
    ("ok", ["--tolerance", "diagnosis_agreement=2"], "must lie in [0, 1]"),
    ("ok", ["--int8", "--representative", "20", "--keep-float", "blok3_conv"],
     "did you mean 'block3_conv'"),
    ("ok", ["--split", "test"], "no 'test' rows"),
    ("ok", ["--bogus"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_clear_error_and_no_bundle(run_dir, tmp_path, capsys, how, args,
                                                          message):
    import shutil

    if how == "missing":
        run = tmp_path / "nope"
    elif how == "ok":
        run = run_dir
    else:
        run = tmp_path / "run"
        shutil.copytree(run_dir, run)
        _break(run, how)
    out = tmp_path / "exports" / "b"
    rc = main(["tflite", str(run), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err and "\npython -m export: error: " in "\n" + err
    assert not out.exists()
    assert not (tmp_path / "exports").exists() or _leftovers(tmp_path / "exports") == []


def test_refuses_to_replace_a_non_bundle_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["tflite", str(run_dir), "--out", str(out), "--no-validate"]) == 2
    assert "not an export bundle" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_config_named_constructors_and_tolerances():
    assert QuantizationConfig.int8().representative_images == 300
    assert QuantizationConfig.int8().io_dtype == "uint8"
    assert QuantizationConfig.float16().io_dtype == "float32"
    with pytest.raises(DermedgeError, match="did you mean 'int8'"):
        QuantizationConfig("int9")
    with pytest.raises(DermedgeError, match="only applies to int8"):
        QuantizationConfig("dynamic", io_dtype="uint8")
    with pytest.raises(DermedgeError, match="--output-io int8 only applies to int8"):
        QuantizationConfig("float16", output_dtype="int8")
    with pytest.raises(DermedgeError, match="Unknown output dtype 'float64'"):
        QuantizationConfig.int8(output_dtype="float64")
    assert QuantizationConfig.int8().out_dtype == "uint8"
    assert QuantizationConfig.int8(output_dtype="float32").out_dtype == "float32"
    t = Tolerances().with_overrides(["melanoma_auc_drop=none", "diagnosis_agreement=0.9"])
    assert t.melanoma_auc_drop is None and t.diagnosis_agreement == 0.9
    assert Tolerances.for_mode("float32").max_abs_diff is not None
    with pytest.raises(DermedgeError, match="NAME=VALUE"):
        Tolerances().with_overrides(["diagnosis_agreement"])


def test_bench_cli(bundles, tmp_path, capsys):
    js = tmp_path / "bench.json"
    rc = main(["bench", str(bundles["int8"].path), str(bundles["float32"].path / "model.tflite"),
               "--runs", "5", "--warmup", "1", "--threads", "1", "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "int8" in out
    res = json.loads(js.read_text())
    assert [r["mode"] for r in res] == ["int8", "?"]
    for r in res:
        assert r["runs"] == 5 and 0 < r["median_ms"] <= r["p90_ms"]
        assert r["size_bytes"] == Path(r["model"]).stat().st_size
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "neither a bundle" in capsys.readouterr().err


def test_no_gate_exports_the_two_heads_only_and_the_demo_checks_quality(run_dir, bundles,
                                                                        tmp_path):
    from edge_demo.tiers import Tier

    res = export_run(run_dir, QuantizationConfig.float32(), tmp_path / "nogate", gate=False)
    assert res.passed is True and "gate" not in res.card
    assert set(res.card["export"]["outputs"]) == {"melanoma", "diagnosis"}
    assert res.card["export"]["metadata"]["output_order"] == ["melanoma", "diagnosis"]
    assert Tier.from_bundle(res.path).has_ood is False
    gated = bundles["float32"]
    assert Tier.from_bundle(gated.path).has_ood is True
    # the ood head: the same heads' outputs, a few kB more (2 x components x features)
    assert 0 < gated.tflite_bytes - res.tflite_bytes < 4 * 3 * gated.card["gate"]["ood"][
        "head_weights"]
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = run_tflite(res.path, images), run_tflite(gated.path, images)
    np.testing.assert_allclose(a["diagnosis"], b["diagnosis"], atol=1e-6)
    assert b["ood"].shape == (4, 1) and ((0 <= b["ood"]) & (b["ood"] <= 1)).all()
