"""USAGE.md comes from template files (export/snippets/), shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from dermedge.card import build_card, with_export
from dermedge.labels import DIAGNOSIS_LABELS
from export.bundle import SNIPPETS, render, usage_md

REPO = Path(__file__).resolve().parents[1]


def _card(in_dt: str, out_dt: str):
    def tensor(dtype, shape):
        scale = 0.0 if dtype == "float32" else 1 / 256
        return {"dtype": dtype, "shape": shape, "quantization": {"scale": scale,
                                                                 "zero_point": 0}}

    run = build_card(name="r", created="2026-01-01T00:00:00+00:00", backbone="tiny_cnn",
                     weights=None, input_size=32, preprocessing={"in_model": True},
                     melanoma_threshold=0.3, diagnosis_labels=DIAGNOSIS_LABELS,
                     data={"source": "/d"}, config={}, training={}, metrics_val={},
                     versions={})
    return with_export(run, {
        "mode": "int8", "signature": "serving_default",
        "inputs": {"image": {**tensor(in_dt, [1, 32, 32, 3]),
                             "quantization": {"scale": 1.0, "zero_point": 0}}},
        "outputs": {"melanoma": tensor(out_dt, [1, 1]), "diagnosis": tensor(out_dt, [1, 7])},
        "size_bytes": 1000, "sha256": "0" * 64, "validation": {"passed": True}})


@pytest.mark.parametrize("out_dt, read", [("uint8", "0.00390625f * ((melanoma.get()"),
                                          ("float32", "val pMelanoma = melanoma.float")])
def test_usage_md_fills_every_template(out_dt, read):
    text = usage_md(_card("uint8", out_dt))
    assert not re.search(r"\{\{\w+\}\}", text)  # no placeholder left
    assert read in text and 'runner.output(named: "melanoma")' in text
    assert "val isMelanoma = pMelanoma >= 0.3f" in text  # the card's threshold in Kotlin
    for name in ("mediapipe_classify.kt", "mediapipe_classify.swift", "model_binding.kt"):
        code = render(name, threshold="0.3")
        assert code in text, name


def test_render_refuses_a_missing_or_unknown_value():
    with pytest.raises(ValueError, match=r"placeholders \['threshold'\]"):
        render("mediapipe_classify.kt")
    with pytest.raises(ValueError, match="values for"):
        render("mediapipe_classify.kt", threshold="0.3", size=32)


def test_every_template_is_used_and_ships_as_package_data():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["export"]
    bundle_py = (REPO / "export" / "bundle.py").read_text()
    for path in sorted(SNIPPETS.iterdir()):
        rel = path.relative_to(REPO / "export").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"
        if path.name != "run_bundle.py":  # the standalone script USAGE.md points to
            assert re.search(rf'"{re.escape(path.name)}"', bundle_py), f"{rel} is unused"
