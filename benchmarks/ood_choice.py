"""How the input gate's "not a dermoscopy photo" score was chosen, on the float model.

Pooled backbone features (the ``pool`` layer) of train images (the density's fit), the
validation split, the 124 HAM10000 originals (600x450) and the **choose part** of
``everyday_photos_dev`` (sorted by file name, the first 150; the last 150 are held out for
benchmarks/input_gate.py). For the top softmax probability and for the probabilistic-PCA
density with and without its residual term, at several numbers of components: the AUROC
against the validation split, and at a validation budget of 1 % and 3 % the share of everyday
photos detected and of originals refused. Also, for the originals that are also validation
images, how their score compares with their 224-px JPEG's. Prints a table, writes JSON (a
row's ``components`` is the number used: fewer than asked for a small model or fit set).

    python benchmarks/ood_choice.py /work/runs/edge
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

COMPONENTS = (8, 16, 32, 64, 128)
BUDGETS = (0.01, 0.03)


def _features(model, paths, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and softmax probabilities, in batches of 64."""
    import keras

    from dermedge.image import load_image

    fm = keras.Model(model.input, {"pool": model.get_layer("pool").output,
                                   "diagnosis": model.output["diagnosis"]})
    feats, probs = [], []
    for i in range(0, len(paths), 64):
        x = np.stack([load_image(p, size) for p in paths[i:i + 64]]).astype(np.float32)
        out = fm(x, training=False)
        feats.append(np.asarray(out["pool"]))
        probs.append(np.asarray(out["diagnosis"]))
    return np.concatenate(feats), np.concatenate(probs)


def main(argv: Sequence[str] | None = None) -> int:
    from input_gate import auroc
    from load_demo import write_result

    from export import gate
    from export.rundir import open_run, stratified_sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory (model.keras, splits.csv)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--fit-images", type=int, default=gate.FIT_IMAGES)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    run = open_run(args.run)
    model = run.load_model()
    splits = run.splits()
    train = splits[splits["split"] == "train"]
    fit_rows = stratified_sample(train, min(args.fit_images, len(train)), seed=0)
    val = splits[splits["split"] == "val"]
    data = args.shared / "data"
    raw = sorted((data / "ham10000_raw_600x450" / "images").glob("*.jpg"))
    choose = sorted((data / "everyday_photos_dev").glob("*.jpg"))[:150]
    size = run.input_size
    f_fit, _ = _features(model, fit_rows["path"].tolist(), size)
    f_val, p_val = _features(model, val["path"].tolist(), size)
    f_raw, p_raw = _features(model, [str(p) for p in raw], size)
    f_ev, p_ev = _features(model, [str(p) for p in choose], size)

    rows = []

    def add(name, s_val, s_raw, s_ev, components=None):
        row = {"score": name, "components": components, "auroc_everyday": auroc(s_ev, s_val),
               "auroc_originals": auroc(s_raw, s_val)}
        for b in BUDGETS:
            t = np.quantile(s_val, 1 - b)
            row[f"detected_at_{b}"] = round(float(np.mean(s_ev > t)), 4)
            row[f"originals_refused_at_{b}"] = round(float(np.mean(s_raw > t)), 4)
        rows.append(row)

    add("1 - top softmax probability", 1 - p_val.max(1), 1 - p_raw.max(1), 1 - p_ev.max(1))
    for k in COMPONENTS:
        mean, comp, var, noise = gate.fit_density(f_fit, k)
        for resid in (False, True):
            def score(f, mean=mean, comp=comp, var=var, noise=noise, resid=resid):
                d = f.astype(np.float64) - mean
                p = d @ comp.T
                s = (p ** 2 / var).sum(1)
                return s + ((d ** 2).sum(1) - (p ** 2).sum(1)) / noise if resid else s
            add(f"PPCA {k} components{' + residual' if resid else ' (principal part only)'}",
                score(f_val), score(f_raw), score(f_ev), len(comp))

    fit = gate.fit_ood(f_fit, f_val, 0.01)
    names = {Path(p).stem: i for i, p in enumerate(val["path"])}
    pairs = [(i, names[p.stem]) for i, p in enumerate(raw) if p.stem in names]
    s_raw, s_val = fit.score(f_raw), fit.score(f_val)
    higher = sum(s_raw[i] > s_val[j] for i, j in pairs)
    ratio = [float(s_raw[i] / s_val[j]) for i, j in pairs]
    twins = {"pairs": len(pairs), "original_scores_higher": int(higher),
             "median_ratio": round(float(np.median(ratio)), 3) if ratio else None}

    print(f"{'score':<48}{'AUROC':>7}{'orig.':>7}" + "".join(
        f"{'det@' + str(b):>10}{'orig@' + str(b):>11}" for b in BUDGETS))
    for r in rows:
        print(f"{r['score']:<48}{r['auroc_everyday']:>7.3f}{r['auroc_originals']:>7.3f}" + "".join(
            f"{r[f'detected_at_{b}']:>10.3f}{r[f'originals_refused_at_{b}']:>11.3f}"
            for b in BUDGETS))
    print(f"originals that are also validation images: {twins['pairs']}; the original scores"
          f" higher for {twins['original_scores_higher']} (median ratio {twins['median_ratio']})")
    write_result({"run": str(args.run), "fit_images": len(fit_rows), "rows": rows,
                  "twins": twins, "everyday_choose": "the first 150 by file name",
                  "seconds": round(time.perf_counter() - t0, 1)}, args.out, "ood_choice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
