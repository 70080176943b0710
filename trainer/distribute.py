"""Data-parallel training through the frameworks' own engines (``train.distribute``).

* ``none``: one device.
* ``mirrored``: synchronous data parallelism over this machine's devices (its GPUs, else its
  logical CPUs): ``tf.distribute.MirroredStrategy`` under TensorFlow,
  ``keras.distribution.DataParallel`` under JAX.
* ``multi-worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` across machines, configured
  the standard way by the ``TF_CONFIG`` environment variable (TensorFlow only).
* ``auto``: multi-worker when ``TF_CONFIG`` is set, mirrored when more than one GPU is
  visible (TensorFlow, JAX), else none.

``train.batch_size`` is the global batch: every step, each of the R replicas gets
``batch_size / R`` images of it, and an epoch's last partial batch is dropped, so the
gradient is the single-device gradient of the same batch. Only the chief writes the run
directory; the other workers train into a private temporary directory deleted at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermedge.errors import RunDirError
from trainer.config import Distribute
from trainer.errors import ConfigError, DermedgeError

MODES = typing.get_args(Distribute)
TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')

# How each global batch reaches the replicas (recorded in the model card).
SHARDING = {
    "none": "one device reads every batch",
    "batch": "each global batch is split evenly along the batch axis over the replicas",
    "data": "every worker runs the same seeded input pipeline and keeps its own disjoint "
            "slice of each global batch (tf.data auto-shard: DATA, since the batches come "
            "from a Python generator, not files), then splits it over its local replicas",
}

# Strategies and distributions are process-wide: MultiWorkerMirroredStrategy can be created
# only once, before TensorFlow runs anything.
_HANDLES: dict[tuple, Any] = {}


@dataclass(frozen=True)
class Plan:
    """The resolved distribution of one ``trainer fit`` process."""

    requested: str
    mode: str  # none | mirrored | multi-worker
    engine: str  # none | MirroredStrategy | MultiWorkerMirroredStrategy | DataParallel
    backend: str
    replicas: int
    workers: int
    worker_index: int
    is_chief: bool
    devices: tuple[str, ...]
    global_batch: int
    sharding: str
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.replicas


# ---------------------------------------------------------------------------- pure rules
def lr_factor(train) -> float:
    """``train.lr_scaling`` applied to ``batch_size / lr_reference_batch`` (1 for ``none``)."""
    if train.lr_scaling == "none":
        return 1.0
    ratio = train.batch_size / train.lr_reference_batch
    return ratio if train.lr_scaling == "linear" else math.sqrt(ratio)


def parse_tf_config(raw: str) -> dict[str, Any]:
    """``{"workers", "index", "is_chief"}`` of a ``TF_CONFIG`` value; raises ConfigError."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"TF_CONFIG {why}. Received: TF_CONFIG={raw!r}. It must describe "
                           f"the cluster and this worker, e.g. {TF_CONFIG_EXAMPLE} (index 1 on "
                           "the second machine).")

    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON ({e})") from None
    cluster = cfg.get("cluster") if isinstance(cfg, dict) else None
    task = cfg.get("task") if isinstance(cfg, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise bad('needs a "cluster" and a "task" mapping')
    other = sorted(set(cluster) - {"chief", "worker"})
    if other:
        raise bad(f"has {', '.join(other)} tasks; MultiWorkerMirroredStrategy takes only "
                  "'chief' and 'worker' tasks (no parameter servers or evaluators)")
    sizes = {k: len(v) for k, v in cluster.items() if isinstance(v, list)}
    if sizes.keys() != cluster.keys() or not sum(sizes.values()):
        raise bad("needs a non-empty list of host:port addresses per task type")
    if sizes.get("chief", 0) > 1:
        raise bad("lists more than one chief")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in sizes or not isinstance(index, int) or not 0 <= index < sizes[kind]:
        raise bad(f"has task {task!r}, which is not one of the cluster's tasks")
    is_chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in sizes)
    position = index + (sizes.get("chief", 0) if kind == "worker" else 0)
    return {"workers": sum(sizes.values()), "index": position, "is_chief": is_chief}


