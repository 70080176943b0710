"""A real consumer: MediaPipe Tasks ``ImageClassifier`` (Python API, mediapipe 0.10.21 in its
pinned venv) runs exported bundles with no code but the documented options.

Both heads come back by name with their labels; on pre-cropped pixels the int8 bundle's scores
are bit-identical to LiteRT's; on raw 600x450 photos with the centred square as the region of
interest they are within ``ROI_TOLERANCE`` of the image contract's pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from export_fixtures import make_run_dir, smooth_images
from mediapipe_fixtures import mediapipe_env

from dermedge.litert import run_tflite
from export.api import QuantizationConfig, export_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")

# MediaPipe crops and resizes the region of interest itself (no antialiasing); Pillow's bilinear
# resize of the contract does. Measured on 16 photos at 64 px: max 0.0078 (two int8 steps).
ROI_TOLERANCE = 0.03
# MediaPipe ships its own TFLite build: float32 kernels may round the last bit differently.
FLOAT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    mediapipe_env()
    tmp = tmp_path_factory.mktemp("mp")
    run = make_run_dir(tmp, size=64, train_per_class=3, val_per_class=1)
    return {"int8": export_run(run, QuantizationConfig.int8(14), tmp / "int8").path,
            "float32": export_run(run, QuantizationConfig.float32(), tmp / "f32").path}


def _card(bundle):
    return json.loads((bundle / "model_card.json").read_text())


@pytest.mark.parametrize("mode", ["int8", "float32"])
def test_image_classifier_names_heads_and_matches_litert(bundles, mode):
    from export.tflite_metadata import mediapipe_classify

    bundle = bundles[mode]
    card = _card(bundle)
    images = smooth_images(4, 64, seed=3)
    got = mediapipe_classify(bundle / "model.tflite", list(images))
    ref = run_tflite(bundle, images)
    order = card["export"]["metadata"]["output_order"]
    assert sorted(order) == ["diagnosis", "melanoma", "ood"]  # ood: the input gate's score
    for i, heads in enumerate(got):
        assert list(heads) == order  # by name, in the subgraph's output order
        assert [heads[n]["index"] for n in order] == [0, 1, 2]
        assert heads["melanoma"]["labels"] == ["melanoma"]
        assert heads["diagnosis"]["labels"] == card["heads"]["diagnosis"]["labels"]
        assert heads["ood"]["labels"] == ["not_dermoscopy"]
        ood = heads["ood"]["scores"]
        if mode == "int8":
            assert np.array_equal(ood, ref["ood"][i])
        else:
            np.testing.assert_allclose(ood, ref["ood"][i], atol=FLOAT_TOLERANCE, rtol=0)
        mel, dx = heads["melanoma"]["scores"], heads["diagnosis"]["scores"]
        if mode == "int8":  # MediaPipe dequantizes the uint8 outputs exactly as LiteRT does
            assert np.array_equal(mel, ref["melanoma"][i]) and np.array_equal(dx,
                                                                              ref["diagnosis"][i])
        else:
            np.testing.assert_allclose(mel, ref["melanoma"][i], atol=FLOAT_TOLERANCE, rtol=0)
            np.testing.assert_allclose(dx, ref["diagnosis"][i], atol=FLOAT_TOLERANCE, rtol=0)


@pytest.mark.shared
def test_raw_photo_with_centred_square_roi_is_within_tolerance(bundles, shared_dir):
    from dermedge.image import load_image
    from export.tflite_metadata import mediapipe_classify

    bundle = bundles["int8"]
    photos = sorted((shared_dir / "data" / "ham10000_raw_600x450" / "images").glob("*.jpg"))[:8]
    assert len(photos) == 8
    ref = run_tflite(bundle, np.stack([load_image(p, 64) for p in photos]))

    def diff(roi: bool) -> np.ndarray:
        got = mediapipe_classify(bundle / "model.tflite", photos, roi=roi)
        return np.stack([np.abs(g["diagnosis"]["scores"] - ref["diagnosis"][i])
                         for i, g in enumerate(got)])

    with_roi, stretched = diff(True), diff(False)
    assert with_roi.max() <= ROI_TOLERANCE, with_roi.max()
    assert with_roi.mean() < stretched.mean()  # the whole photo stretched is further off


def test_the_usage_md_python_snippet_runs_as_documented(bundles, tmp_path):
    """USAGE.md's MediaPipe Python block, as a developer copies it, on non-square photos."""
    from export.tflite_metadata import mediapipe_classify, mediapipe_python

    bundle = bundles["int8"]
    usage = (bundle / "USAGE.md").read_text()
    block = usage.split("### Python (`mediapipe`)\n\n```python\n")[1].split("\n```")[0]
    script = tmp_path / "snippet.py"
    script.write_text(block + "\n")
    photos = sorted((bundle.parents[0] / "tiny_images").glob("*.jpg"))[:3]
    assert len(photos) == 3
    proc = subprocess.run([str(mediapipe_python()), str(script), str(bundle), *map(str, photos)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    ref = mediapipe_classify(bundle / "model.tflite", photos, roi=True)
    thr = _card(bundle)["heads"]["melanoma"]["threshold"]
    assert len(rows) == 3
    for row, r in zip(rows, ref, strict=True):
        assert row["melanoma"] == float(r["melanoma"]["scores"][0])
        assert row["is_melanoma"] == (row["melanoma"] >= thr)
        assert list(row["diagnosis"]) == r["diagnosis"]["labels"]
        assert np.array_equal(np.float32(list(row["diagnosis"].values())),
                              r["diagnosis"]["scores"])
    assert "0.5000000000" not in usage and ">= 0.5f" in usage  # the threshold, for people
