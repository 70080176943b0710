"""Why the export's balanced-accuracy gate is cross-fitted for runs with class offsets.

    python benchmarks/offsets_gate.py RUN [--int8 BUNDLE] [--noise 0.05 0.1 0.2] [--copies 20]

A run's class offsets (`trainer calibrate --class-bias`) are fitted on its validation split,
the same images the export validates on. This benchmark asks what that does to the gate
"balanced accuracy may drop at most 0.01": it takes the float model's validation outputs and
makes copies that differ from them only by label-blind noise on the logits (Gaussian, scale
`--noise`, what quantization does to an answer: a different number, not a different opinion),
and scores each copy against the float model three ways:

* **in-sample**: both with the run's offsets, on the split they were fitted on (the old gate);
* **without offsets**: both with the offsets taken out (a model that never saw these labels);
* **cross-fitted**: offsets refitted from the float model on one half, both scored on the other
  (dermedge.metrics.crossfit_pair, what the export's gate uses now; 5 halvings per copy).

It prints the mean ± SD of each drop over the copies and the share of copies a 0.01 gate would
refuse, and, with `--int8 BUNDLE`, the same three figures for a real int8 file of the run.
Writes JSON to benchmarks/results/offsets_gate-<run>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from export.config import Tolerances  # noqa: E402

GATE = Tolerances().balanced_accuracy_drop  # the export's default


def drops(pf: np.ndarray, pl: np.ndarray, y: np.ndarray, offsets: np.ndarray,
          repeats: int = 5) -> dict:
    """The three drops (float minus copy) of one copy ``pl`` of ``pf``."""
    from dermedge.metrics import crossfit_pair
    from dermedge.numerics import balanced_accuracy, log_probs

    def bacc(scores):
        return balanced_accuracy(y, scores.argmax(axis=-1))

    zf, zl = log_probs(pf) - offsets, log_probs(pl) - offsets
    return {
        "in_sample": bacc(pf) - bacc(pl),
        "without_offsets": bacc(zf) - bacc(zl),
        "crossfit": crossfit_pair(pf, pl, y, offsets, repeats=repeats)["drop"],
        "agreement": float(np.mean(pf.argmax(1) == pl.argmax(1))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--int8", type=Path, default=None, help="an int8 bundle of RUN to score too")
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)

    from dermedge.numerics import softmax
    from export.api import keras_predict, offsets_fitted_on
    from export.bench import table
    from export.rundir import load_images, open_run, validation_records

    run = open_run(args.run)
    offsets = offsets_fitted_on(run, None, "val")
    if offsets is None:
        print(f"{run.path} has no class offsets fitted on its val split: nothing to measure "
              "(`trainer calibrate RUN --class-bias` adds them).", file=sys.stderr)
        return 2
    rows_df, _ = validation_records(run, None, "val")
    idx = {c: i for i, c in enumerate(run.diagnosis_labels)}
    y = np.array([idx[d] for d in rows_df["dx"]], dtype=np.int64)
    images = load_images(rows_df["path"].tolist(), run.input_size)
    pf = keras_predict(run.load_model(), images)["diagnosis"].astype(np.float64)
    z = np.log(np.clip(pf, 1e-300, 1.0))
    rng = np.random.default_rng(args.seed)
    rows, records = [], []
    for scale in args.noise:
        got = [drops(pf, softmax(z + rng.normal(scale=scale, size=z.shape)), y, offsets)
               for _ in range(args.copies)]
        rec = {"copy": f"float + noise {scale}", "copies": args.copies,
               "agreement": float(np.mean([g["agreement"] for g in got]))}
        for k in ("in_sample", "without_offsets", "crossfit"):
            v = np.array([g[k] for g in got])
            rec[k] = {"mean": float(v.mean()), "sd": float(v.std()),
                      "refused": float(np.mean(v > GATE))}
        records.append(rec)
    if args.int8 is not None:
        from dermedge.litert import LiteModel

        pl = LiteModel.load(args.int8 / "model.tflite").predict(images, batch_size=16)
        g = drops(pf, np.asarray(pl["diagnosis"], np.float64), y, offsets, repeats=10)
        records.append({"copy": f"int8 file {args.int8.name}", "copies": 1,
                        "agreement": g["agreement"],
                        **{k: {"mean": g[k], "sd": None, "refused": float(g[k] > GATE)}
                           for k in ("in_sample", "without_offsets", "crossfit")}})

    def cell(d):
        sd = "" if d["sd"] is None else f" ± {d['sd']:.4f}"
        return f"{d['mean']:+.4f}{sd} ({d['refused']:.0%})"

    for r in records:
        rows.append({"copy": r["copy"], "n": str(r["copies"]), "agree": f"{r['agreement']:.4f}",
                     "in": cell(r["in_sample"]), "without": cell(r["without_offsets"]),
                     "crossfit": cell(r["crossfit"])})
    print(f"{run.path.name}: balanced-accuracy drop vs the float model on its val split "
          f"({len(y)} images); in brackets the share a {GATE} gate refuses")
    print(table(rows, [("copy", "copy", ""), ("n", "n", ""), ("top-1 agreement", "agree", ""),
                       ("in-sample, with offsets", "in", ""), ("without offsets", "without", ""),
                       ("cross-fitted", "crossfit", "")]))
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"offsets_gate-{run.path.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"run": str(run.path), "images": int(len(y)), "gate": GATE,
                               "seed": args.seed, "rows": records}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
