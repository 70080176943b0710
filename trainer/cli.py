"""``trainer`` command line: fit, evaluate, toy-data, backbones.

Keras/TensorFlow are imported only inside the subcommands that need them, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

from trainer.errors import DermedgeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer",
        description="Train and evaluate skin-lesion classifiers (see docs/ARTIFACTS.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser("fit", help="train a model into a run directory",
                       description="Train a model into a run directory. Relative paths in "
                       "the config and on the command line resolve against the current "
                       "directory.")
    f.add_argument("--config", help="YAML config file (see configs/)")
    f.add_argument("--out", required=True, help="run directory to create")
    g = f.add_argument_group("common overrides")
    g.add_argument("--data", help="dataset: HAM10000 folder/CSV, ISIC ground-truth CSV, or "
                   "one folder per class")
    g.add_argument("--layout", choices=("auto", "ham10000", "isic", "folders"))
    g.add_argument("--backbone", help="backbone name (`trainer backbones` lists them)")
    g.add_argument("--weights", help="'imagenet', a weights file, or 'none'")
    g.add_argument("--input-size", type=int, help="input side in pixels")
    g.add_argument("--epochs", type=int, help="fine-tune epochs (after the head warm-up)")
    g.add_argument("--head-epochs", type=int, help="head warm-up epochs (backbone frozen)")
    g.add_argument("--batch-size", type=int, help="global batch (split over the replicas)")
    g.add_argument("--distribute", metavar="MODE", help="auto (default), none, mirrored (this "
                   "machine's GPUs), or multi-worker (machines listed in TF_CONFIG)")
    g.add_argument("--lr", type=float, help="fine-tune learning rate")
    g.add_argument("--seed", type=int)
    g.add_argument("--name", help="run name recorded in the model card")
    g.add_argument("--distill-from", metavar="RUN", help="learn from a finished teacher run's "
                   "answers too (e.g. the cloud ensemble, runs/cloud); it must share this run's "
                   "validation split")
    g.add_argument("--distill-weight", type=float, metavar="A", help="the teacher's share of "
                   "each training target, in (0, 1] (default 0.5)")
    g.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="any config key, e.g. --set train.lr=3e-4 "
                   "(repeatable)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    f.add_argument("--resume", action="store_true",
                   help="continue an interrupted run for --out from its last epoch")
    f.add_argument("--quiet", action="store_true", help="no progress bars or epoch log")

    e = sub.add_parser("evaluate", help="score a run on its val/test split or another dataset")
    e.add_argument("run", help="run directory written by `trainer fit`")
    e.add_argument("--data", help="a labelled dataset (default: the run's own split)")
    e.add_argument("--layout", default="auto", choices=("auto", "ham10000", "isic", "folders"))
    e.add_argument("--images", help="image folder, when not next to the --data CSV")
    e.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="which split of the run's splits.csv (without --data)")
    e.add_argument("--tta", action="store_true", help="average over flips")
    e.add_argument("--out", help="output folder (default <run>/eval-<split>)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--gallery", type=int, default=4, metavar="N",
                   help="Grad-CAM gallery: N correct and N wrong cases per class in gallery/ "
                   "(default 4)")
    e.add_argument("--no-gallery", action="store_true", help="skip the Grad-CAM gallery")
    e.add_argument("--no-metadata", action="store_true",
                   help="score the image model alone, ignoring the run's metadata tables")

    t = sub.add_parser("toy-data", help="write the synthetic toy-lesion dataset")
    t.add_argument("--out", required=True)
    t.add_argument("--n-lesions", type=int, default=420)
    t.add_argument("--size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")

    sub.add_parser("backbones", help="list the backbone registry (name, size, preprocessing)")

    x = sub.add_parser("explain", help="Grad-CAM heatmaps of a run's model over photos",
                       description="Write one Grad-CAM overlay PNG per photo (the heatmap on "
                       "the centre crop the model sees, mapped back onto the photo) and "
                       "index.csv into --out.")
    x.add_argument("run", help="run directory written by `trainer fit`")
    x.add_argument("images", nargs="+", metavar="IMAGE", help="photos (JPEG/PNG)")
    x.add_argument("--out", required=True, help="folder to write (a previous explain folder "
                   "there is replaced)")
    x.add_argument("--head", default="diagnosis", help="diagnosis (default) or melanoma")
    x.add_argument("--class", dest="class_name", metavar="LABEL",
                   help="diagnosis class to explain, e.g. mel (default: the predicted class)")
    x.add_argument("--layer", help="backbone feature-map layer (default: the backbone's last "
                   "conv block, e.g. top_activation for efficientnet_lite0)")
    x.add_argument("--max-side", type=int, default=1024,
                   help="longest side of the PNGs in pixels (default 1024)")

    en = sub.add_parser("ensemble", help="combine finished runs (+ flip TTA) into one run",
                        description="Average several finished runs' heads (and, by default, "
                        "over four flips) in one model.keras, calibrated on the shared "
                        "validation split: an ordinary run directory that export and the demo "
                        "read like any other.")
    en.add_argument("runs", nargs="+", metavar="RUN", help="member run directories (same "
                    "input size and data split)")
    en.add_argument("--out", required=True, help="run directory to create")
    en.add_argument("--no-tta", action="store_true", help="members only, no flip averaging")
    en.add_argument("--no-calibrate", action="store_true", help="skip calibration")
    en.add_argument("--class-bias", action="store_true",
                    help="also fit one diagnosis logit offset per class on the validation split "
                    "(class-balanced log loss); the card records balanced accuracy before, "
                    "after and cross-fitted")
    en.add_argument("--name", help="name recorded in the model card")
    en.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    ca = sub.add_parser("calibrate", help="calibrate a finished run's heads in place",
                        description="Fit temperature scaling of the diagnosis head and Platt "
                        "scaling (temperature and shift) of the melanoma head on the run's "
                        "validation split and fold them into the head weights (for runs trained "
                        "with train.calibrate: false). Rewrites model.keras, the melanoma "
                        "threshold, metrics.json and the card.")
    ca.add_argument("run", help="run directory written by `trainer fit`")
    ca.add_argument("--class-bias", action="store_true",
                    help="also fit one diagnosis logit offset per class (class-balanced log "
                    "loss) and fold it into the head; on a calibrated run, adds only these")

    me = sub.add_parser("metadata", help="add patient metadata (age/sex/site) evidence to a run",
                        description="Count naive-Bayes tables of age, sex and body site per "
                        "diagnosis on the run's train split and store them in its model card; "
                        "`trainer evaluate`, the exported bundle's consumers and the demo then "
                        "multiply the image model's probabilities by each case's metadata "
                        "likelihood ratio where a case has metadata. Scores the val split with "
                        "and without. The model itself is not changed.")
    me.add_argument("run", help="run directory (from `trainer fit` or `trainer ensemble`)")
    me.add_argument("--weight", type=float, default=None, metavar="W",
                    help="exponent on the likelihood ratio (1: plain Bayes rule; default "
                    "0.5, tempered for correlated fields and other clinics)")
    me.add_argument("--smoothing", type=float, default=None, metavar="A",
                    help="pseudo-count per table cell (default 1)")
    me.add_argument("--remove", action="store_true", help="drop the run's metadata tables")
    return p


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer.config import RunConfig

    flags = {"data": args.data, "layout": args.layout, "backbone": args.backbone,
             "weights": args.weights, "input_size": args.input_size, "epochs": args.epochs,
             "head_epochs": args.head_epochs, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "name": args.name, "distribute": args.distribute,
             "distill_from": args.distill_from, "distill_weight": args.distill_weight}
    if flags["weights"] is not None and flags["weights"].lower() in ("none", "null", ""):
        flags["weights"] = "none"
    given = args.config or args.overrides or any(v is not None for v in flags.values())
    config = RunConfig.load(args.config, args.overrides, **flags) if (
        given or not args.resume) else None

    from trainer.fit import fit

    result = fit(config, args.out, overwrite=args.overwrite, resume=args.resume,
                 verbose=0 if args.quiet else None)
    m = result.metrics
    from trainer.evaluate import summary_table

    if not result.is_chief:
        print(f"\nworker finished; the chief writes the run to {result.run_dir}")
        return 0
    print(f"\nrun written to {result.run_dir} ({result.epochs_run} epochs, best "
          f"{result.best_epoch}, {result.wall_time_s:.0f}s); validation:")
    print(summary_table(m))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate, summary_table

    m = evaluate(args.run, data=args.data, layout=args.layout, images=args.images,
                 split=args.split, tta=args.tta, out=args.out, batch_size=args.batch_size,
                 gallery=0 if args.no_gallery else args.gallery,
                 metadata=not args.no_metadata)
    print(f"{m['source']} ({m['split']}):")
    print(summary_table(m))
    return 0


def cmd_toy_data(args: argparse.Namespace) -> int:
    from trainer.toy import make_toy_dataset

    path = make_toy_dataset(args.out, n_lesions=args.n_lesions, size=args.size, seed=args.seed,
                            overwrite=args.overwrite)
    print(f"toy dataset written to {path}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from trainer.backbones import get_backbone, list_backbones

    rows = [get_backbone(n) for n in list_backbones()]
    width = max(len(b.name) for b in rows)
    for b in rows:
        mobile = "mobile" if b.mobile else "      "
        print(f"{b.name:<{width}}  {b.default_size:>3}px  {mobile}  {b.preprocessing:<11}  "
              f"{b.description}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from trainer.ensemble import ensemble_runs
    from trainer.evaluate import summary_table

    card = ensemble_runs(args.runs, args.out, tta=not args.no_tta,
                         calibrate=not args.no_calibrate, class_bias=args.class_bias,
                         name=args.name,
                         overwrite=args.overwrite)
    e = card["ensemble"]
    print(f"ensemble of {len(e['members'])} runs x {len(e['tta'])} views written to {args.out}; "
          "validation:")
    import json
    from pathlib import Path

    print(summary_table(json.loads((Path(args.out) / "metrics.json").read_text())))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from trainer.calibration import calibrate_run

    c = calibrate_run(args.run, class_bias=args.class_bias)
    t, before, after = c["temperature"], c["ece_before"], c["ece_after_crossfit"]
    print(f"{args.run}: temperatures diagnosis {t['diagnosis']:.3f}, melanoma "
          f"{t['melanoma']:.3f} (shift {c['shift']['melanoma']:+.3f}); "
          f"ECE diagnosis {before['diagnosis']:.3f} -> "
          f"{after['diagnosis']:.3f}, melanoma {before['melanoma']:.3f} -> "
          f"{after['melanoma']:.3f} (cross-fitted on the validation split)")
    b = c.get("class_bias")
    if b and b.get("offsets"):
        offsets = ", ".join(f"{k} {v:+.2f}" for k, v in b["offsets"].items())
        cf = b["balanced_accuracy_after_crossfit"]
        print(f"class offsets: {offsets}; balanced accuracy {b['balanced_accuracy_before']:.3f}"
              f" -> {b['balanced_accuracy_after']:.3f} on the split they were fitted on, "
              + (f"{cf:.3f} +- {b['balanced_accuracy_after_crossfit_sd']:.3f} cross-fitted "
                 f"(offsets from one half, scored on the other; {b['crossfit_halvings']} "
                 "random halvings)"
                 if cf is not None else "no cross-fit (a half of the split lacks a class)"))
    return 0


def cmd_metadata(args: argparse.Namespace) -> int:
    from trainer.metadata import (
        DEFAULT_SMOOTHING,
        DEFAULT_WEIGHT,
        fit_run,
        remove_from_run,
        strongest,
    )

    if args.remove:
        if args.weight is not None or args.smoothing is not None:
            raise DermedgeError("--remove takes no --weight or --smoothing.")
        gone = remove_from_run(args.run)
        print(f"{args.run}: metadata tables {'removed' if gone else 'were not there'}")
        return 0
    s = fit_run(args.run, weight=DEFAULT_WEIGHT if args.weight is None else args.weight,
                smoothing=DEFAULT_SMOOTHING if args.smoothing is None else args.smoothing)
    fields = ", ".join(f"{f} ({len(v['values'])} values, {v['images']} images)"
                       for f, v in s["fields"].items())
    print(f"{args.run}: metadata tables from {s['fit_on']['images']} train images: {fields}")
    print("strongest evidence: " + "; ".join(
        f"{r['field']}={r['value']} x{r['ratio']:.2f} {r['class']}" for r in strongest(s)))
    a, b = s["metrics"]["val_image_only"], s["metrics"]["val"]
    print(f"val ({s['val']['with_metadata']} of {s['val']['images']} images with metadata, "
          f"weight {s['weight']:g}):")
    for key, name in (("balanced_accuracy", "balanced accuracy"), ("melanoma_auc", "melanoma AUC"),
                      ("accuracy", "accuracy"),
                      ("sensitivity_at_specificity_0.90", "mel sens @ 90% spec")):
        print(f"  {name:<20} {a[key]:.3f} -> {b[key]:.3f}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from trainer.explain import explain_images

    rows = explain_images(args.run, args.images, args.out, head=args.head,
                          class_name=args.class_name, layer=args.layer, max_side=args.max_side)
    for r in rows:
        print(f"{r['png']}: {r['head']} {r['class']} p={r['probability']:.3f} "
              f"(predicted {r['predicted']} {r['predicted_probability']:.3f})")
    print(f"{len(rows)} heatmaps (layer {rows[0]['layer']}) written to {args.out}")
    return 0


COMMANDS = {"fit": cmd_fit, "evaluate": cmd_evaluate, "toy-data": cmd_toy_data,
            "backbones": cmd_backbones, "explain": cmd_explain,
            "ensemble": cmd_ensemble, "calibrate": cmd_calibrate, "metadata": cmd_metadata}


def _error(message: str) -> int:
    text = " ".join(str(message).split())
    print(textwrap.fill(f"error: {text}", width=100, break_long_words=False,
                        break_on_hyphens=False), file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume", file=sys.stderr)
        return 130
    except DermedgeError as e:
        return _error(str(e))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        return _error(f"{e.strerror or e}: {e.filename or ''}. Check the path.")


if __name__ == "__main__":
    sys.exit(main())
