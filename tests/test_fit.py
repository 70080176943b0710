"""``trainer fit`` end to end on a tiny toy set: run directory, reload, splits, early stopping,
best weights, resume, class weighting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ci import need

keras = need("keras", "the train extra installs it: pip install -e '.[train,demo,dev]'")

from dermedge.artifacts import partial_dir  # noqa: E402
from dermedge.labels import DIAGNOSIS_LABELS  # noqa: E402
from trainer.config import RunConfig  # noqa: E402
from trainer.data import class_weights, resample_indices  # noqa: E402
from trainer.fit import fit  # noqa: E402
from trainer.run import RUN_FILES  # noqa: E402
from trainer.schedule import lr_at  # noqa: E402

TOTAL_EPOCHS = 4  # 1 head + 3 fine-tune


def tiny_config(data: Path, cache: Path, **overrides) -> RunConfig:
    base = {"model.backbone": "tiny_cnn", "model.weights": None, "model.input_size": 32,
            "data.path": str(data), "data.cache_dir": str(cache), "data.val_fraction": 0.25,
            "train.batch_size": 32, "train.head_epochs": 1, "train.epochs": 3,
            "train.head_lr": 3e-3, "train.lr": 3e-3, "train.freeze_bn": False,
            "augment.enabled": False}
    base.update(overrides)
    return RunConfig().replace(**base)


# test_evaluate.py and test_cli.py import these fixtures; the cache makes each run once per
# session even though every importing module gets its own fixture definition.
_SESSION: dict[str, object] = {}


@pytest.fixture(scope="session", name="toy_data")
def toy_data_fixture(tmp_path_factory) -> Path:
    from trainer.toy import make_toy_dataset

    if "toy" not in _SESSION:
        _SESSION["toy"] = make_toy_dataset(tmp_path_factory.mktemp("toy") / "toy",
                                           n_lesions=140, size=40, seed=1)
    return _SESSION["toy"]


class Sabotage(keras.callbacks.Callback):
    """Wrecks the heads at the start of one epoch, so that epoch cannot be the best."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            for name in ("diagnosis", "melanoma"):
                layer = _find(self.model, name)
                k, b = layer.get_weights()
                rng = np.random.default_rng(0)
                layer.set_weights([rng.normal(0, 50, k.shape).astype("float32"), b])


def _find(model, name):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.name == name:
            return layer
    raise KeyError(name)


@pytest.fixture(scope="session", name="trained_run")
def trained_run_fixture(toy_data, tmp_path_factory):
    """One run: monitor val_loss, patience 1, heads wrecked at the start of epoch 3."""
    if "run" in _SESSION:
        return _SESSION["run"]
    out = tmp_path_factory.mktemp("runs") / "r1"
    cfg = tiny_config(toy_data, tmp_path_factory.getbasetemp() / "cache",
                      **{"train.monitor": "val_loss", "train.early_stopping_patience": 1,
                         "train.keep_checkpoints": True})
    _SESSION["run"] = fit(cfg, out, verbose=0, callbacks=[Sabotage(epoch=2)])
    return _SESSION["run"]


