"""The training loop's jobs, one small Keras callback each (``trainer fit`` runs them in the
order of :func:`epoch_callbacks`).

They share the run's resumable ``state`` (``checkpoints/state.json``: history, best epoch,
averaged epochs, where to resume) and Keras' per-epoch ``logs``, into which
:class:`ValidationMetrics` puts the ``val_*`` figures the later ones read.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from dermedge.files import atomic_path, write_json
from dermedge.labels import DIAGNOSIS_LABELS
from dermedge.metrics import balanced_accuracy, roc_auc
from trainer import distribute as dist
from trainer.config import MAXIMISED_MONITORS, RunConfig
from trainer.losses import val_loss
from trainer.pipeline import MEL_INDEX, predict_arrays
from trainer.schedule import lr_at, phase_of


class LearningRate(keras.callbacks.Callback):
    """Sets each epoch's learning rate from the schedule (``trainer.schedule.lr_at``)."""

    def __init__(self, config: RunConfig, train_model):
        super().__init__()
        self.config, self.train_model = config, train_model

    def on_epoch_begin(self, epoch, logs=None):
        opt = self.train_model.optimizer
        getattr(opt, "inner_optimizer", opt).learning_rate = lr_at(self.config, epoch)


class ValidationMetrics(keras.callbacks.Callback):
    """Predicts the val split with the inference model; adds ``val_loss``, ``val_accuracy``,
    ``val_balanced_accuracy`` and ``val_melanoma_auc`` to the epoch's logs."""

    def __init__(self, config: RunConfig, model, images: np.ndarray, y: np.ndarray,
                 losses: dict):
        super().__init__()
        self.config, self.inference, self.images, self.y = config, model, images, y
        self.losses = losses
        self.mel_true = (y == MEL_INDEX).astype(np.int64)

    def on_epoch_end(self, epoch, logs=None):
        p_mel, probs = predict_arrays(self.inference, self.images,
                                      batch_size=self.config.train.batch_size)
        pred = probs.argmax(axis=1)
        both = 0 < self.mel_true.sum() < len(self.mel_true)
        logs.update({
            "val_loss": val_loss(self.losses, self.mel_true, p_mel, self.y, probs,
                                 loss_weights=self.config.train.loss_weights),
            "val_accuracy": float(np.mean(pred == self.y)),
            "val_balanced_accuracy": balanced_accuracy(self.y, pred, len(DIAGNOSIS_LABELS)),
            "val_melanoma_auc": roc_auc(self.mel_true, p_mel) if both else float("nan"),
        })


class History(keras.callbacks.Callback):
    """One row per epoch in ``state["history"]`` and ``history.csv`` (rewritten atomically)."""

    def __init__(self, config: RunConfig, work: Path, state: dict):
        super().__init__()
        self.config, self.work, self.state = config, work, state
        self._t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "phase": phase_of(self.config, epoch),
               "lr": lr_at(self.config, epoch), "loss": float(logs.get("loss", float("nan")))}
        row.update({k: float(v) for k, v in sorted(logs.items())
                    if not k.startswith("val_") and k != "loss"})
        row.update({k: float(v) for k, v in logs.items() if k.startswith("val_")})
        row["time_s"] = round(time.time() - self._t0, 2)
        self.state["history"].append(row)
        with atomic_path(self.work / "history.csv") as tmp:
            pd.DataFrame(self.state["history"]).to_csv(tmp, index=False)


class BestWeights(keras.callbacks.Callback):
    """Tracks ``train.monitor``; saves ``best.weights.h5`` whenever it improves."""

    def __init__(self, config: RunConfig, model, ckpt: Path, state: dict):
        super().__init__()
        self.monitor = config.train.monitor
        self.maximise = self.monitor in MAXIMISED_MONITORS
        self.inference, self.ckpt, self.state = model, ckpt, state
        self.improved = False

    def on_epoch_end(self, epoch, logs=None):
        value, best = logs[self.monitor], self.state["best_value"]
        self.improved = math.isfinite(value) and (
            best is None or (value > best if self.maximise else value < best))
        if self.improved or self.state["best_epoch"] is None:
            self.state["best_value"] = value if math.isfinite(value) else None
            self.state["best_epoch"] = epoch + 1
            self.inference.save_weights(str(self.ckpt / "best.weights.h5"))


class WeightAveraging(keras.callbacks.Callback):
    """``train.restore: average``: sums the last ``train.average_epochs`` epochs' weights in
    ``average_sum.npz`` (resumable; ``state["averaged_epochs"]`` says which)."""

    def __init__(self, config: RunConfig, model, ckpt: Path, state: dict):
        super().__init__()
        t = config.train
        self.first = t.head_epochs + t.epochs - t.average_epochs + 1
        self.enabled = t.restore == "average"
        self.inference, self.ckpt, self.state = model, ckpt, state

    def on_epoch_end(self, epoch, logs=None):
        if not self.enabled or epoch + 1 < self.first:
            return
        weights = self.inference.get_weights()
        done = self.state.setdefault("averaged_epochs", [])
        if done:
            with np.load(self.ckpt / "average_sum.npz") as z:
                weights = [z[f"w{i:05d}"] + w for i, w in enumerate(weights)]
        with atomic_path(self.ckpt / "average_sum.npz", suffix=".npz") as tmp:
            np.savez(tmp, **{f"w{i:05d}": w for i, w in enumerate(weights)})
        done.append(epoch + 1)


