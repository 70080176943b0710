"""The ``trainer`` CLI: bad input ends in one ``trainer: error:`` paragraph, exit 2, no run dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_fit import toy_data_fixture, trained_run_fixture  # noqa: F401 - session fixtures

from trainer.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--backbone", "tiny_cnn", "--weights", "none", "--input-size", "32", "--epochs", "1",
        "--head-epochs", "0", "--quiet"]


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _assert_one_paragraph_error(err: str, *needles: str) -> None:
    assert err.startswith("trainer: error: "), err
    assert "Traceback" not in err and "\n\n" not in err.strip()
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, (needle, flat)


def _no_run_dirs(parent: Path, name: str) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(name)]
    assert left == [], left


def _ham_copy(toy: Path, dest: Path, edit=None, drop_image: bool = False) -> Path:
    """A HAM10000-layout copy of the toy set (images symlinked), with an optional CSV edit."""
    dest.mkdir()
    meta = pd.read_csv(toy / "HAM10000_metadata.csv", dtype=str)
    images = dest / "HAM10000_images_part_1"
    images.mkdir()
    paths = {p.stem: p for p in toy.rglob("*.jpg")}
    for i, image_id in enumerate(meta["image_id"]):
        if drop_image and i == 3:
            continue
        (images / f"{image_id}.jpg").symlink_to(paths[image_id])
    if edit is not None:
        meta = edit(meta)
    meta.to_csv(dest / "HAM10000_metadata.csv", index=False)
    return dest


def test_help_is_fast_and_does_not_import_keras():
    code = ("import sys, trainer.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "fit" in r.stdout and "evaluate" in r.stdout


def test_backbones_lists_the_registry(capsys):
    code, out, _ = _run(capsys, ["backbones"])
    assert code == 0
    for name in ("tiny_cnn", "mobilenet_v2", "efficientnet_lite0", "resnet50",
                 "inception_resnet_v2"):
        assert name in out


def test_wrong_data_path(capsys, tmp_path):
    code, _, err = _run(capsys, ["fit", "--data", str(tmp_path / "nowhere"), "--out",
                                 str(tmp_path / "run"), *FAST])
    assert code == 2
    _assert_one_paragraph_error(err, "nowhere", "not found", "--data")
    _no_run_dirs(tmp_path, "run")


@pytest.mark.parametrize("case, needles", [
    ("no_columns", ["dx"]),
    ("bad_label", ["melanomaa"]),
    ("missing_image", ["ISIC_"]),
])
def test_bad_datasets_exit_2_without_a_run_dir(capsys, tmp_path, toy_data, case, needles):
    if case == "no_columns":
        data = _ham_copy(toy_data, tmp_path / "data",
                         edit=lambda m: m.rename(columns={"dx": "diagnosis"}))
    elif case == "bad_label":
        def edit(m):
            m.loc[5, "dx"] = "melanomaa"
            return m
        data = _ham_copy(toy_data, tmp_path / "data", edit=edit)
    else:
        data = _ham_copy(toy_data, tmp_path / "data", drop_image=True)
    code, _, err = _run(capsys, ["fit", "--data", str(data), "--out", str(tmp_path / "run"),
                                 *FAST])
    assert code == 2
    _assert_one_paragraph_error(err, *needles)
    _no_run_dirs(tmp_path, "run")


def test_unknown_backbone_suggests(capsys, tmp_path, toy_data):
    argv = ["fit", "--data", str(toy_data), "--out", str(tmp_path / "run"), *FAST,
            "--backbone", "mobilenetv2"]
    code, _, err = _run(capsys, argv)
    assert code == 2
    _assert_one_paragraph_error(err, "Did you mean 'mobilenet_v2'")
    _no_run_dirs(tmp_path, "run")


def test_unknown_config_key_suggests(capsys, tmp_path, toy_data):
    code, _, err = _run(capsys, ["fit", "--data", str(toy_data), "--out", str(tmp_path / "r"),
                                 "--set", "train.learning_rate=1e-3"])
    assert code == 2
    _assert_one_paragraph_error(err, "train.learning_rate")
    code, _, err = _run(capsys, ["fit", "--config", str(tmp_path / "none.yaml"), "--out",
                                 str(tmp_path / "r")])
    assert code == 2
    _assert_one_paragraph_error(err, "none.yaml")


def test_resume_without_interrupted_run(capsys, tmp_path):
    code, _, err = _run(capsys, ["fit", "--out", str(tmp_path / "r"), "--resume"])
    assert code == 2
    _assert_one_paragraph_error(err, "Nothing to resume")


def test_keyboard_interrupt_exits_130(capsys, tmp_path, monkeypatch, toy_data):
    import trainer.fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.fit, "fit", interrupted)
    code, _, err = _run(capsys, ["fit", "--data", str(toy_data), "--out", str(tmp_path / "r"),
                                 *FAST])
    assert code == 130 and "resume with --resume" in err


def test_evaluate_command(capsys, tmp_path, trained_run):
    code, out, _ = _run(capsys, ["evaluate", str(trained_run.run_dir), "--out",
                                 str(tmp_path / "ev")])
    assert code == 0
    assert "balanced accuracy" in out and "melanoma AUC" in out
    assert (tmp_path / "ev" / "predictions.csv").is_file()
    code, _, err = _run(capsys, ["evaluate", str(tmp_path / "no-run")])
    assert code == 2
    _assert_one_paragraph_error(err, "no-run")


def test_toy_data_command(capsys, tmp_path):
    code, out, _ = _run(capsys, ["toy-data", "--out", str(tmp_path / "toy"), "--n-lesions",
                                 "140", "--size", "24"])
    assert code == 0 and (tmp_path / "toy" / "HAM10000_metadata.csv").is_file()
    code, _, err = _run(capsys, ["toy-data", "--out", str(tmp_path / "toy"), "--size", "24"])
    assert code == 2
    _assert_one_paragraph_error(err, "overwrite")


def _cli(*argv: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    import time

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "trainer", *argv], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO),
                                                   **(env or {})})
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("argv, needles", [
    (["fit", "--data", "no/such/dir", "--out", "{tmp}/x"], ["no/such/dir", "--data"]),
    (["fit", "--config", "configs/efficientnet_lite0_ham10000.yaml", "--out", "{tmp}/x"],
     ["No dataset", "--data"]),
    (["fit", "--data", "{tmp}", "--out", "{tmp}/file/sub"], ["is a file", "--out"]),
    (["fit", "--data", "{tmp}", "--images", "{tmp}/nope", "--out", "{tmp}/x"],
     ["--images", "not found"]),
    (["evaluate", "runs/missing"], ["runs/missing", "not found"]),
    (["evaluate", "{tmp}"], ["no model.keras"]),
    (["explain", "{tmp}", "x.jpg", "--out", "{tmp}/e"], ["no model.keras"]),
    (["ensemble", "runs/a", "runs/b", "--out", "{tmp}/c"], ["runs/a"]),
])
def test_bad_paths_are_refused_fast_without_tensorflow(tmp_path, argv, needles):
    """Refused in under 2 s, one `trainer: error:` paragraph, no TensorFlow start-up lines."""
    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r, seconds = _cli(*argv)
    assert r.returncode == 2, r.stderr
    _assert_one_paragraph_error(r.stderr, *needles)
    assert seconds < 2.0, seconds
    assert "absl" not in r.stderr and "oneDNN" not in r.stderr


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from trainer.cli import _parser

    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
        text = " ".join(sub.format_help().split())
        if name == "evaluate":
            assert "(default: 64)" in text and "(default: val)" in text
        if name == "toy-data":
            assert "(default: 420)" in text


def test_tensorflow_start_up_noise_is_hidden_unless_verbose(tmp_path, trained_run):
    quiet, _ = _cli("evaluate", str(trained_run.run_dir), "--out", str(tmp_path / "q"),
                    "--no-gallery")
    assert quiet.returncode == 0, quiet.stderr
    assert "oneDNN" not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr
    loud, _ = _cli("evaluate", str(trained_run.run_dir), "--out", str(tmp_path / "v"),
                   "--no-gallery", "--verbose", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0, loud.stderr
    assert "oneDNN" in loud.stderr or "absl" in loud.stderr


def test_fit_prints_one_line_per_epoch(capsys, tmp_path, toy_data):
    argv = ["fit", "--data", str(toy_data), "--out", str(tmp_path / "run"),
            *[a for a in FAST if a != "--quiet"], "--epochs", "2", "--head-epochs", "1",
            "--set", "train.average_epochs=1"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/3", "2/3", "3/3"]
    assert "/step" not in out and "━" not in out  # no Keras progress bar or per-epoch log


def test_fit_without_built_lite_weights_names_the_command_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMEDGE_CACHE", str(tmp_path / "cache"))
    r, seconds = _cli("fit", "--config", "configs/efficientnet_lite0_ham10000.yaml", "--data",
                      str(tmp_path), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and seconds < 2.0, r.stderr
    _assert_one_paragraph_error(r.stderr, "trainer weights efficientnet_lite0")
