"""Quantization-aware training (``python -m export tflite RUN --int8 --qat``).

The QAT step runs in its own environment (tensorflow + tf-keras + tensorflow-model-optimization,
~2.5 GB), built once by ``export.qat.setup_qat_env`` under ``$DERMEDGE_CACHE`` (default
``~/.cache/dermedge``; about 2 minutes with PyPI access) and reused; ``$DERMEDGE_QAT_PYTHON``
names an existing one instead. Tests that run the worker (marker ``qat``; ``-m "not qat"``
leaves them out) skip, with pip's error, when it cannot be built. Everything else runs in the
core environment, which has neither tf-keras nor tfmot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable
from export_fixtures import make_run_dir

from dermedge.litert import LiteModel
from export.api import QuantizationConfig, export_run
from export.cli import main
from export.errors import ExportError
from export.qat import (
    ENV_VAR,
    QAT_REQUIREMENTS,
    QATError,
    graph_spec,
    layer_weights,
    qat_support,
    setup_qat_env,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")

BUNDLE_FILES = {"model.tflite", "labels_diagnosis.txt", "labels_melanoma.txt", "model_card.json",
                "validation.json", "validation.md", "USAGE.md"}
# Each registry backbone either supports QAT (None) or says why not (a phrase of the message).
SUPPORT = {"tiny_cnn": None, "mobilenet_v2": None, "efficientnet_lite0": None,
           "efficientnet_lite1": None, "efficientnet_lite2": None, "resnet50": None,
           "inception_resnet_v2": "CustomScaleLayer"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs"), size=32)


@pytest.fixture(scope="session")
def qat_python() -> str:
    """The QAT interpreter: $DERMEDGE_QAT_PYTHON, else the cached venv (built on first use)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    try:
        return str(setup_qat_env())
    except QATError as exc:
        unavailable(f"cannot build the QAT environment: {exc}")


def _no_leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.rglob("*") if ".tmp-" in p.name or "dermedge-qat-" in p.name
                  or ".old-" in p.name)