class StopAgreement(keras.callbacks.Callback):
    """Early stopping (fine-tune phase, ``restore: best``, ``early_stopping_patience``), decided
    by every worker together so all stop at the same epoch."""

    def __init__(self, config: RunConfig, train_model, state: dict, plan):
        super().__init__()
        self.config, self.train_model, self.state, self.plan = config, train_model, state, plan

    def on_epoch_end(self, epoch, logs=None):
        t = self.config.train
        stop = (phase_of(self.config, epoch) == "finetune" and t.restore == "best"
                and t.early_stopping_patience > 0
                and epoch + 1 - self.state["best_epoch"] >= t.early_stopping_patience)
        if dist.agree(self.plan, stop):
            self.state["stopped_early"] = True
            self.train_model.stop_training = True


class Checkpoint(keras.callbacks.Callback):
    """``checkpoints/last.keras`` + optimizer and random states + ``state.json``: what
    ``--resume`` continues from."""

    def __init__(self, config: RunConfig, model, train_model, ckpt: Path, state: dict,
                 t_start: float):
        super().__init__()
        self.config, self.inference, self.train_model = config, model, train_model
        self.ckpt, self.state, self.t_start = ckpt, state, t_start

    def on_epoch_end(self, epoch, logs=None):
        save_last(self.inference, self.train_model, self.ckpt)
        self.state["epoch"] = epoch + 1
        self.state["phase"] = phase_of(self.config, epoch)
        self.state["wall_time_s"] = (self.state["wall_time_before_s"] + time.time()
                                     - self.t_start)
        write_json(self.ckpt / "state.json", jsonable_state(self.state))


class EpochLog(keras.callbacks.Callback):
    """One line per epoch on stdout (``verbose`` > 0): phase, lr, losses, val metrics."""

    def __init__(self, total: int, state: dict, best: BestWeights):
        super().__init__()
        self.total, self.state, self.best = total, state, best

    def on_epoch_end(self, epoch, logs=None):
        row = self.state["history"][-1]
        mark = " *best*" if self.best.improved else ""
        stop = "  early stop" if self.state.get("stopped_early") else ""
        print(f"epoch {epoch + 1}/{self.total} [{row['phase']}] lr {row['lr']:.2e} "
              f"loss {row.get('loss', float('nan')):.4f} val_loss {row['val_loss']:.4f} "
              f"val_bal_acc {row['val_balanced_accuracy']:.3f} "
              f"val_acc {row['val_accuracy']:.3f} "
              f"val_mel_auc {row['val_melanoma_auc']:.3f} ({row['time_s']:.1f}s)"
              f"{mark}{stop}", flush=True)


def epoch_callbacks(config: RunConfig, model, train_model, work: Path, val_images, val_y,
                    state: dict, *, plan, losses: dict, verbose: int,
                    t_start: float) -> list[keras.callbacks.Callback]:
    """The loop's callbacks, in the order they must run each epoch."""
    ckpt = work / "checkpoints"
    best = BestWeights(config, model, ckpt, state)
    cbs = [LearningRate(config, train_model),
           ValidationMetrics(config, model, val_images, val_y, losses),
           History(config, work, state), best,
           WeightAveraging(config, model, ckpt, state),
           StopAgreement(config, train_model, state, plan),
           Checkpoint(config, model, train_model, ckpt, state, t_start)]
    if verbose:
        cbs.append(EpochLog(config.train.head_epochs + config.train.epochs, state, best))
    return cbs


# ---------------------------------------------------------------------------- checkpoint files
def save_last(model, train_model, ckpt: Path) -> None:
    """``last.keras`` (the inference model: it shares every trained weight with the training
    wrapper, whose augmentation layers hold none) + the optimizer state and the random states
    as ``.npz``.

    Saving the training wrapper itself would be simpler, but Keras 3.15 cannot reload a
    ``RandomShear`` layer from a ``.keras`` file.
    """
    with atomic_path(ckpt / "last.keras", suffix=".keras") as tmp:
        model.save(str(tmp))
    _save_arrays(ckpt / "last_optimizer.npz", train_model.optimizer.variables)
    _save_arrays(ckpt / "last_rng.npz", rng_states(train_model))


def _save_arrays(path: Path, variables) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **{f"v{i:05d}": np.asarray(v) for i, v in enumerate(variables)})


def rng_states(train_model) -> list:
    """The dropout and augmentation layers' random-number states. Keras keeps them out of the
    weights; a resumed run restores them so it draws what the uninterrupted run would."""
    return [v for v in train_model.variables if "seed_generator_state" in v.path]


def jsonable_state(state: dict) -> Any:
    """``state`` with non-finite floats as ``null`` (JSON has no NaN)."""
    if isinstance(state, float) and not math.isfinite(state):
        return None
    if isinstance(state, dict):
        return {k: jsonable_state(x) for k, x in state.items()}
    if isinstance(state, list):
        return [jsonable_state(x) for x in state]
    return state
