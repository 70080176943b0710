"""What a run's figures depend on, recorded in its card (``reproducibility``), and how two
records differ (``trainer fit --reproduce``).

Training is deterministic for a given code, data, config, seed, package set and machine: the
same inputs give the same weights bit for bit. Change any of them and the weights drift, and
after a 12-epoch fine-tune the validation figures move by about as much as a different seed
moves them (benchmarks/recipes.md, Reproducibility). The machine part is the CPU's instruction
set and thread count: oneDNN and Eigen pick kernels and split reductions by them, so float
sums are added in another order. No TensorFlow at import.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Distributions whose code runs while training or scoring, beyond those trainer.run.versions()
# names (keras, the backend, numpy, python): the split (pandas), the decode (Pillow), the
# checkpoints (h5py), float16/bfloat16 types (ml-dtypes), the config (PyYAML).
PACKAGES: tuple[str, ...] = ("pandas", "pillow", "h5py", "ml-dtypes", "pyyaml")
# CPU features that change which oneDNN / Eigen kernels run (x86-64 and Arm names).
ISA_FLAGS: tuple[str, ...] = ("amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma",
                              "avx", "sse4_2", "sve", "asimd")
# Settings that change the numerics without changing the code (unset ones are not recorded).
NUMERICS_ENV: tuple[str, ...] = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA",
                                 "DNNL_MAX_CPU_ISA", "TF_NUM_INTRAOP_THREADS",
                                 "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
                                 "TF_DETERMINISTIC_OPS", "KERAS_BACKEND")
REPO = Path(__file__).resolve().parents[1]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_array(a: np.ndarray) -> str:
    """SHA-256 of an array's bytes (C order), read in slices so a memmap stays on disk."""
    h = hashlib.sha256()
    a = np.atleast_1d(a)
    step = max(1, (64 << 20) // max(1, a[:1].nbytes))
    for i in range(0, len(a), step):
        h.update(np.ascontiguousarray(a[i:i + step]).tobytes())
    return h.hexdigest()


def weights_sha256(model) -> str:
    """SHA-256 over a model's weights as float32, in ``get_weights()`` order: two runs that
    computed the same thing have the same value."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """``{distribution: version}`` for :data:`PACKAGES` that are installed."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _cpu_info() -> tuple[str, list[str]]:
    """``(model name, flags)`` from /proc/cpuinfo (Linux), else platform's answer and none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), []
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), sorted(flags)


def machine() -> dict[str, Any]:
    """The CPU, its numerics-relevant features, the usable cores and the numerics settings."""
    model, flags = _cpu_info()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return {"cpu": model, "arch": platform.machine(), "cores": cores,
            "isa": [f for f in ISA_FLAGS if f in flags],
            "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ}}


def code_version(root: Path = REPO) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the dermedge checkout, or None when it is not a git checkout
    (an installed wheel). ``dirty``: tracked files under the training code changed."""
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10)

        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no", "--", "dermedge",
                     "trainer", "configs", "pyproject.toml")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(),
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def weights_file(backbone: str, weights: str | None) -> str | None:
    """The file ``weights`` loads for ``backbone`` (None: random init or a Keras download)."""
    if weights is None:
        return None
    if weights != "imagenet":
        return weights
    from trainer.backbones import get_backbone

    resolved = get_backbone(backbone).resolve_weights(weights)
    return None if resolved == "imagenet" else resolved


def record(config, work: Path, train_images: np.ndarray, val_images: np.ndarray,
           model_sha256: str | None = None) -> dict:
    """The card's ``reproducibility`` section for a run being written in ``work``
    (``model_sha256``: :func:`weights_sha256` of the model it keeps)."""
    path = weights_file(config.model.backbone, config.model.weights)
    return {
        "model_weights_sha256": model_sha256,
        "seeds": {"seed": config.seed, "split_seed": config.data.split_seed},
        "config_sha256": sha256_file(work / "config.yaml"),
        "splits_sha256": sha256_file(work / "splits.csv"),
        "images_sha256": {"train": sha256_array(train_images),
                          "val": sha256_array(val_images)},
        "weights": None if path is None else {"path": str(Path(path).resolve()),
                                              "sha256": sha256_file(path)},
        "code": code_version(),
        "machine": machine(),
    }


def differences(recorded: Mapping, now: Mapping) -> list[tuple[str, Any, Any]]:
    """``(what, recorded, now)`` for each input that differs between two runs' cards: the
    ``reproducibility`` sections (the data path aside) and ``versions``."""
    a, b = recorded.get("reproducibility") or {}, now.get("reproducibility") or {}
    out: list[tuple[str, Any, Any]] = []
    if not a:
        out.append(("reproducibility", "not recorded (a run from an older dermedge)",
                    "recorded"))
    else:
        for key in ("seeds", "config_sha256", "splits_sha256", "images_sha256"):
            if a.get(key) != b.get(key):
                out.append((key, a.get(key), b.get(key)))
        wa, wb = a.get("weights") or {}, b.get("weights") or {}
        if wa.get("sha256") != wb.get("sha256"):
            out.append(("weights.sha256", wa.get("sha256"), wb.get("sha256")))
        ca, cb = a.get("code") or {}, b.get("code") or {}
        for key in ("commit", "dirty"):
            if ca.get(key) != cb.get(key):
                out.append((f"code.{key}", ca.get(key), cb.get(key)))
        ma, mb = a.get("machine") or {}, b.get("machine") or {}
        for key in ("cpu", "arch", "cores", "isa", "env"):
            if ma.get(key) != mb.get(key):
                out.append((f"machine.{key}", ma.get(key), mb.get(key)))
    va, vb = recorded.get("versions") or {}, now.get("versions") or {}
    for key in sorted(set(va) | set(vb)):
        if va.get(key) != vb.get(key):
            out.append((f"versions.{key}", va.get(key), vb.get(key)))
    return out
