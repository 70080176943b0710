"""RunConfig: YAML + overrides, typed validation, suggestions, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from trainer.config import RunConfig, melanoma_threshold_spec
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_documented_recipe():
    c = RunConfig()
    assert c.train.batch_size == 32 and c.train.head_epochs == 2 and c.train.epochs == 15
    assert c.train.optimizer == "adam" and c.train.schedule == "cosine"
    assert c.train.label_smoothing == 0.1 and c.train.freeze_bn is True
    assert c.train.monitor == "val_balanced_accuracy" and c.train.mixed_precision == "auto"
    assert c.data.val_fraction == 0.15 and c.data.test_fraction == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3  # type: ignore[misc]


def test_yaml_then_overrides_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  backbone: tiny_cnn\n  input_size: 48\ntrain:\n  lr: 0.01\n"
                 "  epochs: 4\n")
    c = RunConfig.load(f, ["train.lr=3e-4", "train.finetune_layers=20",
                           "train.melanoma_threshold=sens@0.90", "augment.enabled=false"],
                       epochs=7, weights="none", data="some/dir")
    assert c.model.backbone == "tiny_cnn" and c.model.input_size == 48
    assert c.train.lr == pytest.approx(3e-4)
    assert c.train.epochs == 7  # the flag wins over the file
    assert c.train.finetune_layers == 20
    assert c.train.melanoma_threshold == "sens@0.90"
    assert c.augment.enabled is False
    assert c.model.weights is None
    assert c.data.path == "some/dir"


def test_to_dict_round_trips_through_yaml(tmp_path):
    c = RunConfig.load(None, ["train.optimizer=sgd", "train.loss_weights={melanoma: 2, "
                              "diagnosis: 1}"], backbone="tiny_cnn", seed=5)
    f = tmp_path / "config.yaml"
    f.write_text(c.to_yaml())
    assert RunConfig.from_yaml(f) == c
    assert c.to_dict()["train"]["loss_weights"] == {"melanoma": 2.0, "diagnosis": 1.0}


def test_resolved_makes_paths_absolute(tmp_path):
    c = RunConfig.load(None, ["data.cache_dir=cache"], data="data/toy", weights="w.h5")
    r = c.resolved(tmp_path)
    assert r.data.path == str(tmp_path / "data/toy")
    assert r.data.cache_dir == str(tmp_path / "cache")
    assert r.model.weights == str(tmp_path / "w.h5")
    assert RunConfig.load(None, weights="imagenet").resolved(tmp_path).model.weights == "imagenet"


@pytest.mark.parametrize("override, needle", [
    ("train.lrr=1", "Did you mean 'train.lr'"),
    ("trian.lr=1", "Did you mean 'train'"),
    ("model.backbon=x", "Did you mean 'model.backbone'"),
    ("train.optimizer=adamm", "Did you mean 'adam'"),
    ("train.schedule=cosin", "Did you mean 'cosine'"),
])
def test_unknown_keys_and_choices_get_suggestions(override, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.load(None, [override])


@pytest.mark.parametrize("override, needle", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=-1", "train.lr"),
    ("train.freeze_bn=maybe", "train.freeze_bn"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("train.melanoma_threshold=youdn", "melanoma_threshold"),
    ("train.melanoma_threshold=1.5", "melanoma_threshold"),
    ("train.finetune_layers=0", "finetune_layers"),
    ("augment.mixup=-0.2", "augment.mixup"),
    ("train.loss_weights={melanoma: 1}", "loss_weights"),
    ("train", "section.key=value"),
])
def test_bad_values_raise_config_error_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.load(None, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_yaml(bad)


def test_melanoma_threshold_specs():
    assert melanoma_threshold_spec("youden") == ("youden", None)
    assert melanoma_threshold_spec("sens@0.95") == ("sensitivity", 0.95)
    assert melanoma_threshold_spec(0.3) == ("fixed", 0.3)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    """Recipes name weights by what they are and take the data from --data: no local paths."""
    from trainer.backbones import get_backbone

    text = (REPO / "configs" / name).read_text()
    assert "../shared" not in text and "shared/" not in text
    c = RunConfig.from_yaml(REPO / "configs" / name)
    backbone = get_backbone(c.model.backbone)
    assert c.model.weights in ("imagenet", None)
    assert (c.model.weights is None) == (backbone.imagenet is None)
    assert c.data.path is None or name == "quickstart.yaml"
