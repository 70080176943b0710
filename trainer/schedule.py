"""The learning-rate schedule of ``trainer fit``: a head phase (backbone frozen), then
fine-tuning with optional warm-up and a cosine or step decay, scaled for the global batch."""

from __future__ import annotations

import math

from trainer import distribute as dist
from trainer.config import RunConfig


def lr_at(config: RunConfig, epoch: int) -> float:
    """Learning rate of global epoch ``epoch`` (0-based): head phase, then fine-tune, scaled
    for the global batch by ``train.lr_scaling``."""
    return _schedule(config, epoch) * dist.lr_factor(config.train)


def _schedule(config: RunConfig, epoch: int) -> float:
    t = config.train
    if epoch < t.head_epochs:
        return t.head_lr
    e = epoch - t.head_epochs
    if e < t.warmup_epochs:
        return t.lr * (e + 1) / (t.warmup_epochs + 1)
    e -= t.warmup_epochs
    total = max(1, t.epochs - t.warmup_epochs)
    if t.schedule == "cosine":
        return t.lr * 0.5 * (1 + math.cos(math.pi * e / total))
    if t.schedule == "step":
        return t.lr * t.step_gamma ** (e // max(1, t.step_epochs))
    return t.lr


def phase_of(config: RunConfig, epoch: int) -> str:
    """``head`` or ``finetune``: the phase global epoch ``epoch`` (0-based) belongs to."""
    return "head" if epoch < config.train.head_epochs else "finetune"