def test_run_directory_has_every_artifact(trained_run):
    run = trained_run.run_dir
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    for name in ("curves.png", "confusion_counts.png", "confusion_normalized.png",
                 "roc_melanoma.png"):
        assert (run / "plots" / name).stat().st_size > 1000
    assert not partial_dir(run).exists()
    assert (run / "labels.txt").read_text().split() == list(DIAGNOSIS_LABELS)

    card = json.loads((run / "model_card.json").read_text())
    assert card["schema_version"] == 1
    assert card["backbone"] == "tiny_cnn" and card["name"] == "r1"
    assert card["input"] == {"name": "image", "shape": [32, 32, 3], "dtype": "float32",
                             "range": [0, 255], "color": "RGB", "resize": "center_crop_resize"}
    assert card["preprocessing"]["in_model"] is True and card["preprocessing"]["formula"]
    assert card["heads"]["diagnosis"]["labels"] == list(DIAGNOSIS_LABELS)
    assert card["heads"]["melanoma"]["labels"] == ["melanoma"]
    assert 0 < card["heads"]["melanoma"]["threshold"] < 1
    splits = card["data"]["splits"]
    assert sum(splits.values()) == card["data"]["n_images"] and splits["val"] > 0
    assert sum(card["data"]["class_counts"]["train"].values()) == splits["train"]
    assert card["data"]["layout"] == "ham10000"
    assert card["config"] == RunConfig.from_yaml(run / "config.yaml").to_dict()
    assert card["training"]["backend"] == keras.backend.backend()
    assert card["training"]["mixed_precision"] is False
    for key in ("keras", "numpy", "python", "dermedge"):
        assert key in card["versions"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert card["metrics"]["val"]["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert metrics["melanoma"]["threshold"] == card["heads"]["melanoma"]["threshold"]
    assert metrics["n"] == splits["val"]


def test_history_and_early_stopping_restore_the_best_weights(trained_run):
    run = trained_run.run_dir
    hist = pd.read_csv(run / "history.csv")
    assert list(hist.columns[:4]) == ["epoch", "phase", "lr", "loss"]
    assert {"val_loss", "val_balanced_accuracy", "val_melanoma_auc"} <= set(hist.columns)
    assert hist["epoch"].tolist() == list(range(1, len(hist) + 1))
    assert hist["phase"].iloc[0] == "head" and (hist["phase"].iloc[1:] == "finetune").all()
    # patience 1 stopped before the budget, and the best epoch is not the last one
    assert len(hist) < TOTAL_EPOCHS
    best = int(hist["val_loss"].idxmin()) + 1
    assert trained_run.best_epoch == best < len(hist)
    card = json.loads((run / "model_card.json").read_text())
    assert card["training"]["best_epoch"] == best and card["training"]["stopped_early"]
    # metrics.json is the evaluation of the best epoch's weights
    metrics = json.loads((run / "metrics.json").read_text())
    row = hist.iloc[best - 1]
    assert metrics["balanced_accuracy"] == pytest.approx(row["val_balanced_accuracy"], abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(row["val_accuracy"], abs=1e-9)


def test_saved_model_reloads_with_identical_predictions(trained_run):
    from trainer.model import build_model

    run = trained_run.run_dir
    loaded = keras.saving.load_model(run / "model.keras")  # no custom objects
    assert getattr(loaded, "optimizer", None) is None
    assert loaded.input_shape == (None, 32, 32, 3)
    ref = build_model("tiny_cnn", input_size=32, weights=None)
    ref.load_weights(run / "checkpoints" / "best.weights.h5")
    # the saved model is the best epoch with the fitted calibration folded into its heads
    from trainer.calibration import fold_temperatures

    cal = trained_run.card["calibration"]
    fold_temperatures(ref, cal["temperature"], cal["shift"])
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype("float32")
    a, b = loaded.predict_on_batch(x), ref.predict_on_batch(x)
    assert set(a) == {"melanoma", "diagnosis"}
    assert a["diagnosis"].shape == (5, 7) and a["melanoma"].shape == (5, 1)
    np.testing.assert_allclose(a["diagnosis"], b["diagnosis"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["melanoma"], b["melanoma"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["diagnosis"].sum(axis=1), 1, atol=1e-5)


def test_splits_are_lesion_grouped(trained_run):
    s = pd.read_csv(trained_run.run_dir / "splits.csv")
    assert list(s.columns[:6]) == ["image_id", "lesion_id", "dx", "melanoma", "path", "split"]
    assert set(s["split"]) == {"train", "val"}
    assert (s.groupby("lesion_id")["split"].nunique() == 1).all()
    assert s["lesion_id"].duplicated().any()  # the toy set does have multi-image lesions
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in s["path"])


def test_existing_run_needs_overwrite(trained_run, toy_data, tmp_path):
    from dermedge.errors import RunDirError

    cfg = tiny_config(toy_data, tmp_path / "cache")
    with pytest.raises(RunDirError, match="--overwrite"):
        fit(cfg, trained_run.run_dir, verbose=0)


class InterruptAfter(keras.callbacks.Callback):
    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


def test_resume_continues_from_the_last_epoch(toy_data, tmp_path):
    out = tmp_path / "r2"
    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.early_stopping_patience": 0})
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, verbose=0, callbacks=[InterruptAfter(2)])
    work = partial_dir(out)
    assert not out.exists()
    state = json.loads((work / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 2 and state["phase"] == "finetune"
    assert (work / "checkpoints" / "last.keras").is_file()
    assert len(pd.read_csv(work / "history.csv")) == 2

    from dermedge.errors import RunDirError

    with pytest.raises(RunDirError, match="--resume"):
        fit(cfg, out, verbose=0)  # a fresh start would silently discard the checkpoint
    result = fit(None, out, resume=True, verbose=0)
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == list(range(1, TOTAL_EPOCHS + 1))
    assert hist["phase"].tolist() == ["head"] + ["finetune"] * 3
    assert result.epochs_run == TOTAL_EPOCHS
    assert hist["lr"].tolist() == pytest.approx([lr_at(cfg, e) for e in range(TOTAL_EPOCHS)])
    assert not work.exists() and not (out / "checkpoints").exists()
    assert np.isfinite(hist["loss"]).all()


def test_resumed_run_reproduces_the_uninterrupted_run(toy_data, tmp_path):
    """Killed after epoch 2 and resumed, with dropout and augmentation drawing random numbers:
    the same losses every epoch and the same final weights as a run never interrupted."""
    cfg = tiny_config(toy_data, tmp_path / "cache", **{
        "train.early_stopping_patience": 0, "train.restore": "last", "model.dropout": 0.3,
        "augment.enabled": True})
    whole = fit(cfg, tmp_path / "whole", verbose=0)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "resumed", verbose=0, callbacks=[InterruptAfter(2)])
    resumed = fit(None, tmp_path / "resumed", resume=True, verbose=0)
    cols = ["epoch", "loss", "val_loss", "val_balanced_accuracy"]
    a, b = whole.history[cols].to_numpy(), resumed.history[cols].to_numpy()
    assert len(a) == TOTAL_EPOCHS and np.array_equal(a, b), (a - b)
    ma = keras.saving.load_model(tmp_path / "whole" / "model.keras")
    mb = keras.saving.load_model(tmp_path / "resumed" / "model.keras")
    for x, y in zip(ma.get_weights(), mb.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert whole.card["training"]["resumed"] == []
    assert resumed.card["training"]["resumed"] == [{"after_epoch": 2, "exact": True,
                                                    "why": None}]
    # A checkpoint without the random states (an older dermedge): the card says it differs.
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "old", verbose=0, callbacks=[InterruptAfter(2)])
    (partial_dir(tmp_path / "old") / "checkpoints" / "last_rng.npz").unlink()
    old = fit(None, tmp_path / "old", resume=True, verbose=0)
    [entry] = old.card["training"]["resumed"]
    assert entry["after_epoch"] == 2 and entry["exact"] is False
    assert "no random-number states" in entry["why"]
    assert not np.array_equal(old.history["loss"].to_numpy(), whole.history["loss"].to_numpy())


def test_mixed_precision_run_ships_a_float32_model(toy_data, tmp_path):
    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.mixed_precision": "on",
                                                       "train.epochs": 1})
    result = fit(cfg, tmp_path / "mp", verbose=0)
    assert result.card["training"]["mixed_precision"] is True
    model = keras.saving.load_model(tmp_path / "mp" / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run


def test_gpu_check_failure_is_logged_not_silent(monkeypatch, caplog):
    from trainer import fit as fit_module

    visible, failure = fit_module.gpu_status()
    assert failure is None  # GPU or not, the check itself works here
    with caplog.at_level("WARNING", logger="trainer"):
        assert fit_module._gpu_visible() is visible
    assert caplog.records == []

    def broken(kind):
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(keras.distribution, "list_devices", broken)
    assert fit_module.gpu_status() == (False, "RuntimeError: CUDA driver version is "
                                              "insufficient")
    with caplog.at_level("WARNING", logger="trainer"):
        assert fit_module._gpu_visible() is False
    assert "Could not check for a GPU (RuntimeError: CUDA driver" in caplog.text
    assert "records device 'cpu'" in caplog.text


def test_failed_run_leaves_nothing_behind(toy_data, tmp_path):
    from trainer.errors import UnknownBackboneError

    cfg = tiny_config(toy_data, tmp_path / "cache", **{"model.backbone": "mobilenet_v3"})
    with pytest.raises(UnknownBackboneError, match="Did you mean"):
        fit(cfg, tmp_path / "bad", verbose=0)
    assert list(tmp_path.iterdir()) == [] or not any(
        p.name.startswith("bad") for p in tmp_path.iterdir())


def test_lr_schedule_shapes():
    cfg = RunConfig().replace(**{"train.head_epochs": 2, "train.epochs": 10,
                                 "train.warmup_epochs": 1, "train.head_lr": 1e-3,
                                 "train.lr": 1e-4})
    lrs = [lr_at(cfg, e) for e in range(12)]
    assert lrs[:2] == [1e-3, 1e-3]
    assert lrs[2] < 1e-4 and lrs[3] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    step = cfg.replace(**{"train.schedule": "step", "train.warmup_epochs": 0,
                          "train.step_epochs": 4, "train.step_gamma": 0.5})
    assert [lr_at(step, e) for e in (2, 5, 6, 10)] == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5])


# ---------------------------------------------------------------- the input pipeline
def _labels(rng, counts):
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return rng.permutation(y)


def test_pipeline_applies_class_weights_per_head():
    from trainer.pipeline import MEL_INDEX, CachedDataset

    rng = np.random.default_rng(0)
    y = _labels(rng, [5, 8, 12, 3, 10, 40, 4])
    images = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
    ds = CachedDataset(images, y, batch_size=16, balance="weights", seed=3)
    expect_diag = class_weights(y, 7)
    expect_mel = class_weights((y == MEL_INDEX).astype(int), 2)
    seen = []
    for i in range(len(ds)):
        x, t, w = ds[i]
        assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 3)
        assert t["diagnosis"].shape == (len(x), 7) and t["melanoma"].shape == (len(x), 1)
        cls = t["diagnosis"].argmax(axis=1)
        np.testing.assert_allclose(w["diagnosis"], expect_diag[cls], rtol=1e-6)
        mel = t["melanoma"][:, 0].astype(int)
        np.testing.assert_array_equal(mel, (cls == MEL_INDEX).astype(int))
        np.testing.assert_allclose(w["melanoma"], expect_mel[mel], rtol=1e-6)
        seen.append(cls)
    # one epoch visits every image once; the next epoch uses another order
    assert sorted(np.concatenate(seen)) == sorted(y)
    first = ds.batch_indices(0).copy()
    ds.on_epoch_end()
    assert not np.array_equal(first, ds.batch_indices(0))
    # the weighted class mass is balanced
    mass = np.bincount(y, weights=expect_diag[y], minlength=7)
    assert mass.std() / mass.mean() < 0.5


