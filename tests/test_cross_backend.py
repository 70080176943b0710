"""A model trained under KERAS_BACKEND=jax or torch loads under TensorFlow, same predictions.

The other backend runs in a subprocess (Keras fixes its backend at import); the test process
is the TensorFlow side. Skipped when that backend is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable

REPO = Path(__file__).resolve().parents[1]
MISSING_BACKEND = 3

TRAIN_SCRIPT = r"""
import importlib, sys
backend, out = sys.argv[1], sys.argv[2]
try:
    importlib.import_module(backend)
except ImportError as e:
    print(f"{backend} is not installed: {e}", file=sys.stderr)
    sys.exit(__MISSING__)
import numpy as np
import keras
assert keras.backend.backend() == backend, keras.backend.backend()
from trainer.model import build_augmenter, build_model, training_model

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
model = build_model("tiny_cnn", input_size=32, weights=None)
# Geometric augmentation works here too, but XLA-compiling it costs ~40 s of CPU under jax;
# the saved inference model does not contain the augmenter, so keep the cheap layers only.
train = training_model(model, build_augmenter(rotation=0, translation=0, zoom=0, shear=0, seed=0))
train.compile(
    optimizer=keras.optimizers.Adam(1e-2),
    loss={"melanoma": "binary_crossentropy", "diagnosis": "categorical_crossentropy"},
)
initial = keras.ops.convert_to_numpy(model.get_layer("diagnosis").kernel).copy()
x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
dx = rng.integers(0, 7, 8)
y = {"melanoma": (dx == 4).astype("float32")[:, None], "diagnosis": np.eye(7, dtype="float32")[dx]}
train.fit(x, y, batch_size=4, epochs=1, verbose=0)
model.save(f"{out}/model.keras")
probe = rng.uniform(0, 255, (3, 32, 32, 3)).astype("float32")
pred = model.predict(probe, verbose=0)
np.savez(
    f"{out}/pred.npz",
    probe=probe, initial=initial, melanoma=pred["melanoma"], diagnosis=pred["diagnosis"],
)
""".replace("__MISSING__", str(MISSING_BACKEND))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_model_trained_on_other_backend_loads_under_tensorflow(backend, tmp_path):
    import keras

    if keras.backend.backend() != "tensorflow":
        unavailable(f"the test process must run the TensorFlow backend, not "
                    f"{keras.backend.backend()!r}: unset KERAS_BACKEND")
    env = dict(os.environ, KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, backend, str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == MISSING_BACKEND:
        why = proc.stderr.strip().splitlines()[-1]
        unavailable(f"needs PyTorch: {why}" if backend == "torch"
                    else f"KERAS_BACKEND={backend} unavailable: {why}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    loaded = keras.saving.load_model(tmp_path / "model.keras")
    with np.load(tmp_path / "pred.npz") as ref:
        got = loaded.predict(ref["probe"], verbose=0)
        for key in ("melanoma", "diagnosis"):
            np.testing.assert_allclose(got[key], ref[key], atol=1e-5)
        # The file holds the trained weights, not the initial ones.
        assert not np.allclose(loaded.get_layer("diagnosis").kernel.numpy(), ref["initial"])
    assert loaded.name == "dermedge_tiny_cnn"
