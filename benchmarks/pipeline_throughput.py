"""Is the input pipeline the bottleneck? Training images/second of

  (a) the real pipeline: ``trainer.pipeline.CachedDataset`` over a uint8 memmap cache, with
      class weights and capped resampling, feeding ``model.fit``;
  (b) the model step alone: the same batches preloaded in memory, fed to ``model.fit``.

Both train the same training model (augmentation layers included) for the same number of
steps after a warm-up epoch. The ratio (a)/(b) should be >= 0.9.

    python benchmarks/pipeline_throughput.py                      # mobilenet_v2 @ 224
    python benchmarks/pipeline_throughput.py --backbone tiny_cnn --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dermedge.files import write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pipeline_throughput.json"


def _timed_fit(train_model, data, steps: int) -> float:
    t0 = time.perf_counter()
    train_model.fit(data, epochs=1, verbose=0)
    return steps * data.batch_size / (time.perf_counter() - t0)


def run(backbone: str, size: int, *, steps: int, batch_size: int, workers: int,
        balance: str, repeats: int, seed: int = 0) -> dict:
    import keras

    from trainer.model import build_augmenter, build_model, set_trainable, training_model
    from trainer.pipeline import CachedDataset

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    n = steps * batch_size
    # HAM10000-like imbalance
    shares = np.array([327, 514, 1099, 115, 1113, 6705, 142], float)
    labels = rng.choice(7, size=n, p=shares / shares.sum())
    with tempfile.TemporaryDirectory() as tmp:
        cache = np.lib.format.open_memmap(Path(tmp) / "cache.npy", mode="w+", dtype=np.uint8,
                                          shape=(n, size, size, 3))
        for i in range(0, n, 256):
            cache[i:i + 256] = rng.integers(0, 256, cache[i:i + 256].shape, dtype=np.uint8)
        cache.flush()
        del cache
        images = np.load(Path(tmp) / "cache.npy", mmap_mode="r")

        model = build_model(backbone, input_size=size, weights=None)
        set_trainable(model, "finetune")
        train_model = training_model(model, build_augmenter(seed=seed))
        train_model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss={"melanoma": keras.losses.BinaryCrossentropy(),
                  "diagnosis": keras.losses.CategoricalCrossentropy(label_smoothing=0.1)})

        def pipeline():
            return CachedDataset(images, labels, batch_size=batch_size, balance=balance,
                                 seed=seed, steps_per_epoch=steps, workers=workers)

        class Preloaded(keras.utils.PyDataset):
            def __init__(self, batches):
                # Same prefetch threads as the pipeline, so only the data work differs.
                super().__init__(workers=workers, use_multiprocessing=False)
                self.batches, self.batch_size = batches, batch_size

            def __len__(self):
                return len(self.batches)

            def __getitem__(self, i):
                return self.batches[i]

        ref = pipeline()
        preloaded = Preloaded([ref[i] for i in range(len(ref))])
        train_model.fit(preloaded, epochs=1, verbose=0)  # warm-up: tracing, allocation
        train_model.fit(pipeline(), epochs=1, verbose=0)
        a, b = [], []
        for _ in range(repeats):  # interleaved, so machine load hits both alike
            a.append(_timed_fit(train_model, pipeline(), steps))
            b.append(_timed_fit(train_model, preloaded, steps))
    ips_a, ips_b = float(np.median(a)), float(np.median(b))
    return {
        "backbone": backbone, "input_size": size, "batch_size": batch_size, "steps": steps,
        "repeats": repeats, "balance": balance, "workers": workers,
        "pipeline_images_per_s": round(ips_a, 2),
        "model_step_images_per_s": round(ips_b, 2),
        "ratio": round(ips_a / ips_b, 3),
        "runs": {"pipeline": [round(x, 2) for x in a], "model_step": [round(x, 2) for x in b]},
        "backend": keras.backend.backend(), "keras": keras.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--balance", default="both", choices=("weights", "resample", "both", "none"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    r = run(args.backbone, args.size, steps=args.steps, batch_size=args.batch_size,
            workers=args.workers, balance=args.balance, repeats=args.repeats)
    print(f"{'backbone':<12} {'size':>5} {'batch':>5} {'pipeline img/s':>15} "
          f"{'model-step img/s':>17} {'ratio':>6}")
    print(f"{r['backbone']:<12} {r['input_size']:>5} {r['batch_size']:>5} "
          f"{r['pipeline_images_per_s']:>15.1f} {r['model_step_images_per_s']:>17.1f} "
          f"{r['ratio']:>6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[f"{r['backbone']}@{r['input_size']}"] = r
    write_json(out, results, allow_nan=True)
    print(f"written to {out}")
    return 0 if r["ratio"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
