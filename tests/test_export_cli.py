"""`python -m export`: --out and the run checked before any conversion, one error format,
defaults in --help, and a refused export marked so it cannot pass for a shippable bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from export_fixtures import make_run_dir

from export.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
PREFIX = "python -m export: error: "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("runs"), size=32)


def _cli(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "export", *argv], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("out, needle", [
    ("{tmp}/a_file/sub", "which is a file"),
    ("{tmp}/a_file", "is a file"),
    ("{tmp}/notes", "not an export bundle"),
])
def test_bad_out_is_refused_before_any_conversion(run_dir, tmp_path, out, needle):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    r, seconds = _cli("tflite", str(run_dir), "--int8", "--out", out.format(tmp=tmp_path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(PREFIX) and "Traceback" not in r.stderr
    assert needle in " ".join(r.stderr.split())
    assert seconds < 2.0, seconds  # refused before TensorFlow loads or anything converts
    assert (tmp_path / "a_file").read_text() == "x"
    assert (tmp_path / "notes" / "keep.txt").is_file()


def test_missing_run_is_refused_fast(tmp_path):
    r, seconds = _cli("tflite", str(tmp_path / "runs" / "missing"), "--int8")
    assert r.returncode == 2 and r.stderr.startswith(PREFIX), r.stderr
    assert "missing" in r.stderr and seconds < 2.0


def test_usage_errors_use_the_same_format(capsys):
    assert main(["tflite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and "--help" in err


def test_every_option_has_help_and_shows_its_default():
    import argparse

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
    assert "(default: 50)" in " ".join(subs.choices["bench"].format_help().split())
    assert "(default: val)" in " ".join(subs.choices["tflite"].format_help().split())


def test_refused_export_is_marked_and_a_passing_one_is_not(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    # An impossible gate: int8 never matches float to within 0 everywhere.
    rc = main(["tflite", str(run_dir), "--int8", "--representative", "20", "--out", str(out),
               "--tolerance", "max_abs_diff=0", "diagnosis_agreement=1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "REFUSED" in err and "REFUSED.txt" in " ".join(err.split())
    notice = (out / "REFUSED.txt").read_text()
    assert notice.startswith("REFUSED: this export failed its validation gates")
    card = json.loads((out / "model_card.json").read_text())
    assert card["export"]["validation"]["passed"] is False
    assert (out / "model.tflite").is_file()  # file names unchanged: the report stays readable

    assert main(["tflite", str(run_dir), "--out", str(out)]) == 0  # float32 passes
    assert not (out / "REFUSED.txt").exists()
    assert json.loads((out / "model_card.json").read_text())["export"]["validation"]["passed"]