def choose_mode(requested: str, backend: str, *, tf_config: str | None,
                accelerators: int) -> str:
    """The mode ``requested`` resolves to, or a ConfigError naming the fix."""
    if requested not in MODES:
        raise ConfigError(f"`train.distribute` must be one of {', '.join(MODES)}. "
                          f"Received: {requested!r}.")
    data_parallel = backend in ("tensorflow", "jax")
    if requested == "auto":
        if tf_config:
            if backend != "tensorflow":
                raise ConfigError(f"TF_CONFIG is set, so this looks like one worker of a "
                                  f"cluster, but KERAS_BACKEND={backend} cannot train across "
                                  "machines here. Use KERAS_BACKEND=tensorflow for multi-worker "
                                  "training, or unset TF_CONFIG to train on this machine only.")
            return "multi-worker"
        return "mirrored" if accelerators > 1 and data_parallel else "none"
    if requested == "mirrored" and not data_parallel:
        raise ConfigError(f"--distribute mirrored is not available under KERAS_BACKEND="
                          f"{backend}: Keras has no built-in data parallelism for it. Use "
                          "KERAS_BACKEND=tensorflow (tf.distribute.MirroredStrategy) or jax "
                          "(keras.distribution.DataParallel), or --distribute none.")
    if requested == "multi-worker":
        if backend != "tensorflow":
            raise ConfigError(f"--distribute multi-worker runs on TensorFlow's "
                              f"MultiWorkerMirroredStrategy; KERAS_BACKEND={backend} cannot. "
                              "Use KERAS_BACKEND=tensorflow, or --distribute mirrored for the "
                              "devices of one machine.")
        if not tf_config:
            raise ConfigError("--distribute multi-worker needs the TF_CONFIG environment "
                              "variable on every worker, describing the cluster and that "
                              f"worker, e.g. {TF_CONFIG_EXAMPLE} (index 1 on the second "
                              "machine). For the GPUs of one machine use --distribute mirrored.")
    return requested


