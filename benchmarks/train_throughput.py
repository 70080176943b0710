"""Training images/second of one backbone with BatchNorm trainable vs frozen, side by side.

    python benchmarks/train_throughput.py                       # efficientnet_lite0 @ 224
    python benchmarks/train_throughput.py --backbone mobilenet_v2 --from-layer block_3_expand

Each variant builds the recipe's training model (augmentation layers included), compiles it as
``trainer fit`` does, and times ``--steps`` batches of random pixels after a warm-up. Variants:
every backbone layer trained with BN trainable / frozen, and (with ``--from-layer``) the same
from that layer up. Prints a table with each rate relative to the first and writes JSON to
benchmarks/results/train_throughput-<backbone>-<timestamp>.json.

Why it matters: Keras 3's trainable BatchNorm is unfused on the TensorFlow CPU backend, and its
backward pass dominates a MobileNet-style step; the recipes freeze BN (inference mode) so every
layer can be fine-tuned within the CPU budget.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from dermedge.files import write_json

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rate(backbone: str, size: int, *, finetune_layers, freeze_bn: bool, steps: int,
         batch_size: int, seed: int = 0) -> float:
    """Training images/second of one configuration (random pixels, random labels)."""
    import keras

    from trainer.config import TrainConfig
    from trainer.losses import head_losses
    from trainer.model import build_augmenter, build_model, set_trainable, training_model

    keras.utils.set_random_seed(seed)
    model = build_model(backbone, input_size=size, weights=None)
    set_trainable(model, "finetune", finetune_layers=finetune_layers, freeze_bn=freeze_bn)
    train_model = training_model(model, build_augmenter(seed=seed, saturation=0.2))
    rng = np.random.default_rng(seed)
    n = batch_size * (steps + 2)
    labels = rng.integers(0, 7, n)
    train_model.compile(optimizer=keras.optimizers.Adam(1e-4),
                        loss=head_losses(TrainConfig(class_balance="logit_adjust"), labels))
    x = rng.integers(0, 256, (n, size, size, 3)).astype("float32")
    y = {"melanoma": (labels == 4).astype("float32")[:, None],
         "diagnosis": np.eye(7, dtype="float32")[labels]}
    warm = 2 * batch_size
    train_model.fit(x[:warm], {k: v[:warm] for k, v in y.items()}, batch_size=batch_size,
                    epochs=1, verbose=0)
    t0 = time.perf_counter()
    train_model.fit(x[warm:], {k: v[warm:] for k, v in y.items()}, batch_size=batch_size,
                    epochs=1, verbose=0)
    return (n - warm) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--from-layer", default=None,
                   help="also time fine-tuning from this backbone layer up")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from export.bench import table

    variants = [("all", False), ("all", True)]
    if args.from_layer:
        variants += [(args.from_layer, False), (args.from_layer, True)]
    rows = []
    for layers, frozen in variants:
        r = rate(args.backbone, args.size, finetune_layers=layers, freeze_bn=frozen,
                 steps=args.steps, batch_size=args.batch_size)
        rows.append({"finetune_layers": layers, "batchnorm": "frozen" if frozen else "trainable",
                     "images_per_s": r})
    for row in rows:
        row["ratio"] = row["images_per_s"] / rows[0]["images_per_s"]
    print(f"{args.backbone} @ {args.size}, batch {args.batch_size}, {args.steps} timed steps")
    print(table(rows, [("fine-tuned", "finetune_layers", ""), ("BatchNorm", "batchnorm", ""),
                       ("img/s", "images_per_s", ".1f"), ("× first", "ratio", ".2f")]))
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / (f"train_throughput-{args.backbone}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, {"backbone": args.backbone, "size": args.size,
                      "batch_size": args.batch_size, "steps": args.steps,
                      "cpu_count": os.cpu_count(), "machine": platform.machine(),
                      "rows": rows}, allow_nan=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
