"""``trainer fit --distribute``: the rules, and real distributed runs on this CPU.

The runs split the CPU into two devices (TensorFlow: two logical CPUs; JAX:
``--xla_force_host_platform_device_count=2``) or start two workers on 127.0.0.1, each in its
own process (devices and TF_CONFIG must be set before the framework starts). They compare with
a one-replica run of the same global batch, so every run freezes BatchNormalization
(``train.freeze_bn``: it normalises with its moving statistics, so per-replica batch statistics
play no part), turns off dropout and augmentation, and keeps only full batches
(``train.steps_per_epoch``): 1 and 2 replicas then take the same steps up to float summation
order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ci import unavailable
from test_cli import _assert_one_paragraph_error, _no_run_dirs
from test_fit import toy_data_fixture  # noqa: F401 - session fixture

from dermedge.artifacts import partial_dir
from dermedge.errors import RunDirError
from trainer import distribute as dist
from trainer.config import ConfigError, RunConfig
from trainer.run import RUN_FILES

REPO = Path(__file__).resolve().parents[1]
MISSING_BACKEND = 3
GLOBAL_BATCH = 16
# Adam turns float-order noise into small weight differences; trained weights move ~1e-2.
WEIGHT_ATOL = 1e-4
RUN_ARGS = ["--backbone", "tiny_cnn", "--weights", "none", "--input-size", "32",
            "--head-epochs", "1", "--epochs", "2", "--batch-size", str(GLOBAL_BATCH), "--quiet",
            "--set", "data.val_fraction=0.25", "--set", "train.steps_per_epoch=3",
            "--set", "train.freeze_bn=true", "--set", "model.dropout=0",
            "--set", "augment.enabled=false", "--set", "train.restore=last",
            "--set", "train.head_lr=1e-2", "--set", "train.lr=1e-2",
            "--set", "train.early_stopping_patience=0"]

# Runs `trainer` commands (JSON lists, one per argument) in one fresh process. A command that
# starts with "interrupt" is stopped after epoch 2 as by Ctrl-C, and must exit 130.
RUNNER = r"""
import importlib, json, os, sys
backend = os.environ["KERAS_BACKEND"]
try:
    importlib.import_module(backend)
except ImportError as e:
    print(f"{backend} is not installed: {e}", file=sys.stderr)
    sys.exit(__MISSING__)
if os.environ.get("TEST_LOGICAL_CPUS"):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    n = int(os.environ["TEST_LOGICAL_CPUS"])
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
import keras
import trainer.fit
from trainer.cli import main