def check_global_batch(global_batch: int, replicas: int, workers: int) -> None:
    """ConfigError unless ``train.batch_size`` splits evenly over the replicas."""
    if global_batch % replicas:
        lo = max(replicas, global_batch // replicas * replicas)
        where = f" ({workers} workers)" if workers > 1 else ""
        raise ConfigError(f"`train.batch_size` is the global batch and must split evenly over "
                          f"the {replicas} replicas{where}. Received: train.batch_size="
                          f"{global_batch}. Use a multiple of {replicas}, e.g. --batch-size "
                          f"{lo} or {lo + replicas}.")


# ---------------------------------------------------------------------------- the plan
def plan(config) -> Plan:
    """Resolve ``config.train.distribute`` for this process and start its engine.

    Call it before TensorFlow runs anything (MultiWorkerMirroredStrategy must come first).
    """
    import keras

    backend = keras.backend.backend()
    requested = config.train.distribute
    tf_config = os.environ.get("TF_CONFIG", "").strip() or None
    accelerators = _accelerators(backend) if requested == "auto" and not tf_config else 0
    mode = choose_mode(requested, backend, tf_config=tf_config, accelerators=accelerators)
    batch = config.train.batch_size
    common = {"requested": requested, "mode": mode, "backend": backend, "global_batch": batch}
    if mode == "none":
        return Plan(engine="none", replicas=1, workers=1, worker_index=0, is_chief=True,
                    devices=(), sharding="none", **common)
    if mode == "multi-worker":
        cluster = parse_tf_config(tf_config)
        strategy = _multi_worker_strategy(tf_config)
        replicas = int(strategy.num_replicas_in_sync)
        check_global_batch(batch, replicas, cluster["workers"])
        return Plan(engine="MultiWorkerMirroredStrategy", replicas=replicas,
                    workers=cluster["workers"], worker_index=cluster["index"],
                    is_chief=cluster["is_chief"], sharding="data",
                    devices=tuple(strategy.extended.worker_devices), handle=strategy, **common)
    if backend == "jax":
        handle, devices, engine = _data_parallel()
    else:
        handle, devices, engine = _mirrored_strategy()
    check_global_batch(batch, len(devices), 1)
    return Plan(engine=engine, replicas=len(devices), workers=1, worker_index=0,
                is_chief=True, devices=devices, sharding="batch", handle=handle, **common)


def _accelerators(backend: str) -> int:
    """Local GPUs/TPUs, counted without starting TensorFlow's runtime."""
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(d.platform != "cpu" for d in jax.devices())
    return 0


def _mirrored_strategy():
    import tensorflow as tf

    devices = tuple(d.name for d in (tf.config.list_logical_devices("GPU")
                                     or tf.config.list_logical_devices("CPU")))
    key = ("mirrored", devices)
    if key not in _HANDLES:
        _HANDLES[key] = tf.distribute.MirroredStrategy(devices=list(devices))
    return _HANDLES[key], devices, "MirroredStrategy"


def _multi_worker_strategy(tf_config: str):
    key = ("multi-worker", tf_config)
    if key not in _HANDLES:
        import tensorflow as tf

        try:
            _HANDLES[key] = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise DermedgeError(
                f"Could not start MultiWorkerMirroredStrategy ({e}). It must be created before "
                "TensorFlow runs anything: start each worker as a fresh `trainer fit "
                "--distribute multi-worker` process.") from None
    return _HANDLES[key]


def _data_parallel():
    import keras

    devices = tuple(keras.distribution.list_devices())
    key = ("data-parallel", devices)
    if key not in _HANDLES:
        _HANDLES[key] = keras.distribution.DataParallel(devices=list(devices))
    return _HANDLES[key], devices, "DataParallel"


# ---------------------------------------------------------------------------- training hooks
def scope(plan: Plan) -> contextlib.AbstractContextManager:
    """Where models and optimizers must be built: the strategy's or the distribution's scope."""
    if plan.handle is None:
        return contextlib.nullcontext()
    return plan.handle.scope()


def adapt_predict(plan: Plan, model) -> None:
    """Make ``model.predict_on_batch`` right under ``plan``, for a model built in its scope
    and read with ``trainer.pipeline.predict_arrays``; no effect on one device.

    Works around Keras 3.15 (pinned): under tf.distribute, ``predict_on_batch`` runs the whole
    batch on every replica and returns the copies concatenated, so predict on this worker's copy
    of the weights instead (one compiled call, no collectives, the same on every worker). Under
    DataParallel, the compiled predict function keeps the variable shardings of the trainable
    set it was traced with and fails once a new phase changes that set, so rebuild it then.
    """
    if plan.engine == "DataParallel":
        predict, traced = model.predict_on_batch, {}

        def predict_on_batch(x):
            key = tuple(id(v) for v in model.trainable_variables)
            if traced.setdefault("key", key) != key:
                traced["key"], model.predict_function = key, None
            return predict(x)

        model.predict_on_batch = predict_on_batch
    elif plan.engine in ("MirroredStrategy", "MultiWorkerMirroredStrategy"):
        import keras
        import tensorflow as tf

        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        model.predict_on_batch = lambda x: keras.tree.map_structure(
            lambda t: t.numpy(), forward(x))


def adapt_models(plan: Plan, model, train_model) -> None:
    """``adapt_predict(model)``, and under MultiWorkerMirroredStrategy make ``train_model.fit``
    work: Keras 3.15 fails there (keras-team/keras#20585), as its symbolic build reduces a
    nested batch and the per-step logs are reduced along axis 0 although they are scalars. Skip
    the former (the model builds when the step is traced, still inside the strategy's scope)
    and give the logs that axis."""
    adapt_predict(plan, model)
    if plan.engine == "MultiWorkerMirroredStrategy":
        import tensorflow as tf

        train_model._distribute_strategy = None
        step = train_model.train_step
        train_model.train_step = lambda data: {
            k: tf.reshape(v, [1]) for k, v in step(data).items()}


def agree(plan: Plan, flag: bool) -> bool:
    """``flag`` on any worker (an all-reduce across workers, so every worker gets the same
    answer); ``flag`` itself in one process. Early stopping goes through it: workers whose
    validation scores differ by a rounding error must still stop at the same epoch, or the
    ones that carry on wait forever for the others."""
    if plan.engine != "MultiWorkerMirroredStrategy":
        return bool(flag)
    import tensorflow as tf

    votes = plan.handle.run(lambda: tf.constant(1.0 if flag else 0.0))
    return float(plan.handle.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0


def full_batch_dataset(plan: Plan, cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` (a CachedDataset); distributed, without the last partial batch.

    Every replica then gets exactly ``per_replica_batch`` images a step (JAX cannot shard an
    uneven batch, and tf.distribute would weight uneven replicas unequally).
    """
    data = cls(*args, **kwargs)
    if plan.replicas == 1 or len(data.batch_indices(len(data) - 1)) == data.batch_size:
        return data
    if len(data) == 1:
        raise ConfigError(f"The training split has fewer images than one global batch "
                          f"(train.batch_size={plan.global_batch}), which distributed training "
                          "needs. Lower --batch-size, or use more data.")
    return cls(*args, **{**kwargs, "steps_per_epoch": len(data) - 1})


# ---------------------------------------------------------------------------- the run dir
def work_dir(plan: Plan, out: Path, *, resume: bool) -> Path:
    """Where this process builds the run: the chief ``<out>.partial``; any other worker a
    private temporary directory (a copy of the chief's interrupted run when resuming)."""
    from dermedge.artifacts import partial_dir

    chief = partial_dir(out)
    if plan.is_chief:
        return chief
    tmp = Path(tempfile.mkdtemp(prefix=f"dermedge-{out.name}-worker{plan.worker_index}-"))
    if resume:
        if not (chief / "checkpoints" / "state.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunDirError(f"Worker {plan.worker_index} cannot see the chief's interrupted "
                              f"run at {chief}. Resuming a multi-worker run needs --out on a "
                              "filesystem every worker sees (or a copy of the chief's "
                              f"{chief.name} at the same path on each worker).")
        shutil.copytree(chief, tmp, dirs_exist_ok=True)
    return tmp


def finish(plan: Plan, work: Path, out: Path, *, overwrite: bool) -> None:
    """The chief moves the finished run into place; other workers delete theirs."""
    from trainer.run import move_into_place

    if plan.is_chief:
        move_into_place(work, out, overwrite=overwrite)
    else:
        shutil.rmtree(work, ignore_errors=True)


def card_section(plan: Plan, train) -> dict[str, Any]:
    """``training.distribution`` of the model card."""
    f = lr_factor(train)
    return {
        "mode": plan.mode,
        "requested": plan.requested,
        "engine": plan.engine,
        "replicas": plan.replicas,
        "workers": plan.workers,
        "devices": list(plan.devices),
        "global_batch": plan.global_batch,
        "per_replica_batch": plan.per_replica_batch,
        "partial_batch": "dropped" if plan.replicas > 1 else "kept",
        "input_sharding": {"policy": plan.sharding, "detail": SHARDING[plan.sharding]},
        "lr_scaling": {"rule": train.lr_scaling, "reference_batch": train.lr_reference_batch,
                       "factor": f, "head_lr": train.head_lr * f, "lr": train.lr * f},
    }


def summary(plan: Plan) -> str:
    """One line for the training log."""
    role = "the chief" if plan.is_chief else f"worker {plan.worker_index}"
    return (f"distribute: {plan.engine}, {plan.replicas} replica(s) on {plan.workers} "
            f"worker(s), this process is {role}; global batch {plan.global_batch} = "
            f"{plan.replicas} x {plan.per_replica_batch}")
