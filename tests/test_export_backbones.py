"""ResNet50 and Inception-ResNet-v2 (random weights, small inputs) convert and quantize fully.

What only these two can prove is that their graphs (ResNet50's blocks, IRv2's scaled residual
branches, ~200 MB of weights) convert to float32 and to full-integer int8 with every tensor
quantized. float16 and dynamic are weight-only transforms of the same graph, and bias
correction, adaptive rounding and compaction are about accuracy and size, not convertibility:
test_export.py covers every mode and all three on small models. Slow (IRv2's float32
conversion alone takes minutes), so it sits behind ``--run-slow``.
"""

from __future__ import annotations

import dataclasses

import pytest
from export_fixtures import make_run_dir

from dermedge.litert import run_tflite
from export.api import QuantizationConfig, export_run

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")]


@pytest.mark.parametrize("backbone, size", [("resnet50", 64), ("inception_resnet_v2", 75)])
def test_big_backbones_convert_to_float32_and_full_int8(tmp_path, backbone, size):
    import numpy as np

    run = make_run_dir(tmp_path, name=backbone, backbone=backbone, size=size, train=False,
                       train_per_class=2, val_per_class=1)
    imgs = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    sizes = {}
    # compaction is lossless and checked on every export elsewhere; here it would only re-run
    # a 200 MB file
    for cfg in (dataclasses.replace(QuantizationConfig.float32(), compact=False),
                QuantizationConfig.int8(14, bias_correction="off", compact=False)):
        res = export_run(run, cfg, tmp_path / cfg.mode, validate=False)
        ex = res.card["export"]
        assert ex["checks"]["verified_mode"] == cfg.mode
        assert set(ex["outputs"]) == {"melanoma", "diagnosis"}
        out = run_tflite(res.path, imgs)
        assert out["melanoma"].shape == (2, 1) and out["diagnosis"].shape == (2, 7)
        sizes[cfg.mode] = res.tflite_bytes
    assert sizes["int8"] < 0.3 * sizes["float32"]