# ----------------------------------------------------------------------------- core environment
def test_core_environment_has_and_imports_no_qat_packages(run_dir):
    """The core suite runs without the QAT extra: nothing on the export path imports it."""
    code = (
        "import importlib.util, os, sys\n"
        "from export.cli import build_parser\n"
        "import export.api, export.qat\n"
        f"args = build_parser().parse_args(['tflite', {str(run_dir)!r}, '--int8', '--qat'])\n"
        "from export.cli import _config\n"
        "cfg = _config(args)\n"
        "assert cfg.qat is not None and cfg.mode == 'int8'\n"
        "bad = [m for m in ('tf_keras', 'tensorflow_model_optimization') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert 'TF_USE_LEGACY_KERAS' not in os.environ\n"
        "print([importlib.util.find_spec(m) is None\n"
        "       for m in ('tf_keras', 'tensorflow_model_optimization')])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The environment the default suite runs in has no QAT packages at all.
    assert proc.stdout.strip().splitlines()[-1] == "[True, True]", proc.stdout


# ----------------------------------------------------------------------------- the flat graph
def test_qat_target_is_checked_and_named():
    assert QuantizationConfig.int8_qat(20).qat.target == "distill"
    assert QuantizationConfig.int8_qat(20, target="labels").qat.target == "labels"
    with pytest.raises(ExportError, match="Unknown QAT target 'distil'; did you mean 'distill'"):
        QuantizationConfig.int8_qat(20, target="distil")


def test_graph_spec_inlines_the_backbone_and_keeps_names():
    import keras

    from trainer.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model("tiny_cnn", input_size=32, weights=None)
    spec = graph_spec(model)
    names = [lay["name"] for lay in spec["layers"]]
    assert "backbone" not in names and "input" not in names  # sub-model and its input inlined
    assert names[:3] == ["image", "preprocess_scale", "block1_conv"]
    by_name = {lay["name"]: lay for lay in spec["layers"]}
    assert by_name["block1_conv"]["args"] == [{"ref": "preprocess_scale"}]
    assert by_name["pool"]["args"] == [{"ref": "block4_relu"}]  # the backbone's output
    assert spec["inputs"] == ["image"]
    assert spec["outputs"] == {"melanoma": "melanoma", "diagnosis": "diagnosis"}
    w = layer_weights(model)
    assert sum(a.size for a in w.values()) == model.count_params()
    np.testing.assert_array_equal(w["diagnosis/01"], model.get_layer("diagnosis").get_weights()[1])


@pytest.mark.parametrize("backbone", sorted(SUPPORT))
def test_every_backbone_supports_qat_or_says_why(backbone):
    from trainer.backbones import get_backbone, list_backbones
    from trainer.model import build_model

    assert set(SUPPORT) == set(list_backbones()), "decide QAT support for every new backbone"
    size = max(32, get_backbone(backbone).min_size)
    reason = qat_support(build_model(backbone, input_size=size, weights=None), backbone)
    if SUPPORT[backbone] is None:
        assert reason is None
    else:
        assert reason.startswith(f"QAT is not supported for backbone {backbone!r}")
        assert SUPPORT[backbone] in reason and "drop --qat" in reason


def test_unknown_layers_are_named():
    import keras
    from keras import layers

    x = keras.Input((8, 8, 3), name="image")
    y = layers.LayerNormalization(name="ln")(x)
    y = layers.GlobalAveragePooling2D()(y)
    model = keras.Model(x, {"melanoma": layers.Dense(1, name="melanoma")(y),
                            "diagnosis": layers.Dense(7, name="diagnosis")(y)})
    reason = qat_support(model, "custom")
    assert "backbone 'custom'" in reason and "1 × LayerNormalization" in reason


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--qat"], "--qat fine-tunes the model for full-integer int8"),
    (["--float16", "--qat"], "drop --float16"),
    (["--qat-epochs", "2"], "only apply with --qat"),
    (["--int8", "--qat-target", "labels"], "only apply with --qat"),
    (["--int8", "--qat", "--keep-float", "block3_conv"], "cannot be combined with --qat"),
    (["--int8", "--qat", "--qat-epochs", "0"], "--qat-epochs must be a whole number >= 1"),
    (["--int8", "--qat", "--qat-steps", "-1"], "--qat-steps must be a whole number >= 1"),
    (["--int8", "--qat", "--qat-lr", "5"], "learning rate must be a number in (0, 1)"),
    (["--int8", "--qat", "--debug"], "does not apply to --qat"),
    (["--int8", "--qat", "--qat-python", "/nonexistent/bin/python"],
     "not an executable Python interpreter"),
])
def test_bad_qat_input_exits_2_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "exports" / "b"
    rc = main(["tflite", str(run_dir), "--out", str(out), "--representative", "20", *args])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_missing_qat_environment_says_how_to_install(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DERMEDGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = tmp_path / "b"
    rc = main(["tflite", str(run_dir), "--int8", "--qat", "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert "No QAT environment found" in err and "python -m export qat-setup" in err
    assert "tensorflow-model-optimization==" in err and "--qat-python" in err
    assert not out.exists()


def test_unsupported_backbone_exits_2_before_converting(tmp_path, capsys):
    import keras
    from keras import layers

    x = keras.Input((32, 32, 3), name="image")
    y = layers.Rescaling(1 / 255, name="preprocess_scale")(x)
    y = layers.LayerNormalization(name="ln")(y)
    y = layers.GlobalAveragePooling2D(name="pool")(y)
    model = keras.Model(x, {"melanoma": layers.Dense(1, "sigmoid", name="melanoma")(y),
                            "diagnosis": layers.Dense(7, "softmax", name="diagnosis")(y)})
    run = make_run_dir(tmp_path, name="ln", backbone="layernorm_net", model=model,
                       train_per_class=2, val_per_class=1)
    out = tmp_path / "b"
    rc = main(["tflite", str(run), "--int8", "--qat", "--representative", "14", "--out", str(out),
               "--qat-python", sys.executable])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert "QAT is not supported for backbone 'layernorm_net'" in err
    assert "1 × LayerNormalization" in err
    assert "converting" not in err  # refused before any conversion
    assert not out.exists()


def test_interpreter_without_qat_packages_is_named(run_dir, tmp_path, capsys, monkeypatch):
    """The core interpreter as --qat-python: the worker reports what it lacks; no bundle."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "b"
    rc = main(["tflite", str(run_dir), "--int8", "--qat", "--representative", "20",
               "--out", str(out), "--qat-python", sys.executable])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2, err
    assert f"the QAT interpreter {sys.executable} lacks" in err
    assert "tf_keras" in err and "tensorflow_model_optimization" in err
    assert "python -m export qat-setup" in err
    assert not out.exists() and _no_leftovers(tmp_path) == []


def test_qat_setup_prints_requirements(capsys):
    assert main(["qat-setup", "--requirements"]) == 0
    assert capsys.readouterr().out.split() == list(QAT_REQUIREMENTS)


# ----------------------------------------------------------------------------- the QAT worker
@pytest.mark.slow  # minutes with its environment: CI runs it in the slow line
@pytest.mark.qat
def test_qat_int8_bundle_is_valid_named_and_reported_beside_ptq(run_dir, qat_python, tmp_path,
                                                                capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "exports" / "qat"
    rc = main(["tflite", str(run_dir), "--int8", "--qat", "--qat-epochs", "1", "--qat-steps", "2",
               "--representative", "20", "--out", str(out), "--qat-python", qat_python])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    assert "PTQ int8" in cap.out and "QAT int8" in cap.out and "validation: passed" in cap.out
    assert "qat: epoch 1/1" in cap.err  # the worker's progress is relayed
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    assert _no_leftovers(tmp_path) == []

    card = json.loads((out / "model_card.json").read_text())
    ex = card["export"]
    # A real full-integer model: integer I/O (raw pixels: scale 1, zero point 0), int8 compute.
    assert ex["mode"] == "int8" and ex["checks"]["verified_mode"] == "int8"
    assert ex["inputs"]["image"]["dtype"] == "uint8"
    assert ex["inputs"]["image"]["quantization"] == {"scale": 1.0, "zero_point": 0}
    assert {o["dtype"] for o in ex["outputs"].values()} == {"uint8"}
    assert ex["checks"]["integer_tensor_fraction"] > 0.8
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(ex["checks"]["ops"])
    # Named heads in the signature, matching the card.
    lite = LiteModel.load(out / "model.tflite")
    sig = lite.interpreter.get_signature_list()["serving_default"]
    assert sig["inputs"] == ["image"] and set(sig["outputs"]) == {"melanoma", "diagnosis"}
    assert lite.io == {"inputs": ex["inputs"], "outputs": ex["outputs"]}
    # What QAT did, and the PTQ model it is compared with (a different model).
    qat = ex["qat"]
    assert qat["epochs"] == 1 and qat["steps_per_epoch"] == 2 and len(qat["history"]) == 1
    assert qat["target"] == "distill"  # the default: learn the float model's answers
    assert np.isfinite(qat["history"][0]["loss"]) and qat["train_images"] == 42
    assert qat["rebuild_max_abs_diff"] < 1e-4 and qat["calibration_images"] == 20
    assert qat["versions"]["tensorflow_model_optimization"].startswith("0.8")
    assert qat["ptq"]["sha256"] != ex["sha256"]
    # compared with the default post-training export (bias correction "auto"); the QAT model
    # itself is not bias-corrected
    assert qat["ptq"]["bias_correction"]["chosen"] in ("corrected", "plain")
    assert ex["bias_correction"] is None
    assert qat["ptq"]["validation"]["passed"] is True and ex["validation"]["passed"] is True
    # Side by side in validation.json / validation.md, against the same float model.
    report = json.loads((out / "validation.json").read_text())
    assert report["ptq"]["validation"]["n"] == report["validation"]["n"] == 28
    assert report["ptq"]["validation"]["metrics"]["float"] == \
        report["validation"]["metrics"]["float"]
    md = (out / "validation.md").read_text()
    assert "## Quantization-aware training vs post-training int8" in md
    assert "| metric | float (Keras) | PTQ int8 | QAT int8 |" in md
    # The QAT model answers like the float model on the held-out images.
    import keras

    from trainer.data import load_image, read_splits

    splits = read_splits(run_dir / "splits.csv")
    imgs = np.stack([load_image(p, 32) for p in splits[splits["split"] == "val"]["path"]])
    ref = keras.saving.load_model(run_dir / "model.keras")(imgs.astype(np.float32))
    got = lite.predict(imgs)
    assert got["melanoma"].shape == (28, 1) and got["diagnosis"].shape == (28, 7)
    np.testing.assert_allclose(got["diagnosis"], np.asarray(ref["diagnosis"]), atol=0.1)
    np.testing.assert_allclose(got["melanoma"], np.asarray(ref["melanoma"]), atol=0.1)
    assert np.mean(got["diagnosis"].argmax(1) == np.asarray(ref["diagnosis"]).argmax(1)) >= 0.95


@pytest.mark.qat
@pytest.mark.slow  # minutes with its environment: CI runs it in the slow line
def test_qat_setup_reuses_the_cached_environment(qat_python, capsys):
    if os.environ.get(ENV_VAR):
        unavailable(f"{ENV_VAR} names the QAT environment; qat-setup's cache is not used")
    assert main(["qat-setup"]) == 0
    cap = capsys.readouterr()
    assert "already set up" in cap.err and cap.out.strip() == f"QAT environment: {qat_python}"


@pytest.mark.slow
@pytest.mark.qat
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0", "resnet50"])
def test_real_backbones_rebuild_and_convert(backbone, qat_python, tmp_path):
    """The generic flat rebuild on the real backbones (random weights, 32 px, one QAT step).
    The side-by-side post-training model skips bias correction and compaction: both are about
    the PTQ file's accuracy and size, which the tiny-model tests cover."""
    run = make_run_dir(tmp_path, name=backbone, backbone=backbone, size=32, train=False,
                       train_per_class=2, val_per_class=1)
    config = dataclasses.replace(
        QuantizationConfig.int8_qat(14, epochs=1, steps_per_epoch=1, target="labels",
                                    compact=False),
        bias_correction="off", weight_rounding="nearest")
    res = export_run(run, config, tmp_path / "b", validate=False, qat_python=qat_python)
    ex = res.card["export"]
    assert ex["checks"]["verified_mode"] == "int8" and ex["qat"]["rebuild_max_abs_diff"] < 1e-4
    assert ex["qat"]["target"] == "labels"
    assert set(ex["outputs"]) == {"melanoma", "diagnosis"}
    out = LiteModel.load(res.path / "model.tflite").predict(
        np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    assert out["melanoma"].shape == (2, 1) and out["diagnosis"].shape == (2, 7)
