"""A bundle runs in a fresh venv with only ai-edge-litert, numpy and pillow (no TensorFlow).

The venv is cached under ~/.cache/dermedge/ keyed by the pinned versions, so reruns are quick;
the first run needs PyPI (the test skips, saying so, when pip cannot reach it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable
from export_fixtures import make_run_dir

from dermedge.files import cache_dir
from dermedge.litert import run_tflite
from export.api import QuantizationConfig, export_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")

PACKAGES = ("ai-edge-litert==2.3.0", "numpy", "pillow")
SNIPPET = Path(__file__).resolve().parents[1] / "export" / "snippets" / "run_bundle.py"


def _litert_venv() -> Path:
    key = "-".join(p.replace("==", "").replace("-", "") for p in PACKAGES)
    env = cache_dir() / f"litert-venv-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    py = env / "bin" / "python"
    if (env / ".complete").is_file():
        return py
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           *PACKAGES], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        unavailable(f"cannot build the LiteRT-only venv (pip: {proc.stderr.strip()[-300:]})")
    (env / ".complete").write_text("ok\n")
    return py


def test_bundle_runs_without_tensorflow(tmp_path):
    py = _litert_venv()
    probe = subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    run = make_run_dir(tmp_path, size=32, train_per_class=3, val_per_class=1)
    photos = sorted((tmp_path / "tiny_images").glob("*.jpg"))[:4]
    from trainer.data import load_image

    pixels = np.stack([load_image(p, 32) for p in photos])
    for cfg in (QuantizationConfig.int8(14), QuantizationConfig.float32()):
        bundle = export_run(run, cfg, tmp_path / cfg.mode).path
        proc = subprocess.run([str(py), str(SNIPPET), str(bundle), *map(str, photos)],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"})
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        ref = run_tflite(bundle, pixels)
        assert len(rows) == len(photos)
        for i, row in enumerate(rows):
            assert row["melanoma"] == pytest.approx(float(ref["melanoma"][i, 0]), abs=1e-5)
            got = np.array(list(row["diagnosis"].values()))
            np.testing.assert_allclose(got, ref["diagnosis"][i], atol=1e-5)
            assert list(row["diagnosis"]) == json.loads(
                (bundle / "model_card.json").read_text())["heads"]["diagnosis"]["labels"]