def test_pipeline_resampling_follows_resample_indices():
    from trainer.pipeline import CachedDataset

    rng = np.random.default_rng(1)
    y = _labels(rng, [5, 8, 12, 3, 10, 40, 4])
    images = np.zeros((len(y), 4, 4, 3), np.uint8)
    ds = CachedDataset(images, y, batch_size=10, balance="resample", resample_cap=3.0, seed=0)
    got = np.concatenate([ds[i][1]["diagnosis"].argmax(axis=1) for i in range(len(ds))])
    expect = y[resample_indices(y, cap=3.0, seed=0)]
    np.testing.assert_array_equal(np.bincount(got, minlength=7), np.bincount(expect,
                                                                             minlength=7))
    assert all((ds[i][2]["diagnosis"] == 1).all() for i in range(len(ds)))


def test_pipeline_mixup_blends_images_targets_and_weights_consistently():
    from trainer.pipeline import MEL_INDEX, CachedDataset

    rng = np.random.default_rng(4)
    y = _labels(rng, [5, 8, 12, 3, 10, 40, 4])
    # Each image is a constant equal to its class index: a blend's pixel value then reads back
    # as lam * c_i + (1 - lam) * c_j, which the targets must match.
    images = np.broadcast_to(y[:, None, None, None].astype(np.uint8), (len(y), 4, 4, 3))
    plain = CachedDataset(images, y, batch_size=16, balance="weights", seed=5)
    mixed = CachedDataset(images, y, batch_size=16, balance="weights", seed=5, mixup=0.4)
    classes = np.arange(7, dtype=np.float32)
    blended = 0
    for i in range(len(mixed)):
        x0, t0, _ = plain[i]
        x, t, w = mixed[i]
        assert x.shape == x0.shape and t["diagnosis"].shape == t0["diagnosis"].shape
        np.testing.assert_allclose(t["diagnosis"].sum(axis=1), 1.0, rtol=1e-6)
        # the main image keeps at least half of the blend
        assert (t["diagnosis"].max(axis=1) >= 0.5 - 1e-6).all()
        # pixels and targets blend with the same lam
        np.testing.assert_allclose(x[:, 0, 0, 0], t["diagnosis"] @ classes, atol=1e-4)
        np.testing.assert_allclose(t["melanoma"][:, 0], t["diagnosis"][:, MEL_INDEX], atol=1e-6)
        # weights blend with the same lam as the targets: lam * w_i + (1 - lam) * w_j
        np.testing.assert_allclose(w["diagnosis"], t["diagnosis"] @ plain.diag_weights,
                                   rtol=1e-5)
        blended += int((t["diagnosis"].max(axis=1) < 0.999).sum())
    assert blended > len(y) // 2  # most images are real blends at alpha 0.4
    # reproducible from (seed, epoch, batch), different next epoch
    np.testing.assert_array_equal(mixed[0][0], mixed[0][0])
    first = mixed[0][1]["diagnosis"].copy()
    mixed.on_epoch_end()
    assert not np.array_equal(first, mixed[0][1]["diagnosis"])
    with pytest.raises(ValueError, match="mixup must be >= 0"):
        CachedDataset(images, y, mixup=-0.1)


