"""How much of the int8 damage is weight rounding, and how much bias correction takes back.

    python benchmarks/weight_rounding.py RUN [--calibration 128] [--results DIR]

In Keras, with float activations throughout, on the run's val split: top-1 diagnosis agreement
and mean |Δp| against the float model for (a) every backbone kernel rounded onto TFLite's
per-channel int8 grid, (b) the same plus the empirical bias correction of export/biascorr.py,
(what `python -m export tflite --int8` does), (c) adaptive rounding plus bias correction
(`--weight-rounding adaptive`); (b) and (c) are fitted on train-split calibration images. Prints a
table and writes JSON to benchmarks/results/weight_rounding-<run>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dermedge.files import write_json  # noqa: E402
from export.api import keras_predict  # noqa: E402
from export.bench import table  # noqa: E402
from export.biascorr import DEFAULT_IMAGES, channel_axis, correct_biases, round_to_int8_grid  # noqa: E402
from export.rundir import (  # noqa: E402
    load_images,
    open_run,
    representative_records,
    validation_records,
)


def _score(name: str, probs: dict, ref: dict) -> dict:
    import numpy as np

    p, r = probs["diagnosis"], ref["diagnosis"]
    d = np.abs(p - r)
    return {"variant": name, "diagnosis_agreement": float(np.mean(p.argmax(1) == r.argmax(1))),
            "mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max())}


def measure(run_dir: str | Path, calibration: int = DEFAULT_IMAGES) -> list[dict]:
    import keras

    run = open_run(run_dir)
    val, _ = validation_records(run)
    images = load_images(val["path"].tolist(), run.input_size)
    cal = load_images(representative_records(run, calibration)["path"].tolist(), run.input_size)
    ref = keras_predict(run.load_model(), images)
    rounded = run.load_model()
    for lay in rounded.get_layer("backbone").layers:
        if isinstance(lay, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            w = lay.get_weights()
            w[0] = round_to_int8_grid(w[0], channel_axis(lay))
            lay.set_weights(w)
    rows = [_score("float (reference)", ref, ref),
            _score("kernels rounded to int8", keras_predict(rounded, images), ref)]
    del rounded
    for rounding in ("nearest", "adaptive"):
        corrected = run.load_model()
        report = correct_biases(corrected, cal, rounding=rounding)
        rows.append({**_score(f"{rounding} rounding + bias correction",
                              keras_predict(corrected, images), ref),
                     "layers_corrected": report["layers_corrected"],
                     "calibration_images": calibration, "seconds": report["seconds"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--calibration", type=int, default=DEFAULT_IMAGES)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = measure(args.run, args.calibration)
    print(table(rows, [("variant", "variant", ""), ("dx agree", "diagnosis_agreement", ".4f"),
                       ("seconds", "seconds", ".0f"),
                       ("mean |Δp|", "mean_abs_diff", ".4f"), ("max |Δp|", "max_abs_diff", ".3f")]))
    args.results.mkdir(parents=True, exist_ok=True)
    path = (args.results /
            f"weight_rounding-{Path(args.run).name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, {"run": str(Path(args.run).resolve()), "rows": rows}, allow_nan=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
