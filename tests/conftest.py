"""Shared fixtures and markers.

* ``shared`` tests read ../shared (real HAM10000 images, ImageNet weights) and skip when absent.
* ``slow`` tests run only with ``--run-slow``.
* Under ``CI=true`` a skip whose reason is not allow-listed fails (``tests/ci.py``).
* ``chain_*``: the real stages on each other's artifacts (toy data, run, bundle, server).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ci import SkipGuard, in_ci, skip_unless, unavailable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMEDGE_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session", autouse=True)
def demo_state_dir(tmp_path_factory) -> Path:
    """Demo servers of this session keep their CA and compressed files in one temporary
    folder (not the user's data folder), compressing with the fast settings."""
    state = tmp_path_factory.mktemp("edge_demo_state")
    os.environ.setdefault("EDGE_DEMO_STATE_DIR", str(state))
    os.environ.setdefault("EDGE_DEMO_COMPRESS", "fast")
    return Path(os.environ["EDGE_DEMO_STATE_DIR"])


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_configure(config):
    if in_ci():
        config.pluginmanager.register(SkipGuard(), "dermedge-ci-skip-guard")


def pytest_collection_modifyitems(config, items):
    skip_slow = skip_unless(config.getoption("--run-slow"),
                            "slow test: pass --run-slow to run it")
    skip_shared = skip_unless((SHARED / "data").is_dir(),
                              f"needs the shared data folder, not found at {SHARED}")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
        if "shared" in item.keywords:
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        unavailable(f"needs the shared data folder, not found at {SHARED}")
    return SHARED


# ------------------------------------------------------------------ the chain, on real artifacts
# toy data -> `trainer fit` -> `python -m export tflite --int8` -> `edge-demo serve` (waitress).
# Each stage is the real CLI on the previous stage's artifact; built once per session, 32 px.
CHAIN_SIZE = 32


def _cli_ok(main, argv: list[str], what: str) -> None:
    rc = main(argv)
    if rc != 0:
        pytest.fail(f"{what} exited {rc}: {' '.join(argv)}")


@pytest.fixture(scope="session")
def chain_toy(tmp_path_factory) -> Path:
    """`trainer toy-data`: a small synthetic HAM10000-layout dataset (252 images, 40 px)."""
    from trainer.cli import main

    out = tmp_path_factory.mktemp("chain") / "toy"
    _cli_ok(main, ["toy-data", "--out", str(out), "--n-lesions", "210", "--size", "40",
                   "--seed", "1"], "trainer toy-data")
    return out


@pytest.fixture(scope="session")
def chain_run(chain_toy, tmp_path_factory) -> Path:
    """`trainer fit` of a tiny CNN on ``chain_toy``: a real run directory (val balanced
    accuracy ~0.9, confident enough for int8 to pass the export's default gates)."""
    from trainer.cli import main

    root = tmp_path_factory.mktemp("chain_run")
    out = root / "run"
    _cli_ok(main, ["fit", "--data", str(chain_toy), "--out", str(out), "--backbone", "tiny_cnn",
                   "--weights", "none", "--input-size", str(CHAIN_SIZE), "--head-epochs", "1",
                   "--epochs", "15", "--batch-size", "32", "--seed", "0", "--quiet",
                   "--set", f"data.cache_dir={root / 'cache'}", "--set", "augment.enabled=false",
                   "--set", "train.head_lr=0.003", "--set", "train.lr=0.003",
                   "--set", "train.freeze_bn=false", "--set", "train.early_stopping_patience=0",
                   # ~7 steps an epoch: BN's default 0.99 would keep its init statistics
                   "--set", "train.bn_momentum=0.8"], "trainer fit")
    return out


@pytest.fixture(scope="session")
def chain_bundle(chain_run, tmp_path_factory) -> Path:
    """`python -m export tflite RUN --int8`: a real int8 bundle of ``chain_run``."""
    from export.cli import main

    out = tmp_path_factory.mktemp("chain_bundle") / "int8"
    # 38 val images: one flipped answer is 2.6 points of agreement and up to 3.6 of balanced
    # accuracy, so the gates allow one (the defaults are for real validation sets); the input
    # gate's ood threshold sits at the top of these 38 and the tiny CNN's int8 features are
    # coarse, so its decisions may flip on up to three.
    _cli_ok(main, ["tflite", str(chain_run), "--int8", "--representative", "40",
                   "--out", str(out), "--tolerance", "diagnosis_agreement=0.95",
                   "melanoma_agreement=0.95", "balanced_accuracy_drop=0.05",
                   "melanoma_auc_drop=0.05", "gate_agreement=0.9"], "python -m export tflite")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def demo_process(args: list[str], log: Path, timeout: float = 60, port: int | None = None):
    """``python -m edge_demo serve ARGS`` (the real waitress server) on a free port (or
    ``port``: the same origin again, as a phone sees a restarted server); yields (process,
    URL) once /readyz answers 200, and fails with the server's log if it never does."""
    port = port or free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_demo", "serve", *args, "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo server did not become ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:  # a test may have killed it
            proc.terminate()
            proc.wait(timeout=20)


@contextlib.contextmanager
def demo_server(args: list[str], log: Path, timeout: float = 60, port: int | None = None):
    """:func:`demo_process`, yielding only the URL."""
    with demo_process(args, log, timeout, port) as (_, url):
        yield url


@pytest.fixture(scope="session")
def chain_server(chain_bundle, tmp_path_factory):
    """`edge-demo serve --device BUNDLE` under waitress, serving ``chain_bundle``."""
    log = tmp_path_factory.mktemp("chain_server") / "server.log"
    with demo_server(["--device", str(chain_bundle), "--threads", "2"], log) as url:
        yield url
