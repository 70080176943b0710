"""Typed, frozen run configuration: YAML file + CLI overrides -> ``RunConfig``.

Relative paths (``data.path``, ``data.images``, ``data.cache_dir``, ``model.weights``,
``train.distill_from``) resolve against the current working directory; ``RunConfig.resolved()``
makes them absolute, and that resolved form is what a run records in ``config.yaml`` and its
model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from dermedge.labels import HEADS
from trainer.errors import ConfigError

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["cosine", "step", "constant"]
# logit_adjust: no sample weights; the loss adds tau * log(class prior) to the logits
# (trainer/losses.py), so the heads learn the class-balanced posterior.
ClassBalance = Literal["weights", "resample", "both", "logit_adjust", "none"]
MixedPrecision = Literal["auto", "on", "off"]
Restore = Literal["best", "last", "average"]
Monitor = Literal["val_balanced_accuracy", "val_melanoma_auc", "val_loss", "val_accuracy"]
Distribute = Literal["auto", "none", "mirrored", "multi-worker"]  # trainer/distribute.py
LrScaling = Literal["none", "linear", "sqrt"]

# Monitors where bigger is better; everything else is minimised.
MAXIMISED_MONITORS = frozenset({"val_balanced_accuracy", "val_melanoma_auc", "val_accuracy"})


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None
    layout: str = "auto"
    images: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    split_seed: int = 0
    cache_dir: str | None = None
    # Use at most this many images (a seeded, class-stratified subsample); for smoke runs.
    limit: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "mobilenet_v2"
    weights: str | None = "imagenet"
    input_size: int | None = None
    dropout: float = 0.2


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    flip: bool = True
    rotation: float = 0.5  # fraction of a full turn: dermoscopy has no "up"
    translation: float = 0.1
    zoom: float = 0.15
    shear: float = 0.1
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.0  # scale saturation by a factor in [1 - s, 1 + s]
    # mixup: blend pairs of training images and their targets, lam ~ Beta(mixup, mixup);
    # 0 = off. Regularises the rare classes a long fine-tune otherwise memorises.
    mixup: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # the global batch: split evenly over the replicas when distributed
    # Data parallelism (trainer/distribute.py): auto, none, mirrored (this machine's devices),
    # multi-worker (tf.distribute across machines, configured by TF_CONFIG).
    distribute: Distribute = "auto"
    # Scale head_lr and lr by batch_size / lr_reference_batch ("linear") or its square root;
    # lr_reference_batch is the batch size the learning rates were tuned for.
    lr_scaling: LrScaling = "none"
    lr_reference_batch: int | None = None
    head_epochs: int = 2
    epochs: int = 15
    optimizer: Optimizer = "adam"
    head_lr: float = 1e-3
    lr: float = 1e-4
    schedule: Schedule = "cosine"
    warmup_epochs: int = 0
    step_epochs: int = 5
    step_gamma: float = 0.1
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    # "all", a number of top backbone layers, or the name of the first backbone layer to train.
    finetune_layers: Union[Literal["all"], int, str] = "all"  # noqa: UP007
    freeze_bn: bool = True
    # Override the backbone's BatchNorm momentum (None keeps it). Short runs from random init
    # with trainable BN need a faster one (0.9), or the moving statistics lag far behind.
    bn_momentum: float | None = None
    class_balance: ClassBalance = "weights"
    class_weight_method: str = "median_frequency"
    resample_cap: float = 5.0
    logit_adjust_tau: float = 1.0  # class_balance=logit_adjust only
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"melanoma": 1.0, "diagnosis": 1.0}
    )
    early_stopping_patience: int = 5  # fine-tune epochs without improvement; 0 disables
    monitor: Monitor = "val_balanced_accuracy"
    # Weights the run keeps: the best epoch by `monitor` (early stopping applies), the last
    # epoch, or the mean of the last `average_epochs` epochs' weights (checkpoint averaging:
    # no selection on the validation split, so its scores stay honest).
    restore: Restore = "best"
    average_epochs: int = 3
    # Temperature scaling of both heads on the validation split, folded into the head weights.
    calibrate: bool = True
    # Also one logit offset per diagnosis class fitted on the validation split for the
    # class-balanced log loss (trainer/calibration.py): undoes the rare classes' drift.
    class_bias: bool = False
    mixed_precision: MixedPrecision = "auto"
    melanoma_threshold: Union[str, float] = "youden"  # noqa: UP007
    tta: bool = False
    workers: int = 1
    steps_per_epoch: int | None = None
    keep_checkpoints: bool = False
    # Knowledge distillation (trainer/distill.py): a finished run (e.g. the cloud ensemble)
    # whose answers on the training images are mixed into the targets with this weight.
    distill_from: str | None = None
    distill_weight: float = 0.5


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    name: str | None = None

    # ---- named constructors -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RunConfig:
        """Build from a nested dict; unknown keys and wrong types raise ConfigError."""
        cfg = _build(cls, d or {}, "")
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_yaml(path))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None,
             **flags: Any) -> RunConfig:
        """YAML file (optional) + ``section.key=value`` overrides + common CLI flags."""
        d = read_yaml(path) if path else {}
        for item in overrides or []:
            key, value = parse_override(item)
            set_dotted(d, key, value)
        for key, value in flags.items():
            if value is not None:
                set_dotted(d, FLAG_KEYS.get(key, key), value)
        return cls.from_dict(d)

    # ---- derived forms ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> RunConfig:
        """Dotted-key replace: ``cfg.replace(**{"train.lr": 1e-3})``."""
        d = self.to_dict()
        for key, value in changes.items():
            set_dotted(d, key, value)
        return RunConfig.from_dict(d)

    def resolved(self, cwd: str | Path | None = None) -> RunConfig:
        """Relative paths made absolute against ``cwd`` (default: the current directory)."""
        base = Path(cwd) if cwd else Path.cwd()

        def absolute(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())

        weights = self.model.weights
        if weights is not None and weights != "imagenet":
            weights = absolute(weights)
        return dataclasses.replace(
            self,
            data=dataclasses.replace(self.data, path=absolute(self.data.path),
                                     images=absolute(self.data.images),
                                     cache_dir=absolute(self.data.cache_dir)),
            model=dataclasses.replace(self.model, weights=weights),
            train=dataclasses.replace(self.train, distill_from=absolute(self.train.distill_from)),
        )

    def validate(self) -> None:
        """Cross-field checks; raises ConfigError naming the field and the fix."""
        t, d = self.train, self.data

        def positive(name: str, value: float, allow_zero: bool = False) -> None:
            if value < 0 or (value == 0 and not allow_zero):
                need = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"`{name}` must be {need}. Received: {name}={value!r}.")

        positive("train.batch_size", t.batch_size)
        positive("train.head_epochs", t.head_epochs, allow_zero=True)
        positive("train.epochs", t.epochs, allow_zero=True)
        if t.head_epochs + t.epochs == 0:
            raise ConfigError("`train.head_epochs` + `train.epochs` is 0: nothing to train. "
                              "Set train.epochs (fine-tune epochs) to at least 1.")
        positive("train.head_lr", t.head_lr)
        if t.lr_reference_batch is not None:
            positive("train.lr_reference_batch", t.lr_reference_batch)
        elif t.lr_scaling != "none":
            raise ConfigError(f"`train.lr_scaling={t.lr_scaling!r}` scales the learning rates by "
                              "train.batch_size / train.lr_reference_batch, but "
                              "train.lr_reference_batch is not set. Set it to the global batch "
                              "your learning rates were tuned for (e.g. --set "
                              "train.lr_reference_batch=32), or set train.lr_scaling=none.")
        positive("train.lr", t.lr)
        positive("train.warmup_epochs", t.warmup_epochs, allow_zero=True)
        positive("train.weight_decay", t.weight_decay, allow_zero=True)
        positive("train.workers", t.workers)
        positive("train.early_stopping_patience", t.early_stopping_patience, allow_zero=True)
        positive("train.resample_cap", t.resample_cap)
        positive("train.logit_adjust_tau", t.logit_adjust_tau, allow_zero=True)
        positive("train.average_epochs", t.average_epochs)
        if t.restore == "average" and t.average_epochs > t.epochs:
            raise ConfigError(f"`train.average_epochs` ({t.average_epochs}) exceeds the "
                              f"fine-tune epochs ({t.epochs}); average at most train.epochs.")
        positive("model.dropout", self.model.dropout, allow_zero=True)
        positive("augment.mixup", self.augment.mixup, allow_zero=True)
        if t.distill_from is not None and not 0 < t.distill_weight <= 1:
            raise ConfigError("`train.distill_weight` must be in (0, 1]: the teacher's share of "
                              f"each target. Received: {t.distill_weight!r}.")
        if t.class_bias and not t.calibrate:
            raise ConfigError("`train.class_bias` is fitted together with the temperatures: it "
                              "needs train.calibrate: true (or set train.class_bias: false).")
        if t.bn_momentum is not None and not 0 < t.bn_momentum < 1:
            raise ConfigError("`train.bn_momentum` must be in (0, 1) or null. "
                              f"Received: {t.bn_momentum!r}.")
        if t.steps_per_epoch is not None:
            positive("train.steps_per_epoch", t.steps_per_epoch)
        if not 0 <= t.label_smoothing < 1:
            raise ConfigError("`train.label_smoothing` must be in [0, 1). "
                              f"Received: {t.label_smoothing!r}.")
        if isinstance(t.finetune_layers, int) and t.finetune_layers < 1:
            raise ConfigError("`train.finetune_layers` must be 'all', a positive number of "
                              "top backbone layers, or the name of the first backbone layer to "
                              f"train. Received: {t.finetune_layers!r}.")
        if set(t.loss_weights) != set(HEADS):
            raise ConfigError("`train.loss_weights` needs exactly the keys melanoma and "
                              f"diagnosis. Received: {sorted(t.loss_weights)}.")
        melanoma_threshold_spec(t.melanoma_threshold)  # raises on a bad spec
        for name in ("val_fraction", "test_fraction"):
            v = getattr(d, name)
            if not 0 <= v < 1:
                raise ConfigError(f"`data.{name}` must be in [0, 1). Received: {v!r}.")
        if d.val_fraction <= 0:
            raise ConfigError("`data.val_fraction` must be > 0: the validation split drives "
                              "early stopping and the melanoma threshold.")
        if d.val_fraction + d.test_fraction >= 0.9:
            raise ConfigError("`data.val_fraction` + `data.test_fraction` leaves under 10% "
                              f"for training (val={d.val_fraction}, test={d.test_fraction}).")
        if d.limit is not None:
            positive("data.limit", d.limit)
        if self.model.input_size is not None:
            positive("model.input_size", self.model.input_size)


FLAG_KEYS = {
    "data": "data.path",
    "layout": "data.layout",
    "backbone": "model.backbone",
    "weights": "model.weights",
    "input_size": "model.input_size",
    "epochs": "train.epochs",
    "head_epochs": "train.head_epochs",
    "batch_size": "train.batch_size",
    "distribute": "train.distribute",
    "lr": "train.lr",
    "seed": "seed",
    "name": "name",
    "distill_from": "train.distill_from",
    "distill_weight": "train.distill_weight",
}


def melanoma_threshold_spec(spec: str | float) -> tuple[str, float | None]:
    """``"youden"`` -> ("youden", None); ``"sens@0.90"`` -> ("sensitivity", 0.9);
    a float in (0, 1) -> ("fixed", value)."""
    if isinstance(spec, bool):
        pass
    elif isinstance(spec, int | float):
        if 0 < float(spec) < 1:
            return "fixed", float(spec)
    elif spec == "youden":
        return "youden", None
    elif isinstance(spec, str) and spec.startswith("sens@"):
        try:
            v = float(spec[5:])
        except ValueError:
            v = -1.0
        if 0 < v <= 1:
            return "sensitivity", v
    raise ConfigError("`train.melanoma_threshold` must be 'youden', 'sens@0.90' (any target "
                      f"sensitivity in (0, 1]) or a number in (0, 1). Received: {spec!r}.")


# ---- YAML and overrides -------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file not found: {str(p)!r}. Pass an existing YAML file "
                          "with --config (see configs/ for examples).")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {str(p)!r} is not valid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"Config file {str(p)!r} must hold a mapping of sections "
                          f"(data, model, augment, train, seed, name); got {type(d).__name__}.")
    return d


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ("train.lr", 0.0003); the value is parsed as YAML."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {item!r} is not of the form section.key=value, "
                          "e.g. --set train.lr=3e-4.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"Cannot set {key!r}: {p!r} is not a section.")
        cur = nxt
    cur[parts[-1]] = value


# ---- typed construction -------------------------------------------------------------------
def _build(cls: type, d: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"`{where}` must be a mapping. Received: {d!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{prefix}{key}'.{hint} "
                              f"Valid keys in `{where}`: {', '.join(names)}.")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, d[name] if d[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(d[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        # Try the most specific member first (Literal before str, int before float).
        for a in sorted((a for a in args if a is not type(None)), key=_specificity):
            with contextlib.suppress(ConfigError):
                return _coerce(value, a, key)
        raise ConfigError(f"`{key}` has the wrong type. Received: {key}={value!r}; expected "
                          f"{_describe(tp)}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"`{key}` must be one of {', '.join(map(repr, choices))}. "
                          f"Received: {key}={value!r}.{hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping. Received: {key}={value!r}.")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"`{key}` must be {_describe(tp)}. Received: {key}={value!r} "
                      f"({type(value).__name__}).")


def _specificity(tp: Any) -> int:
    if typing.get_origin(tp) is Literal:
        return 0
    return {bool: 1, int: 2, float: 3, str: 9}.get(tp, 5)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if tp is type(None):
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))
