"""Knowledge distillation (``train.distill_from``): the targets are the stated mix of label and
teacher, the teacher answers once (cached), the card records it, and a teacher that trained on
the student's validation images, or is not a run, is refused before training starts."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
from ci import need

keras = need("keras", "the train extra installs it: pip install -e '.[train,demo,dev]'")

from test_cli import _assert_one_paragraph_error, _run  # noqa: E402
from test_fit import tiny_config, toy_data_fixture, trained_run_fixture  # noqa: E402,F401

from trainer.config import RunConfig  # noqa: E402
from trainer.distill import soft_targets  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.pipeline import CachedDataset, predict_arrays  # noqa: E402


def _soft(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(7), size=n).astype(np.float32)
    return {"melanoma": rng.random(n).astype(np.float32), "diagnosis": p}


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_targets_are_the_stated_mix_of_label_and_teacher(weight):
    n = 10
    images = np.zeros((n, 4, 4, 3), np.uint8)
    labels = np.arange(n) % 7
    soft = _soft(n)
    data = CachedDataset(images, labels, batch_size=n, shuffle=False, balance="logit_adjust",
                         soft_targets=soft, distill_weight=weight)
    plain = CachedDataset(images, labels, batch_size=n, shuffle=False, balance="logit_adjust")
    _, targets, weights = data[0]
    _, hard, _ = plain[0]
    idx = data.batch_indices(0)
    np.testing.assert_allclose(targets["diagnosis"], (1 - weight) * hard["diagnosis"]
                               + weight * soft["diagnosis"][idx], atol=1e-6)
    np.testing.assert_allclose(targets["melanoma"][:, 0], (1 - weight) * hard["melanoma"][:, 0]
                               + weight * soft["melanoma"][idx], atol=1e-6)
    np.testing.assert_allclose(targets["diagnosis"].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(weights["diagnosis"], 1.0)


def test_soft_targets_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="one answer per image"):
        CachedDataset(np.zeros((5, 4, 4, 3), np.uint8), np.arange(5) % 7, soft_targets=_soft(4),
                      distill_weight=0.5)


def test_logit_adjusted_targets_are_met_by_reproducing_the_teacher():
    """With logit adjustment the loss compares softmax(log p + log prior) to the target, so
    the target that a student reproducing the teacher's probabilities meets exactly is the
    teacher's probabilities times the prior."""
    teacher = _soft(6, seed=1)
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    t = soft_targets(teacher["melanoma"], teacher["diagnosis"], log_prior=np.log(prior))
    z = np.log(teacher["diagnosis"]) + np.log(prior)  # the loss's view of a perfect student
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(t["diagnosis"], want, atol=1e-6)
    np.testing.assert_allclose(t["melanoma"], teacher["melanoma"], atol=1e-7)
    same = soft_targets(teacher["melanoma"], teacher["diagnosis"], log_prior=None)
    np.testing.assert_allclose(same["diagnosis"], teacher["diagnosis"], atol=1e-6)


def test_config_checks_the_weight_and_resolves_the_teacher_path(tmp_path):
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="train.distill_weight"):
            RunConfig().replace(**{"train.distill_from": "runs/cloud",
                                   "train.distill_weight": bad})
    cfg = RunConfig().replace(**{"train.distill_from": "runs/cloud"}).resolved(tmp_path)
    assert cfg.train.distill_from == str(tmp_path / "runs" / "cloud")


def test_distilled_fit_records_the_teacher_and_reuses_its_answers(trained_run, toy_data,
                                                                   tmp_path_factory):
    from trainer.data import cache_images, read_splits
    from trainer.fit import fit
    from trainer.run import load_run

    teacher = trained_run.run_dir
    cache = tmp_path_factory.getbasetemp() / "cache"
    cfg = tiny_config(toy_data, cache, **{"train.epochs": 1, "train.head_epochs": 0,
                                          "train.class_balance": "logit_adjust",
                                          "train.distill_from": str(teacher),
                                          "train.distill_weight": 0.6})
    first = fit(cfg, tmp_path_factory.mktemp("kd") / "s1", verbose=0)
    d = first.card["distillation"]
    assert d["teacher"] == str(teacher) and d["weight"] == 0.6 and d["cached"] is False
    assert d["teacher_sha256"] == hashlib.sha256((teacher / "model.keras").read_bytes()).hexdigest()
    assert 0.0 <= d["teacher_train_agreement"] <= 1.0

    # the cached answers are the teacher's on the unaugmented training images
    records = read_splits(first.run_dir / "splits.csv")
    train = records[records["split"] == "train"]
    model, _ = load_run(teacher)
    p_mel, probs = predict_arrays(model, cache_images(train["path"].tolist(), 32, cache,
                                                      progress=False))
    with np.load(d["cache"]) as z:
        np.testing.assert_allclose(z["p_mel"], p_mel, atol=1e-5)
        np.testing.assert_allclose(z["probs"], probs, atol=1e-5)

    second = fit(cfg, tmp_path_factory.mktemp("kd") / "s2", verbose=0)
    assert second.card["distillation"]["cached"] is True
    assert second.card["distillation"]["cache"] == d["cache"]


def test_a_teacher_that_saw_the_validation_images_is_refused(trained_run, toy_data, tmp_path):
    from trainer.fit import fit

    leaky = tmp_path / "leaky"
    shutil.copytree(trained_run.run_dir, leaky)
    splits = pd.read_csv(leaky / "splits.csv")
    splits["split"] = "train"  # as if the teacher had trained on every image
    splits.to_csv(leaky / "splits.csv", index=False)
    cfg = tiny_config(toy_data, tmp_path / "cache", **{"train.distill_from": str(leaky)})
    with pytest.raises(ConfigError, match=r"trained on \d+ of this run's \d+ validation/test "
                                          "lesions"):
        fit(cfg, tmp_path / "student", verbose=0)
    assert not (tmp_path / "student").exists()
    assert not (tmp_path / "student.partial").exists()


def test_cli_refuses_a_teacher_that_is_not_a_run(capsys, toy_data, tmp_path):
    code, _, err = _run(capsys, ["fit", "--data", str(toy_data), "--out", str(tmp_path / "r"),
                                 "--backbone", "tiny_cnn", "--weights", "none", "--quiet",
                                 "--distill-from", str(tmp_path / "nope")])
    assert code == 2
    _assert_one_paragraph_error(err, "train.distill_from", "Run directory not found")
    assert not (tmp_path / "r").exists()
