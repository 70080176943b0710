"""``trainer fit``: records -> lesion-grouped splits -> cached images -> two-phase training ->
a self-describing run directory (docs/ARTIFACTS.md).

The run is built in ``<out>.partial/`` and renamed to ``<out>`` only when complete, so a failed
run leaves no run directory. Each epoch writes ``checkpoints/last.keras`` + ``state.json``
there; ``resume=True`` continues an interrupted run from its last completed epoch and
reproduces the uninterrupted run (same losses, same weights).

The stages are steps, in order: ``prepare`` (cheap checks) -> ``_load_data`` ->
``_build_models`` -> ``_train_phases`` (head, then fine-tune; the per-epoch jobs are the small
callbacks of :mod:`trainer.callbacks`) -> ``_finalize`` (kept weights, calibration, threshold,
metrics) -> ``_save_model`` -> ``_write_run`` (the card, then the rename).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermedge.artifacts import partial_dir
from dermedge.card import ModelCard, build_card
from dermedge.errors import RunDirError
from dermedge.labels import DIAGNOSIS_LABELS, MELANOMA_LABELS
from trainer import distribute as dist
from trainer import provenance
from trainer.backbones import get_backbone
from trainer.calibration import calibrate
from trainer.config import ConfigError, RunConfig
from trainer.data import (
    cache_images,
    describe,
    detect_layout,
    load_records,
    read_splits,
    split_records,
)
from trainer.distill import agreement, check_no_leak, check_teacher, soft_targets, teacher_answers
from trainer.errors import DataError, DermedgeError
from trainer.evaluate import write_outputs
from trainer.losses import head_losses, log_prior
from trainer.metadata import for_run as metadata_for_run
from trainer.metrics import card_metrics, choose_threshold, score
from trainer.model import (
    BACKBONE_NAME,
    backbone_submodel,
    build_augmenter,
    build_model,
    finetune_count,
    set_trainable,
    training_model,
)
from trainer.run import (
    is_complete_run,
    now_iso,
    publish_run,
    read_json,
    save_model,
    start_run,
    versions,
)
from trainer.toy import is_synthetic

log = logging.getLogger("trainer")
PHASES = ("head", "finetune")
STATE_VERSION = 1


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    card: ModelCard
    history: pd.DataFrame
    best_epoch: int
    epochs_run: int
    wall_time_s: float
    is_chief: bool = True  # False on the other workers of a multi-worker run (they write no run)


# ---------------------------------------------------------------------------- preparation
def _check_out(out: Path, work: Path, *, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise RunDirError(f"--out {out} exists and is a file; choose a folder path.")
        if not overwrite:
            what = "a complete run" if is_complete_run(out) else "a non-empty folder"
            if is_complete_run(out) or any(out.iterdir()):
                raise RunDirError(f"--out {out} already holds {what}; pass --overwrite to "
                                  "replace it, or choose another --out.")
    if (work / "checkpoints" / "state.json").is_file() and not overwrite:
        raise RunDirError(f"An interrupted run for --out {out} exists at {work}. Continue it "
                          "with --resume, or pass --overwrite to start over.")


def _subsample(records: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """At most ``limit`` rows, each class keeping its share (and at least 3 rows if it has)."""
    if limit >= len(records):
        return records
    frac = limit / len(records)
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in records.groupby("dx", sort=True):
        n = min(len(group), max(3, int(round(frac * len(group)))))
        keep.extend(rng.choice(group.index.to_numpy(), size=n, replace=False).tolist())
    return records.loc[sorted(keep)].reset_index(drop=True)


def prepare(config: RunConfig) -> tuple[Any, int, pd.DataFrame, str]:
    """Cheap validation before anything heavy: backbone, size, weights file, data, splits.

    Returns ``(backbone spec, input size, records with split, layout)``.
    """

    if not config.data.path:
        raise ConfigError("No dataset given: pass --data PATH (or set data.path in the config; "
                          "`trainer toy-data --out DIR` makes a small synthetic one).")
    spec = get_backbone(config.model.backbone)
    size = config.model.input_size or spec.default_size
    if size < spec.min_size:
        raise ConfigError(f"model.input_size={size} is too small for backbone "
                          f"'{spec.name}' (needs >= {spec.min_size}; default "
                          f"{spec.default_size}).")
    w = config.model.weights
    if w is not None and w != "imagenet" and not Path(w).is_file():
        raise ConfigError(f"Weights file not found: {w}. Pass an existing file with --weights, "
                          "'imagenet' (downloads the standard Keras weights) or 'none'.")
    layout = config.data.layout
    records = load_records(config.data.path, layout=layout, images=config.data.images)
    if layout == "auto":
        layout = detect_layout(config.data.path)
    if config.data.limit:
        records = _subsample(records, config.data.limit, config.data.split_seed)
    if records["dx"].nunique() < 2:
        raise DataError(f"The dataset at {config.data.path} has a single class "
                        f"({records['dx'].iloc[0]!r}); training needs at least two.")
    try:
        records = split_records(records, val_fraction=config.data.val_fraction,
                                test_fraction=config.data.test_fraction,
                                seed=config.data.split_seed)
    except DataError:
        raise
    except ValueError as e:  # bad fractions slipped past config validation
        raise ConfigError(str(e)) from None
    if config.train.distill_from:
        check_teacher(config.train.distill_from)
        check_no_leak(config.train.distill_from, records)
    return spec, size, records, layout


def gpu_status() -> tuple[bool, str | None]:
    """``(GPU visible, why the check failed or None)``: "no GPU" is ``(False, None)``."""
    import keras

    try:
        return bool(keras.distribution.list_devices("gpu")), None
    except Exception as exc:  # noqa: BLE001 - any backend error means "could not tell"
        return False, f"{type(exc).__name__}: {exc}"


def _gpu_visible() -> bool:
    """True when Keras lists a GPU. A failed check counts as no GPU, and is logged: it turns
    ``mixed_precision: auto`` off and records ``training.device: cpu``."""
    visible, failure = gpu_status()
    if failure is not None:
        log.warning("Could not check for a GPU (%s); training as if there were none: "
                    "train.mixed_precision 'auto' stays off and the card records device 'cpu'.",
                    failure)
    return visible


def _mixed_precision(config: RunConfig) -> bool:
    mode = config.train.mixed_precision
    return mode == "on" or (mode == "auto" and _gpu_visible())


def _restore_final(model, ckpt: Path, state: dict, mode: str) -> None:
    """Load the weights the run keeps (``train.restore``) into ``model``."""
    if mode == "best" and (ckpt / "best.weights.h5").is_file():
        model.load_weights(str(ckpt / "best.weights.h5"))
    elif mode == "average" and state.get("averaged_epochs"):
        n = len(state["averaged_epochs"])
        with np.load(ckpt / "average_sum.npz") as z:
            model.set_weights([z[f"w{i:05d}"] / n for i in range(len(z.files))])


def _build(config: RunConfig, size: int):
    try:
        return build_model(config.model.backbone, input_size=size,
                           weights=config.model.weights, dropout=config.model.dropout)
    except DermedgeError:
        raise
    except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception on a failed download
        if config.model.weights != "imagenet" or "fetch failure" not in str(e).lower():
            raise
        raise DermedgeError(f"Could not download the ImageNet weights for "
                            f"'{config.model.backbone}' ({e}). Without internet, pass a local "
                            "weights file with --weights PATH, or --weights none.") from None


def _make_optimizer(config: RunConfig, lr: float):
    import keras

    t = config.train
    wd = t.weight_decay or None
    if t.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True,
                                    weight_decay=wd)
    if wd:
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=wd)
    return keras.optimizers.Adam(learning_rate=lr)


def _compile(config: RunConfig, train_model, phase: str, losses: dict) -> None:
    lr = config.train.head_lr if phase == "head" else config.train.lr
    train_model.compile(
        optimizer=_make_optimizer(config, lr),
        loss=losses,
        loss_weights=dict(config.train.loss_weights),
    )


def _restore(model, train_model, ckpt: Path, *, with_optimizer: bool) -> str | None:
    """Weights, random-number states (and optimizer state) of the last checkpoint into the
    freshly built models. Returns why the run will not reproduce the uninterrupted one, or
    None when it will."""
    from trainer.callbacks import rng_states

    model.load_weights(str(ckpt / "last.keras"))
    why = None
    states = rng_states(train_model)
    if not (ckpt / "last_rng.npz").is_file():  # checkpoints written before it existed
        why = ("the checkpoint holds no random-number states (written by an older dermedge), "
               "so dropout and augmentation draw differently from the uninterrupted run")
    else:
        with np.load(ckpt / "last_rng.npz") as z:
            src = [z[k] for k in sorted(z.files)]
        if len(src) == len(states):
            for dst, a in zip(states, src, strict=True):
                dst.assign(a)
        else:
            why = (f"the checkpoint holds {len(src)} random-number states but the model has "
                   f"{len(states)}, so dropout and augmentation draw differently")
    if not with_optimizer:
        return why
    opt = train_model.optimizer
    opt.build(train_model.trainable_variables)
    with np.load(ckpt / "last_optimizer.npz") as z:
        src = [z[k] for k in sorted(z.files)]
    if len(src) != len(opt.variables) or any(
            tuple(a.shape) != tuple(v.shape) for a, v in zip(src, opt.variables, strict=True)):
        raise RunDirError(f"The checkpoint in {ckpt} does not match this model's optimizer; "
                          "start over with --overwrite.")
    for dst, a in zip(opt.variables, src, strict=True):
        dst.assign(a)
    return why


# ---------------------------------------------------------------------------- fit
def fit(config: RunConfig | None, out: str | Path, *, overwrite: bool = False,
        resume: bool = False, callbacks: Sequence[Any] = (), verbose: int | None = None,
        progress: bool | None = None) -> RunResult:
    """Train ``config`` into the run directory ``out``; see the module docstring.

    ``resume``: continue ``<out>.partial`` (``config`` may be None, else it must equal the
    interrupted run's). ``callbacks``: extra Keras callbacks, run after the checkpoint.
    ``verbose``: Keras verbosity (default 1 on a TTY, else 2; 0 silences the epoch log too).
    """

    t_start = time.time()
    out = Path(out).expanduser().resolve()
    work = partial_dir(out)
    state_path = work / "checkpoints" / "state.json"
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    if progress is None:
        progress = bool(verbose)

    if resume:
        if not state_path.is_file():
            raise RunDirError(f"Nothing to resume for --out {out}: no interrupted run at {work} "
                              "(or it had not finished an epoch). Run without --resume.")
        saved = RunConfig.from_yaml(work / "config.yaml")
        if config is not None:
            diff = _diff(config.resolved().to_dict(), saved.to_dict())
            if diff:
                raise ConfigError("--resume continues the interrupted run with its own config, "
                                  f"but these settings differ: {'; '.join(diff[:6])}. Drop them "
                                  "from the command line, or start over with --overwrite.")
        config = saved
        state = read_json(state_path)
    else:
        if config is None:
            raise ConfigError("fit() needs a config unless resume=True.")
        config = config.resolved()
        config.validate()
        _check_out(out, work, overwrite=overwrite)
        state = None
    if config.name is None:
        import dataclasses

        config = dataclasses.replace(config, name=out.name)
    # Before anything starts TensorFlow: a multi-worker strategy must come first. Only the
    # chief builds <out>.partial; other workers train into a private temporary directory.
    plan = dist.plan(config)
    work = dist.work_dir(plan, out, resume=resume)
    state_path = work / "checkpoints" / "state.json"
    if verbose and plan.mode != "none":
        print(dist.summary(plan), flush=True)

    # Everything cheap and checkable happens before the first heavy step.
    if resume:
        spec = get_backbone(config.model.backbone)
        size = config.model.input_size or spec.default_size
        records = read_splits(work / "splits.csv")
        layout = state["layout"]
    else:
        spec, size, records, layout = prepare(config)
        if work.exists():
            shutil.rmtree(work)
        (work / "checkpoints").mkdir(parents=True)
    try:
        if not resume:
            start_run(work, records, config.to_yaml())
        result = _train_and_write(config, out, work, spec, size, records, layout, state,
                                  plan=plan, overwrite=overwrite, callbacks=callbacks,
                                  verbose=verbose, progress=progress, t_start=t_start)
    except BaseException:
        # Keep the work dir only if it can be resumed (an epoch finished), and only the chief's.
        if work.exists() and (not state_path.is_file() or not plan.is_chief):
            shutil.rmtree(work, ignore_errors=True)
        raise
    return result


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "loss_weights":
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (k == "name" and va is None):
            out.append(f"{prefix}{k}: {vb!r} (interrupted run) vs {va!r} (now)")
    return out


# ---------------------------------------------------------------------------- the steps
# _train_and_write runs them in order: state -> data -> build -> train phase(s) -> finalize ->
# write run. Each reads what the step before produced; the resumable state dict is shared.
def _train_and_write(config, out, work, spec, size, records, layout, state, *, plan,
                     overwrite, callbacks, verbose, progress, t_start) -> RunResult:
    import keras


    state = _start_state(config, layout, state)
    data = _load_data(config, records, size, state, progress=progress)
    losses = head_losses(config.train, data.train_y)
    mixed = _mixed_precision(config)
    previous_policy = keras.mixed_precision.global_policy().name
    scope = contextlib.ExitStack()
    try:
        scope.enter_context(dist.scope(plan))  # models and optimizers live on every replica
        if mixed:
            keras.mixed_precision.set_global_policy("mixed_float16")
        model, train_model = _build_models(config, size, plan)
        _train_phases(config, model, train_model, data, state, work, plan=plan, losses=losses,
                      callbacks=callbacks, verbose=verbose, t_start=t_start)
        final = _finalize(config, model, data, state, work)
        _save_model(config, size, model, work, mixed=mixed)
        kept = provenance.weights_sha256(model)
    finally:
        scope.close()
        keras.mixed_precision.set_global_policy(previous_policy)
    repro = provenance.record(config, work, data.train_images, data.val_images, kept)
    return _write_run(config, out, work, spec, size, records, layout, state, final, plan=plan,
                      mixed=mixed, overwrite=overwrite, t_start=t_start, repro=repro)


@dataclass(frozen=True)
class _Data:
    """What a run trains and validates on: split rows, labels, cached uint8 images, and the
    teacher's soft targets when distilling."""

    train_rec: pd.DataFrame
    val_rec: pd.DataFrame
    train_y: np.ndarray
    val_y: np.ndarray
    train_images: np.ndarray
    val_images: np.ndarray
    soft: Any = None


@dataclass(frozen=True)
class _Final:
    """The kept model measured on val: predictions, threshold, metrics, history."""

    p_mel: np.ndarray
    probs: np.ndarray
    threshold: float
    metrics: dict
    history: pd.DataFrame


def _start_state(config: RunConfig, layout: str, state: dict | None) -> dict:
    """A fresh resumable state, or the interrupted run's with its wall time carried over."""
    if state is not None:
        state["wall_time_before_s"] = state.get("wall_time_s", 0.0)
        return state
    return {"version": STATE_VERSION, "epoch": 0, "phase": None, "best_epoch": None,
            "best_value": None, "monitor": config.train.monitor,
            "best_weights": "checkpoints/best.weights.h5", "stopped_early": False,
            "history": [], "layout": layout, "seed": config.seed,
            "split_seed": config.data.split_seed, "wall_time_before_s": 0.0,
            "wall_time_s": 0.0}


def _load_data(config: RunConfig, records: pd.DataFrame, size: int, state: dict, *,
               progress: bool) -> _Data:
    """The splits' images through the cache, and the teacher's answers when distilling (their
    provenance goes into ``state["distillation"]``)."""
    from trainer.pipeline import labels_from_dx

    t = config.train
    train_rec = records[records["split"] == "train"].reset_index(drop=True)
    val_rec = records[records["split"] == "val"].reset_index(drop=True)
    train_y = labels_from_dx(train_rec["dx"])
    train_images = cache_images(train_rec["path"].tolist(), size, config.data.cache_dir,
                                workers=t.workers, progress=progress)
    val_images = cache_images(val_rec["path"].tolist(), size, config.data.cache_dir,
                              workers=t.workers, progress=progress)
    soft = None
    if t.distill_from:
        p_t, d_t, distillation = teacher_answers(
            t.distill_from, train_rec["path"].tolist(), cache_dir=config.data.cache_dir,
            batch_size=t.batch_size, workers=t.workers, progress=progress)
        adjust = log_prior(train_y, len(DIAGNOSIS_LABELS)) \
            if t.class_balance == "logit_adjust" else None
        soft = soft_targets(p_t, d_t, log_prior=adjust, tau=t.logit_adjust_tau)
        distillation.update({"weight": t.distill_weight,
                             "teacher_train_agreement": round(agreement(d_t, train_y), 4)})
        state["distillation"] = distillation
    return _Data(train_rec, val_rec, train_y, labels_from_dx(val_rec["dx"]), train_images,
                 val_images, soft)


def _build_models(config: RunConfig, size: int, plan):
    """``(inference model, training wrapper with the augmentation layers)``."""
    import keras


    t = config.train
    # The same seed on resume: the layers get the same random streams, and _restore puts
    # each stream where the interrupted run left it (so no draw of epoch 1 is replayed).
    keras.utils.set_random_seed(config.seed)
    model = _build(config, size)
    if t.bn_momentum is not None:
        for layer in backbone_submodel(model).layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = t.bn_momentum
    a = config.augment
    augmenter = (build_augmenter(flip=a.flip, rotation=a.rotation,
                                 translation=a.translation, zoom=a.zoom, shear=a.shear,
                                 brightness=a.brightness, contrast=a.contrast,
                                 saturation=a.saturation, seed=config.seed)
                 if a.enabled else None)
    train_model = training_model(model, augmenter)
    dist.adapt_models(plan, model, train_model)
    if t.epochs:  # a bad train.finetune_layers fails now, not after the head epochs
        finetune_count(model, t.finetune_layers)
    return model, train_model


def _train_phases(config: RunConfig, model, train_model, data: _Data, state: dict,
                  work: Path, *, plan, losses: dict, callbacks, verbose: int,
                  t_start: float) -> None:
    """The head phase (backbone frozen), then fine-tuning; each resumes where ``state`` says."""
    from trainer.callbacks import epoch_callbacks
    from trainer.pipeline import CachedDataset

    t = config.train
    total = t.head_epochs + t.epochs
    start_epoch = int(state["epoch"])
    for phase in PHASES:
        first = 0 if phase == "head" else t.head_epochs
        last = t.head_epochs if phase == "head" else total
        if last <= first or start_epoch >= last or state["stopped_early"]:
            continue
        set_trainable(model, phase, finetune_layers=t.finetune_layers, freeze_bn=t.freeze_bn)
        _compile(config, train_model, phase, losses)
        begin = max(first, int(state["epoch"]))
        if begin == start_epoch and start_epoch > 0:  # resuming in this session
            why = _restore(model, train_model, work / "checkpoints",
                           with_optimizer=state["phase"] == phase and begin > first)
            state.setdefault("resumed", []).append(
                {"after_epoch": start_epoch, "exact": why is None, "why": why})
        batches = dist.full_batch_dataset(
            plan, CachedDataset, data.train_images, data.train_y, batch_size=t.batch_size,
            shuffle=True, balance=t.class_balance, weight_method=t.class_weight_method,
            resample_cap=t.resample_cap, seed=config.seed, initial_epoch=begin,
            steps_per_epoch=t.steps_per_epoch, workers=t.workers,
            mixup=config.augment.mixup if config.augment.enabled else 0.0,
            soft_targets=data.soft, distill_weight=t.distill_weight)
        cbs = epoch_callbacks(config, model, train_model, work, data.val_images, data.val_y,
                              state, plan=plan, losses=losses, verbose=verbose,
                              t_start=t_start) + list(callbacks)
        # shuffle=False: CachedDataset already shuffles from (seed, epoch); Keras would also
        # permute the batch order from Python's global RNG, which tf.distribute's extra
        # pass over the generator advances, so 1 and N replicas would see different orders.
        train_model.fit(batches, epochs=last, initial_epoch=begin, callbacks=cbs,
                        verbose=0, shuffle=False)  # EpochLog prints one line per epoch


def _finalize(config: RunConfig, model, data: _Data, state: dict, work: Path) -> _Final:
    """The kept weights (best epoch, last, or averaged), calibration folded in, the melanoma
    threshold, and the val metrics, plots and history measured on them."""
    from trainer.pipeline import MEL_INDEX, predict_arrays

    t = config.train
    _restore_final(model, work / "checkpoints", state, t.restore)
    if t.calibrate:  # temperatures from single-pass predictions, folded into the heads

        p_mel, probs = predict_arrays(model, data.val_images, batch_size=t.batch_size)
        state["calibration"] = calibrate(model, p_mel, probs, data.val_y,
                                         data.val_y == MEL_INDEX, seed=config.seed,
                                         class_bias=t.class_bias)
    p_mel, probs = predict_arrays(model, data.val_images, batch_size=t.batch_size, tta=t.tta)
    threshold = choose_threshold(data.val_rec, p_mel, t.melanoma_threshold)
    metrics = score(data.val_rec, p_mel, probs, threshold=threshold)
    metrics.update({"split": "val", "source": config.data.path, "tta": bool(t.tta),
                    "best_epoch": state["best_epoch"]})
    history = pd.DataFrame(state["history"])
    write_outputs(work, data.val_rec, p_mel, probs, metrics, predictions=False, report=False,
                  history=history, best_epoch=state["best_epoch"])
    return _Final(p_mel, probs, threshold, metrics, history)


def _save_model(config: RunConfig, size: int, model, work: Path, *, mixed: bool) -> None:
    """``model.keras``, always float32 (a mixed-precision model is rebuilt clean first)."""
    import keras


    if mixed:
        keras.mixed_precision.set_global_policy("float32")
        clean = build_model(config.model.backbone, input_size=size, weights=None,
                            dropout=config.model.dropout)
        clean.set_weights(model.get_weights())
        model = clean
    save_model(model, work)


def _write_run(config, out, work, spec, size, records, layout, state, final: _Final, *, plan,
               mixed, overwrite, t_start, repro: dict | None = None) -> RunResult:
    """The card (with the metadata tables), then ``<out>.partial`` renamed to ``<out>``."""

    t = config.train
    wall = state["wall_time_before_s"] + time.time() - t_start
    # age/sex/site evidence for consumers that have it (trainer.metadata), or None
    prior = metadata_for_run(records, final.p_mel, final.probs, final.threshold,
                             t.melanoma_threshold)
    card = _card(config, spec, size, records, layout, state, final.metrics, final.threshold,
                 wall, mixed, plan=plan, prior=prior, repro=repro)
    if not t.keep_checkpoints:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if plan.is_chief:  # only the chief writes <out>
        publish_run(work, out, card, overwrite=overwrite)
    else:
        dist.finish(plan, work, out, overwrite=overwrite)
    return RunResult(run_dir=out, metrics=final.metrics, card=card, history=final.history,
                     best_epoch=state["best_epoch"], epochs_run=len(final.history),
                     wall_time_s=wall, is_chief=plan.is_chief)


def _card(config, spec, size, records, layout, state, metrics, threshold, wall, mixed, *,
          plan, prior, repro=None):
    """The run's typed card (dermedge.card), from what training measured."""
    import keras


    d = describe(records)
    return build_card(
        name=config.name, created=now_iso(), backbone=spec.name, backbone_layer=BACKBONE_NAME,
        weights=config.model.weights,
        input_size=size,
        preprocessing={"in_model": True, "mode": spec.preprocessing,
                       "formula": spec.preprocessing_formula},
        melanoma_threshold=threshold, diagnosis_labels=DIAGNOSIS_LABELS,
        melanoma_labels=MELANOMA_LABELS,
        data={"source": config.data.path, "layout": layout, "n_images": d["n_images"],
              "n_lesions": d.get("n_lesions"), "splits": d["splits"],
              "class_counts": {s: d["class_counts"][s] for s in ("train", "val", "test")}},
        synthetic=is_synthetic(config.data.path),
        config=config.to_dict(),
        training={"epochs_run": len(state["history"]), "best_epoch": state["best_epoch"],
                  "stopped_early": bool(state["stopped_early"]),
                  "monitor": config.train.monitor, "restore": config.train.restore,
                  "averaged_epochs": state.get("averaged_epochs", []),
                  "resumed": state.get("resumed", []),
                  "wall_time_s": round(wall, 1), "backend": keras.backend.backend(),
                  "device": "gpu" if _gpu_visible() else "cpu", "mixed_precision": mixed,
                  "distribution": dist.card_section(plan, config.train)},
        calibration=state.get("calibration"), distillation=state.get("distillation"),
        metrics_val=card_metrics(metrics), versions=versions(), metadata_prior=prior,
        reproducibility=repro)
