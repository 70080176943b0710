"""Installs that fit each user: a light core, `train`/`gpu` that never stack, a TF-free demo.

The demo test builds a real venv with `pip install ".[demo]"` (cached under ~/.cache/dermedge,
keyed by pyproject.toml; pip's cache makes a rebuild quick). Without PyPI it skips, and under
CI=true it fails with pip's reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest
from ci import unavailable
from packaging.markers import default_environment
from packaging.requirements import Requirement

from dermedge.files import cache_dir

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TF_WHEELS = {"tensorflow", "tensorflow-cpu"}


def _names(reqs: list[str], machine: str = "x86_64", system: str = "linux") -> set[str]:
    env = {**default_environment(), "platform_machine": machine, "sys_platform": system}
    out = set()
    for r in map(Requirement, reqs):
        if r.marker is None or r.marker.evaluate(env):
            out.add(r.name.lower())
    return out


def test_core_is_light():
    assert _names(PYPROJECT["dependencies"]) == {"numpy", "pillow", "ai-edge-litert"}
    assert not _names(PYPROJECT["optional-dependencies"]["demo"]) & TF_WHEELS


@pytest.mark.parametrize("machine, wheel", [("x86_64", "tensorflow-cpu"),
                                            ("AMD64", "tensorflow-cpu"),
                                            ("aarch64", "tensorflow"), ("arm64", "tensorflow")])
def test_train_gets_exactly_one_tensorflow_on_every_machine(machine, wheel):
    """tensorflow-cpu 2.21 has x86-64 wheels only; ARM hosts get the `tensorflow` wheel."""
    got = _names(PYPROJECT["optional-dependencies"]["train"], machine)
    assert got & TF_WHEELS == {wheel}
    assert {"keras", "pandas", "pyyaml"} <= got


def test_gpu_extra_replaces_the_cpu_wheel_instead_of_stacking():
    extras = PYPROJECT["optional-dependencies"]
    gpu = [Requirement(r) for r in extras["gpu"]]
    assert [r.name for r in gpu if r.name in TF_WHEELS] == ["tensorflow"]
    assert "and-cuda" in next(r for r in gpu if r.name == "tensorflow").extras
    assert "tensorflow-cpu" not in _names(extras["gpu"])
    # Everything else the training stack needs is in gpu too, so `.[gpu]` alone trains.
    assert _names(extras["train"]) - TF_WHEELS == _names(extras["gpu"]) - TF_WHEELS


# ---- the demo extra in a clean venv ---------------------------------------------------------
def _demo_venv() -> Path:
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    env = cache_dir() / f"demo-venv-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    py = env / "bin" / "python"
    if (env / ".complete").is_file():
        return py
    shutil.rmtree(env, ignore_errors=True)  # a half-built one (no .complete)
    try:  # built in place: console scripts carry the venv's absolute path
        made = subprocess.run([sys.executable, "-m", "venv", str(env)], capture_output=True,
                              text=True, timeout=300)
        pip = subprocess.run([str(py), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", f"{REPO}[demo]"],
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        made = pip = subprocess.CompletedProcess(e.cmd, 1, "", f"timed out after {e.timeout}s")
    for proc in (made, pip):
        if proc.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            reason = f"cannot install the demo extra: {proc.stderr.strip()[-400:]}"
            unavailable(reason)
    (env / ".complete").write_text("ok\n")
    return py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_image(url: str, data: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + data + (
        f"\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_demo_extra_installs_without_tensorflow_and_serves_a_bundle(tmp_path):
    from demo_fixtures import jpeg_bytes, tiny_bundles

    py = _demo_venv()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1", "HOME": str(tmp_path)}
    probe = subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True, text=True,
                           env=env)
    assert "No module named 'tensorflow'" in probe.stderr
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, env=env, check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"flask", "waitress", "ai-edge-litert", "numpy", "pillow"} <= installed
    assert not installed & (TF_WHEELS | {"keras", "pandas"})

    bundle = tiny_bundles()["int8"]
    port = _free_port()
    edge_demo = py.parent / "edge-demo"
    server = subprocess.Popen([str(edge_demo), "serve", "--device", str(bundle), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "the demo did not start in 60 s"
                time.sleep(0.3)
        body = _post_image(f"http://127.0.0.1:{port}/api/v1/classify", jpeg_bytes())
        assert body["device"]["top"]["label"] in body["device"]["diagnosis"]
        assert 0 <= body["device"]["melanoma"] <= 1
    finally:
        server.terminate()
        server.communicate(timeout=30)