class InterruptAfterEpoch2(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt

def interrupted_fit(*args, **kwargs):
    return real_fit(*args, callbacks=[InterruptAfterEpoch2()], **kwargs)

real_fit = trainer.fit.fit
for command in map(json.loads, sys.argv[1:]):
    interrupt = command[0] == "interrupt"
    trainer.fit.fit = interrupted_fit if interrupt else real_fit
    code = main(command[1:] if interrupt else command)
    if code != (130 if interrupt else 0):
        sys.exit(f"`trainer {' '.join(command)}` exited {code}")
""".replace("__MISSING__", str(MISSING_BACKEND))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "XLA_FLAGS")}
    env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _fit(data: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--data", str(data), *RUN_ARGS, "--set", f"data.cache_dir={cache}",
            "--out", str(out), *extra]


def _run(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *map(json.dumps, commands)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode == MISSING_BACKEND:
        unavailable(f"KERAS_BACKEND={env['KERAS_BACKEND']} unavailable: "
                    f"{proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _weights(run: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(run / "model.keras").get_weights()


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert [w.shape for w in wa] == [w.shape for w in wb]
    return max(float(np.abs(x - y).max()) for x, y in zip(wa, wb, strict=True))


def _initial_weights() -> list[np.ndarray]:
    import keras

    from trainer.model import build_model

    keras.utils.set_random_seed(0)
    return build_model("tiny_cnn", input_size=32, weights=None, dropout=0.0).get_weights()


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def _key_paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "config":
            out |= _key_paths(v, f"{prefix}{k}.")
    return out


def _card(run: Path) -> dict:
    return json.loads((run / "model_card.json").read_text())


def _assert_same_shape(single: Path, multi: Path) -> None:
    """Same files, card keys and history columns; the same losses epoch by epoch."""
    assert _files(single) == _files(multi)
    assert all((multi / f).is_file() for f in RUN_FILES)
    assert _key_paths(_card(single)) == _key_paths(_card(multi))
    hs, hm = pd.read_csv(single / "history.csv"), pd.read_csv(multi / "history.csv")
    assert list(hs.columns) == list(hm.columns) and len(hs) == len(hm) == 3
    np.testing.assert_allclose(hm["loss"], hs["loss"], rtol=1e-4)
    np.testing.assert_allclose(hm["val_loss"], hs["val_loss"], rtol=1e-4)


@pytest.fixture(scope="module", name="cache")
def cache_fixture(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "cache"


# ---------------------------------------------------------------- TensorFlow, two logical CPUs
@pytest.fixture(scope="module")
def tf_runs(toy_data, cache, tmp_path_factory) -> Path:
    """One process with two logical CPUs: a 1-replica run (`none/`) and a 2-replica run
    (`mirrored/`) of the same global batch."""
    out = tmp_path_factory.mktemp("tf_runs")
    _run([_fit(toy_data, cache, out / m, "--distribute", m) for m in ("none", "mirrored")],
         out, _env(TEST_LOGICAL_CPUS="2"))
    return out


def test_two_mirrored_replicas_match_one_replica(tf_runs):
    single, multi = tf_runs / "none", tf_runs / "mirrored"
    assert _max_diff(single, multi) < WEIGHT_ATOL
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        _initial_weights(), _weights(single), strict=True))
    assert moved > 100 * WEIGHT_ATOL  # the comparison is not between untrained models
    _assert_same_shape(single, multi)

    d1, d2 = _card(single)["training"]["distribution"], _card(multi)["training"]["distribution"]
    assert (d1["mode"], d1["engine"], d1["replicas"], d1["per_replica_batch"]) == (
        "none", "none", 1, GLOBAL_BATCH)
    assert (d2["mode"], d2["engine"], d2["replicas"], d2["workers"]) == (
        "mirrored", "MirroredStrategy", 2, 1)
    assert d2["global_batch"] == GLOBAL_BATCH and d2["per_replica_batch"] == GLOBAL_BATCH // 2
    assert d2["input_sharding"]["policy"] == "batch" and d2["partial_batch"] == "dropped"
    assert len(d2["devices"]) == 2 and all("CPU" in x for x in d2["devices"])
    assert d2["lr_scaling"] == {"rule": "none", "reference_batch": None, "factor": 1.0,
                                "head_lr": 1e-2, "lr": 1e-2}


@pytest.mark.slow
def test_mirrored_run_resumes_from_its_checkpoint(tf_runs, toy_data, cache, tmp_path):
    """Two replicas, interrupted after epoch 2 of 3 and resumed by a second command (weights
    and Adam state from the checkpoint): the weights of the uninterrupted run (~40 s)."""
    out = tmp_path / "resumed"
    _run([["interrupt", *_fit(toy_data, cache, out, "--distribute", "mirrored")],
          ["fit", "--out", str(out), "--resume", "--quiet"]], tmp_path,
         _env(TEST_LOGICAL_CPUS="2"))
    assert not partial_dir(out).exists()
    assert _max_diff(out, tf_runs / "mirrored") < WEIGHT_ATOL
    _assert_same_shape(tf_runs / "mirrored", out)
    assert _card(out)["training"]["distribution"]["replicas"] == 2


# ---------------------------------------------------------------- multi-worker, two processes
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _two_workers(commands: list[list[str]], tmp_path: Path) -> list[str]:
    """Run ``commands`` in two worker processes on 127.0.0.1 (TF_CONFIG, each with its own
    TMPDIR under ``tmp_path``), bounded in time; their stdouts."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        tmp = tmp_path / f"tmp{index}"
        tmp.mkdir(exist_ok=True)
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-c", RUNNER, *map(json.dumps, commands)], cwd=tmp_path,
            env=_env(TF_CONFIG=tf_config, TMPDIR=str(tmp)), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (stdout, stderr) in zip(procs, logs, strict=True):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    # The non-chief trained in a private temporary directory and removed it.
    assert not any(p.name.startswith("dermedge-") for p in (tmp_path / "tmp1").iterdir())
    return [stdout for stdout, _ in logs]


@pytest.mark.slow  # CI runs it in the slow line; keeps the default suite short
def test_two_workers_train_one_run_directory(tf_runs, toy_data, cache, tmp_path):
    """Two `trainer fit --distribute multi-worker` processes on 127.0.0.1: the chief writes
    the run, the other worker leaves nothing behind, and the weights match one replica."""
    out = tmp_path / "runs" / "mw"
    stdout = _two_workers([_fit(toy_data, cache, out, "--distribute", "multi-worker")],
                          tmp_path)
    assert "run written to" in stdout[0] and "worker finished" in stdout[1]
    assert sorted(p.name for p in out.parent.iterdir()) == ["mw"]
    _assert_same_shape(tf_runs / "none", out)
    assert _max_diff(tf_runs / "none", out) < WEIGHT_ATOL
    d = _card(out)["training"]["distribution"]
    assert (d["mode"], d["engine"], d["workers"], d["replicas"]) == (
        "multi-worker", "MultiWorkerMirroredStrategy", 2, 2)
    assert d["per_replica_batch"] == GLOBAL_BATCH // 2
    assert d["input_sharding"]["policy"] == "data"


@pytest.mark.slow
def test_two_workers_resume_from_the_chiefs_checkpoint(tf_runs, toy_data, cache, tmp_path):
    """Both workers stop after epoch 2; only the chief's checkpoint is left. Relaunched with
    --resume (new ports), the other worker restores from a copy of it, and the run ends with
    the one-replica weights (~100 s on two busy cores)."""
    out = tmp_path / "runs" / "mw"
    _two_workers([["interrupt", *_fit(toy_data, cache, out, "--distribute", "multi-worker")]],
                 tmp_path)
    assert not out.exists()
    assert json.loads((partial_dir(out) / "checkpoints" / "state.json").read_text())["epoch"] == 2
    _two_workers([["fit", "--out", str(out), "--resume", "--quiet"]], tmp_path)
    assert sorted(p.name for p in out.parent.iterdir()) == ["mw"]
    _assert_same_shape(tf_runs / "none", out)
    assert _max_diff(tf_runs / "none", out) < WEIGHT_ATOL


# ---------------------------------------------------------------- JAX, two host devices
@pytest.mark.slow
def test_jax_data_parallel_matches_one_device(toy_data, cache, tmp_path):
    """keras.distribution.DataParallel over two host devices vs one device (~60 s: XLA
    compiles every step function twice)."""
    _run([_fit(toy_data, cache, tmp_path / m, "--distribute", m) for m in ("none", "mirrored")],
         tmp_path, _env(KERAS_BACKEND="jax",
                        XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    single, multi = tmp_path / "none", tmp_path / "mirrored"
    assert _max_diff(single, multi) < WEIGHT_ATOL
    _assert_same_shape(single, multi)
    d = _card(multi)["training"]["distribution"]
    assert (d["engine"], d["replicas"], d["per_replica_batch"]) == ("DataParallel", 2, 8)
    assert _card(multi)["training"]["backend"] == "jax"


# ---------------------------------------------------------------- the rules
@pytest.mark.parametrize("requested, backend, tf_config, accelerators, mode", [
    ("auto", "tensorflow", None, 0, "none"),
    ("auto", "tensorflow", None, 1, "none"),
    ("auto", "tensorflow", None, 2, "mirrored"),
    ("auto", "jax", None, 4, "mirrored"),
    ("auto", "torch", None, 4, "none"),
    ("auto", "tensorflow", '{"cluster": {}}', 0, "multi-worker"),
    ("none", "torch", '{"cluster": {}}', 8, "none"),
    ("mirrored", "tensorflow", None, 0, "mirrored"),
    ("mirrored", "jax", None, 0, "mirrored"),
    ("multi-worker", "tensorflow", "{}", 0, "multi-worker"),
])
def test_choose_mode(requested, backend, tf_config, accelerators, mode):
    assert dist.choose_mode(requested, backend, tf_config=tf_config,
                            accelerators=accelerators) == mode


@pytest.mark.parametrize("requested, backend, tf_config, needles", [
    ("multi-worker", "tensorflow", None, ["TF_CONFIG", '"cluster"', "--distribute mirrored"]),
    ("mirrored", "torch", None, ["KERAS_BACKEND=torch", "KERAS_BACKEND=tensorflow",
                                 "--distribute none"]),
    ("multi-worker", "jax", "{}", ["KERAS_BACKEND=jax", "KERAS_BACKEND=tensorflow"]),
    ("auto", "jax", "{}", ["TF_CONFIG", "unset TF_CONFIG"]),
])
def test_impossible_combinations_say_how_to_fix_them(requested, backend, tf_config, needles):
    with pytest.raises(ConfigError) as e:
        dist.choose_mode(requested, backend, tf_config=tf_config, accelerators=2)
    for needle in needles:
        assert needle in str(e.value)


def test_tf_config_is_parsed_and_checked():
    workers = {"worker": ["a:1", "b:1", "c:1"]}
    info = dist.parse_tf_config(json.dumps({"cluster": workers,
                                            "task": {"type": "worker", "index": 0}}))
    assert info == {"workers": 3, "index": 0, "is_chief": True}
    info = dist.parse_tf_config(json.dumps({"cluster": workers,
                                            "task": {"type": "worker", "index": 2}}))
    assert info == {"workers": 3, "index": 2, "is_chief": False}
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    for task, expect in [({"type": "chief", "index": 0}, (0, True)),
                         ({"type": "worker", "index": 0}, (1, False))]:
        info = dist.parse_tf_config(json.dumps({"cluster": with_chief, "task": task}))
        assert (info["workers"], info["index"], info["is_chief"]) == (3, *expect)
    for raw, needle in [("{not json", "not valid JSON"),
                        ('{"cluster": {"worker": ["a:1"]}}', '"task"'),
                        ('{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, '
                         '"task": {"type": "worker", "index": 0}}', "ps tasks"),
                        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", '
                         '"index": 1}}', "not one of the cluster's tasks")]:
        with pytest.raises(ConfigError, match="e.g. TF_CONFIG=") as e:
            dist.parse_tf_config(raw)
        assert needle in str(e.value)


def test_global_batch_must_split_over_the_replicas():
    dist.check_global_batch(32, 4, 1)
    with pytest.raises(ConfigError, match=r"4 replicas \(2 workers\).*batch_size=30.*28 or 32"):
        dist.check_global_batch(30, 4, 2)


def test_lr_scaling_rules():
    from trainer.schedule import lr_at

    base = {"train.batch_size": 128, "train.head_lr": 1e-3, "train.lr": 1e-4,
            "train.head_epochs": 1, "train.epochs": 2, "train.schedule": "constant"}
    cfg = RunConfig().replace(**base)
    assert dist.lr_factor(cfg.train) == 1.0 and lr_at(cfg, 0) == pytest.approx(1e-3)
    linear = cfg.replace(**{"train.lr_scaling": "linear", "train.lr_reference_batch": 32})
    assert dist.lr_factor(linear.train) == 4.0
    assert [lr_at(linear, e) for e in range(3)] == pytest.approx([4e-3, 4e-4, 4e-4])
    sqrt = linear.replace(**{"train.lr_scaling": "sqrt"})
    assert dist.lr_factor(sqrt.train) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="lr_reference_batch is not set.*train.lr_reference"):
        RunConfig().replace(**{"train.lr_scaling": "linear"})
    with pytest.raises(ConfigError, match="Did you mean 'mirrored'"):
        RunConfig().replace(**{"train.distribute": "mirored"})


def test_full_batches_only_when_distributed():
    from trainer.pipeline import CachedDataset

    y = np.arange(40) % 7
    images = np.zeros((40, 4, 4, 3), np.uint8)
    one = dist.full_batch_dataset(_plan(replicas=1), CachedDataset, images, y, batch_size=16)
    two = dist.full_batch_dataset(_plan(replicas=2), CachedDataset, images, y, batch_size=16)
    assert len(one) == 3 and len(one.batch_indices(2)) == 8
    assert len(two) == 2 and all(len(two[i][0]) == 16 for i in range(2))
    with pytest.raises(ConfigError, match="fewer images than one global batch"):
        dist.full_batch_dataset(_plan(replicas=2), CachedDataset, images, y, batch_size=64)


def _plan(*, replicas: int = 2, is_chief: bool = True, index: int = 0) -> dist.Plan:
    return dist.Plan(requested="auto", mode="mirrored", engine="MirroredStrategy",
                     backend="tensorflow", replicas=replicas, workers=1, worker_index=index,
                     is_chief=is_chief, devices=(), global_batch=16, sharding="batch")


def test_only_the_chief_writes_the_run_directory(tmp_path):
    out = tmp_path / "runs" / "r"
    assert dist.work_dir(_plan(), out, resume=False) == partial_dir(out)
    other = _plan(is_chief=False, index=1)
    work = dist.work_dir(other, out, resume=False)
    assert work.is_dir() and tmp_path not in work.parents and "worker1" in work.name
    (work / "model.keras").write_text("x")
    dist.finish(other, work, out, overwrite=False)
    assert not work.exists() and not out.exists()

    with pytest.raises(RunDirError, match="cannot see the chief's interrupted run"):
        dist.work_dir(other, out, resume=True)
    (partial_dir(out) / "checkpoints").mkdir(parents=True)
    (partial_dir(out) / "checkpoints" / "state.json").write_text("{}")
    copy = dist.work_dir(other, out, resume=True)
    assert (copy / "checkpoints" / "state.json").read_text() == "{}"
    dist.finish(other, copy, out, overwrite=False)
    assert partial_dir(out).is_dir() and not copy.exists()


def test_plan_for_one_device_is_a_no_op():
    import keras

    cfg = RunConfig().replace(**{"train.distribute": "none", "train.batch_size": 24})
    plan = dist.plan(cfg)
    assert (plan.mode, plan.replicas, plan.is_chief, plan.per_replica_batch) == (
        "none", 1, True, 24)
    assert plan.backend == keras.backend.backend()
    section = dist.card_section(plan, cfg.train)
    assert section["input_sharding"]["policy"] == "none" and section["partial_batch"] == "kept"
    json.dumps(section, allow_nan=False)  # goes into the card as is


def test_cli_multi_worker_without_tf_config(capsys, tmp_path, toy_data, monkeypatch):
    from trainer.cli import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = main(["fit", "--data", str(toy_data), "--out", str(tmp_path / "run"), *RUN_ARGS,
                 "--distribute", "multi-worker"])
    err = capsys.readouterr().err
    assert code == 2
    _assert_one_paragraph_error(err, "TF_CONFIG", '"task": {"type": "worker", "index": 0}')
    _no_run_dirs(tmp_path, "run")
    code = main(["fit", "--data", str(toy_data), "--out", str(tmp_path / "run"), *RUN_ARGS,
                 "--distribute", "mirored"])
    assert code == 2
    _assert_one_paragraph_error(capsys.readouterr().err, "Did you mean 'mirrored'")
