"""Backend-agnostic input pipeline: a ``keras.utils.PyDataset`` over the uint8 image cache.

No TensorFlow import here: the same code feeds ``model.fit`` under the tensorflow, jax and
torch backends. Augmentation is not done here; it lives in the training model as layers.
"""

from __future__ import annotations

import keras
import numpy as np

from dermedge.labels import DIAGNOSIS_LABELS, MELANOMA_DX
from trainer.data import class_weights, resample_indices

N_CLASSES = len(DIAGNOSIS_LABELS)
MEL_INDEX = DIAGNOSIS_LABELS.index(MELANOMA_DX)
BALANCE_MODES = ("weights", "resample", "both", "logit_adjust", "none")


def labels_from_dx(dx) -> np.ndarray:
    """Diagnosis codes -> class indices in head order."""
    index = {d: i for i, d in enumerate(DIAGNOSIS_LABELS)}
    return np.array([index[str(d)] for d in dx], dtype=np.int64)


class CachedDataset(keras.utils.PyDataset):
    """Batches ``(images float32, {melanoma, diagnosis}, {melanoma, diagnosis} weights)``.

    ``balance``: ``weights`` = per-class weights per head as sample weights (the melanoma
    head gets its own binary weights), ``resample`` = capped per-class oversampling drawn
    anew each epoch, ``both``, or ``none`` / ``logit_adjust`` (unit weights: the loss does the
    balancing, see trainer/losses.py). The order is reshuffled every epoch from
    ``seed`` and the epoch number, so a resumed run sees the same batches.

    ``mixup`` > 0 (the Beta(alpha, alpha) parameter; Zhang et al. 2018): each image is blended
    with another image of the same batch, ``lam * x_i + (1 - lam) * x_j`` with
    ``lam = max(l, 1 - l)``, ``l ~ Beta(alpha, alpha)`` drawn per image, and so are both heads'
    targets and the sample weights. The draws come from (seed, epoch, batch), like the order.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 32,
                 shuffle: bool = True, balance: str = "weights",
                 weight_method: str = "median_frequency", resample_cap: float = 5.0,
                 seed: int = 0, initial_epoch: int = 0, steps_per_epoch: int | None = None,
                 mixup: float = 0.0, soft_targets: dict | None = None,
                 distill_weight: float = 0.0, workers: int = 1, max_queue_size: int = 10):
        super().__init__(workers=workers, use_multiprocessing=False,
                         max_queue_size=max_queue_size)
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}; received {balance!r}.")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        if len(images) == 0:
            raise ValueError("CachedDataset needs at least one image.")
        if not 0.0 <= float(mixup):
            raise ValueError(f"mixup must be >= 0 (0 = off); received {mixup!r}.")
        self.mixup = float(mixup)
        self.distill_weight = float(distill_weight) if soft_targets is not None else 0.0
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1]; received {distill_weight!r}.")
        self.soft = None
        if soft_targets is not None:
            self.soft = {"melanoma": np.asarray(soft_targets["melanoma"], np.float32)
                         .reshape(-1, 1),
                         "diagnosis": np.asarray(soft_targets["diagnosis"], np.float32)}
            if (len(self.soft["melanoma"]) != len(images)
                    or self.soft["diagnosis"].shape != (len(images), N_CLASSES)):
                raise ValueError(f"soft_targets must hold one answer per image ({len(images)}); "
                                 f"received {len(self.soft['melanoma'])} melanoma and "
                                 f"{self.soft['diagnosis'].shape} diagnosis answers.")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.mel = (self.labels == MEL_INDEX).astype(np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.balance = balance
        self.resample_cap = float(resample_cap)
        self.seed = int(seed)
        self.epoch = int(initial_epoch)
        self._onehot = np.eye(N_CLASSES, dtype=np.float32)

        resample = balance in ("resample", "both")
        self._n = len(resample_indices(self.labels, cap=self.resample_cap, seed=self.seed)
                      if resample else self.labels)
        if balance in ("weights", "both"):
            # Weights from the class mix the model actually sees (after resampling, if any).
            seen = self.labels[self._draw(0)] if resample else self.labels
            seen_mel = (seen == MEL_INDEX).astype(np.int64)
            self.diag_weights = class_weights(seen, N_CLASSES, method=weight_method)
            self.mel_weights = class_weights(seen_mel, 2, method=weight_method)
        else:
            self.diag_weights = np.ones(N_CLASSES)
            self.mel_weights = np.ones(2)
        self._steps = -(-self._n // self.batch_size)
        if steps_per_epoch is not None:
            self._steps = min(self._steps, int(steps_per_epoch))
        self._order = self._draw(self.epoch)

    def _draw(self, epoch: int) -> np.ndarray:
        seed = [self.seed & 0xFFFFFFFF, epoch]
        if self.balance in ("resample", "both"):
            s = int(np.random.default_rng(seed).integers(2**31))
            idx = resample_indices(self.labels, cap=self.resample_cap, seed=s)
        else:
            idx = np.arange(len(self.labels))
        if self.shuffle:
            idx = np.random.default_rng(seed).permutation(idx)
        return idx

    def __len__(self) -> int:
        return self._steps

    def batch_indices(self, i: int) -> np.ndarray:
        # Sorted so memmap reads go forward; order inside a batch does not matter.
        return np.sort(self._order[i * self.batch_size:(i + 1) * self.batch_size])

    def __getitem__(self, i: int):
        idx = self.batch_indices(i)
        x = np.asarray(self.images[idx], dtype=np.float32)
        y = self.labels[idx]
        mel = self.mel[idx]
        targets = {"melanoma": mel.astype(np.float32)[:, None],
                   "diagnosis": self._onehot[y]}
        if self.soft is not None and self.distill_weight > 0:
            a = np.float32(self.distill_weight)
            targets = {k: (1 - a) * v + a * self.soft[k][idx] for k, v in targets.items()}
        weights = {"melanoma": self.mel_weights[mel].astype(np.float32),
                   "diagnosis": self.diag_weights[y].astype(np.float32)}
        if self.mixup > 0 and len(idx) > 1:
            x, targets, weights = self._mix(i, x, targets, weights)
        return x, targets, weights

    def _mix(self, i: int, x: np.ndarray, targets: dict, weights: dict):
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, i, 1])
        n = len(x)
        lam = rng.beta(self.mixup, self.mixup, size=n).astype(np.float32)
        lam = np.maximum(lam, 1.0 - lam)  # each image stays the main one of its blend
        j = rng.permutation(n)

        def blend(a: np.ndarray) -> np.ndarray:
            shape = (n,) + (1,) * (a.ndim - 1)
            w = lam.reshape(shape)
            return w * a + (1.0 - w) * a[j]

        return (blend(x), {k: blend(v) for k, v in targets.items()},
                {k: blend(v) for k, v in weights.items()})

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._draw(self.epoch)


TTA_FLIPS = ((False, False), (True, False), (False, True), (True, True))


def predict_arrays(model, images: np.ndarray, batch_size: int = 64,
                   tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(p_mel (N,), probs_diag (N, 7))`` for uint8 ``images`` (N, S, S, 3), read by output name.

    ``tta``: mean over identity, horizontal, vertical and both flips.
    """
    n = len(images)
    p_mel = np.zeros(n, dtype=np.float64)
    probs = np.zeros((n, N_CLASSES), dtype=np.float64)
    flips = TTA_FLIPS if tta else TTA_FLIPS[:1]
    for start in range(0, n, batch_size):
        x = np.asarray(images[start:start + batch_size], dtype=np.float32)
        for hflip, vflip in flips:
            xb = x
            if hflip:
                xb = xb[:, :, ::-1]
            if vflip:
                xb = xb[:, ::-1]
            out = model.predict_on_batch(np.ascontiguousarray(xb))
            p_mel[start:start + len(x)] += np.asarray(out["melanoma"], np.float64).reshape(-1)
            probs[start:start + len(x)] += np.asarray(out["diagnosis"], np.float64)
    p_mel /= len(flips)
    probs /= len(flips)
    return p_mel, probs