def test_predict_arrays_tta_is_flip_mean():
    from trainer.model import build_model
    from trainer.pipeline import predict_arrays

    model = build_model("tiny_cnn", input_size=32, weights=None)
    x = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    p_mel, probs = predict_arrays(model, x, batch_size=2)
    assert p_mel.shape == (3,) and probs.shape == (3, 7)
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    outs = [predict_arrays(model, np.ascontiguousarray(v))[1] for v in views]
    _, tta = predict_arrays(model, x, tta=True)
    np.testing.assert_allclose(tta, np.mean(outs, axis=0), atol=1e-6)
    assert not math.isnan(tta.sum())


@pytest.mark.shared
@pytest.mark.slow
def test_mobilenet_v2_with_shared_weights_on_real_images(shared_dir, tmp_path):
    """Smoke: ~100 real HAM10000 images, MobileNetV2 with the offline ImageNet .h5, 1+1 short
    epochs; the run directory is complete and the model reloads."""
    weights = shared_dir / "weights" / "mobilenet_v2_1.0_224_no_top_imagenet.h5"
    cfg = RunConfig().replace(**{
        "data.path": str(shared_dir / "data" / "ham10000_train_224"), "data.limit": 100,
        "data.cache_dir": str(tmp_path / "cache"), "model.backbone": "mobilenet_v2",
        "model.weights": str(weights), "model.input_size": 224, "train.batch_size": 16,
        "train.head_epochs": 1, "train.epochs": 1, "train.steps_per_epoch": 3,
        "train.finetune_layers": 20})
    result = fit(cfg, tmp_path / "mnv2", verbose=0)
    card = json.loads((result.run_dir / "model_card.json").read_text())
    assert card["backbone"] == "mobilenet_v2" and card["weights"] == str(weights)
    assert card["preprocessing"]["formula"] == "x / 127.5 - 1"
    assert card["data"]["n_images"] <= 110 and card["data"]["splits"]["val"] > 0
    assert result.epochs_run == 2
    model = keras.saving.load_model(result.run_dir / "model.keras")
    out = model.predict_on_batch(np.zeros((1, 224, 224, 3), "float32"))
    assert out["diagnosis"].shape == (1, 7)


@pytest.mark.slow
def test_quickstart_config_learns_the_toy_task(tmp_path):
    """configs/quickstart.yaml on the default toy set: clearly better than chance (1/7)."""
    from trainer.toy import make_toy_dataset

    data = make_toy_dataset(tmp_path / "toy")
    cfg = RunConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" /
                              "quickstart.yaml").replace(**{"data.path": str(data),
                                                            "data.cache_dir": str(tmp_path)})
    result = fit(cfg, tmp_path / "quickstart", verbose=0)
    assert result.metrics["balanced_accuracy"] >= 0.6
    assert result.metrics["melanoma"]["auc"] >= 0.8
