"""Our balanced accuracy and melanoma AUC equal the official ISIC 2018 scorer's.

The scorer (``isic-challenge-scoring``) runs in its own venv (it pins other pandas/python
versions than the project), built once under ``$DERMEDGE_CACHE`` (default
``~/.cache/dermedge``) and reused. Skipped with pip's error when it cannot be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from ci import unavailable

from dermedge import metrics as M
from dermedge.files import cache_dir as default_cache_dir
from dermedge.labels import DIAGNOSIS_LABELS, DX_TO_ISIC, MELANOMA_DX
from trainer.data import read_isic_csv, write_isic_predictions

SCORER = "isic-challenge-scoring"
# 5.8.0 needs Python >= 3.13; with an older interpreter fall back to the last release for it.
VERSION_NEW, VERSION_OLD = "5.8.0", "5.6.0"

SCORE_SCRIPT = """
import json, pathlib, sys
from isic_challenge_scoring import ClassificationScore
from isic_challenge_scoring.classification import ClassificationMetric
out = []
for truth, pred in zip(sys.argv[1::2], sys.argv[2::2]):
    s = ClassificationScore.from_file(pathlib.Path(truth), pathlib.Path(pred),
                                      ClassificationMetric.BALANCED_ACCURACY)
    out.append({"balanced_accuracy": float(s.aggregate["balanced_accuracy"]),
                "mel_auc": float(s.per_category.loc["MEL", "auc"])})
print(json.dumps(out))
"""


def _version(exe: str) -> tuple[int, int] | None:
    try:
        res = _run([exe, "-c", "import sys; print(*sys.version_info[:2])"], 60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode:
        return None  # e.g. a pyenv shim for a version that is not selected
    major, minor = res.stdout.split()
    return int(major), int(minor)


def _interpreter() -> tuple[str, tuple[int, int], str, list[str]]:
    """(python, its version, scorer version, extra pins): a Python >= 3.13 when one exists."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [os.environ.get("DERMEDGE_ISIC_PYTHON"), shutil.which("python3.14"),
                  shutil.which("python3.13"),
                  *sorted(map(str, pyenv.glob("3.1[3-9]*/bin/python3")), reverse=True)]
    for exe in filter(None, candidates):
        v = _version(exe)
        if v and v >= (3, 13):
            return exe, v, VERSION_NEW, []
    return sys.executable, sys.version_info[:2], VERSION_OLD, ["pandas<3", "numpy<2.3"]


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def isic_python() -> str:
    exe, py_version, version, pins = _interpreter()
    tag = f"{version}-py{py_version[0]}.{py_version[1]}"
    venv = default_cache_dir() / f"isic-venv-{tag}"
    py = venv / "bin" / "python"
    if (venv / ".installed").is_file() and py.exists():
        return str(py)
    tmp = venv.with_name(f".{venv.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    try:
        made = _run([exe, "-m", "venv", str(tmp)], 300)
        if made.returncode:
            unavailable(f"cannot create a venv for {SCORER}: {made.stderr.strip()[-500:]}")
        pip = _run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "--timeout", "30", "--retries", "1",
                    f"{SCORER}=={version}", *pins], 600)
        if pip.returncode:
            errors = [ln for ln in pip.stderr.splitlines() if "ERROR" in ln] or [pip.stderr]
            unavailable(f"pip cannot install {SCORER}=={version}: {' '.join(errors)[-500:]}")
        (tmp / ".installed").write_text(f"{SCORER}=={version}\n")
        if py.exists():  # another process built it meanwhile
            return str(py)
        venv.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(venv)
        except OSError:
            if not py.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(py)


def _fixture(tmp_path: Path, seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    prior = np.array([0.05, 0.06, 0.11, 0.03, 0.11, 0.60, 0.04])  # HAM10000-like imbalance
    y = rng.choice(len(DIAGNOSIS_LABELS), size=n, p=prior)
    y[: len(DIAGNOSIS_LABELS)] = np.arange(len(DIAGNOSIS_LABELS))  # every class present
    logits = rng.normal(size=(n, len(DIAGNOSIS_LABELS))) + 1.3 * np.eye(len(DIAGNOSIS_LABELS))[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ids = [f"ISIC_{1000000 + i:07d}" for i in rng.permutation(n)]
    truth, pred = tmp_path / f"truth_{seed}.csv", tmp_path / f"pred_{seed}.csv"
    write_isic_predictions(ids, np.eye(len(DIAGNOSIS_LABELS))[y], truth)
    write_isic_predictions(ids, probs, pred)
    return truth, pred


def _ours(truth: Path, pred: Path) -> dict:
    t = read_isic_csv(truth, ground_truth=True)
    p = read_isic_csv(pred).set_index("image").loc[t["image"]]
    cols = [DX_TO_ISIC[lab] for lab in DIAGNOSIS_LABELS]
    probs = p[cols].to_numpy()
    y = np.array([DIAGNOSIS_LABELS.index(d) for d in t["dx"]])
    mel = DIAGNOSIS_LABELS.index(MELANOMA_DX)
    return {"balanced_accuracy": M.balanced_accuracy(y, probs.argmax(1), len(DIAGNOSIS_LABELS)),
            "mel_auc": M.roc_auc(y == mel, probs[:, mel])}


def test_balanced_accuracy_equals_official_scorer(isic_python, tmp_path):
    pairs = [_fixture(tmp_path, seed, n) for seed, n in ((0, 300), (1, 300), (2, 60))]
    res = _run([isic_python, "-c", SCORE_SCRIPT, *(str(p) for pair in pairs for p in pair)], 300)
    assert res.returncode == 0, res.stderr[-2000:]
    official = json.loads(res.stdout.strip().splitlines()[-1])
    for (truth, pred), theirs in zip(pairs, official, strict=True):
        ours = _ours(truth, pred)
        assert 0.2 < theirs["balanced_accuracy"] < 0.95  # a non-trivial fixture
        assert ours["balanced_accuracy"] == pytest.approx(theirs["balanced_accuracy"], abs=1e-6)
        assert ours["mel_auc"] == pytest.approx(theirs["mel_auc"], abs=1e-6)


def test_isic_csv_roundtrip(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(7), size=4)
    write_isic_predictions(["a", "b", "c", "d"], probs, tmp_path / "p.csv")
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    back = read_isic_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(back[[DX_TO_ISIC[d] for d in DIAGNOSIS_LABELS]].to_numpy(), probs)
    with pytest.raises(ValueError, match=r"shape \(n_images, 7\)"):
        write_isic_predictions(["a"], probs, tmp_path / "q.csv")
