"""``python -m export tflite RUN [...]``, ``python -m export bench BUNDLE [...]`` and
``python -m export qat-setup`` (the environment for ``--int8 --qat``, see export/qat.py).

Exit codes: 0 ok, 2 bad input (nothing written), 3 validation gate failed (bundle written,
marked failed in validation.json / model_card.json, with a REFUSED.txt notice beside them).
Arguments, the run directory and ``--out`` are checked before TensorFlow loads; TensorFlow's
start-up log lines are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from dermedge.cli import Parser, error_text, quiet_tensorflow
from dermedge.files import write_json
from export.config import (
    BIAS_CORRECTION,
    DEFAULT_QAT_EPOCHS,
    DEFAULT_QAT_LR,
    DEFAULT_REPRESENTATIVE_IMAGES,
    FLOAT_HEAD_OPS,
    IO_DTYPES,
    QAT_TARGETS,
    WEIGHT_ROUNDING,
)
from export.errors import DermedgeError
from export.refused import REFUSED_NOTICE

EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 2, 3
PROG = "python -m export"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up and C++ log lines")
    p = Parser(prog=PROG, parents=[common],
               description="Export a trained run to validated TFLite bundles (docs/EXPORT.md).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tflite", help="convert a run directory to a validated TFLite bundle",
                       parents=[common],
                       description="Convert a run directory to a TFLite bundle and validate it "
                       "against the float model. Exit 3: a validation gate failed; the bundle "
                       f"is written but marked refused ({REFUSED_NOTICE}).")
    t.add_argument("run", help="run directory written by `trainer fit`")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--int8", dest="mode", action="append_const", const="int8",
                      help="full-integer int8 (uint8 RGB input by default)")
    mode.add_argument("--float16", dest="mode", action="append_const", const="float16",
                      help="float16 weights")
    mode.add_argument("--dynamic", dest="mode", action="append_const", const="dynamic",
                      help="dynamic-range (int8 weights, float activations)")
    t.add_argument("--io", choices=IO_DTYPES, default=None,
                   help="int8 only: input dtype, and output dtype unless --output-io says "
                   "otherwise (default uint8)")
    t.add_argument("--output-io", choices=IO_DTYPES, default=None, dest="output_io",
                   help="int8 only: output dtype when it differs from --io, e.g. float32 "
                   "for dequantized probabilities (default: the same as --io)")
    t.add_argument("--out", type=Path, default=None,
                   help="bundle folder (default exports/<run name>-<mode>)")
    t.add_argument("--representative", type=int, default=DEFAULT_REPRESENTATIVE_IMAGES,
                   metavar="N", help="int8 calibration images from the train split (default "
                   f"{DEFAULT_REPRESENTATIVE_IMAGES})")
    t.add_argument("--data", type=Path, default=None,
                   help="validate on this labelled set instead of the run's split: another "
                   "splits.csv (its --split rows) or a folder with one sub-folder per diagnosis")
    t.add_argument("--split", default="val", help="split of splits.csv to validate on")
    t.add_argument("--tolerance", nargs="+", default=[], metavar="NAME=VALUE",
                   help="override a gate, e.g. diagnosis_agreement=0.97 (or NAME=none)")
    t.add_argument("--debug", action="store_true",
                   help="int8: run the quantization debugger, list the worst layers")
    t.add_argument("--float-heads", action="store_true",
                   help="int8: keep the heads (dense + softmax/sigmoid) in float and output "
                   "float32 probabilities; the input stays --io (uint8). Same as --output-io "
                   "float32 --keep-float " + " ".join(FLOAT_HEAD_OPS))
    t.add_argument("--keep-float", nargs="+", default=[], metavar="LAYER_OR_OP",
                   help="int8: keep these Keras layers / TFLite op types in float")
    t.add_argument("--bias-correction", choices=BIAS_CORRECTION, default=None,
                   help="int8: round kernels to int8 and correct biases before converting "
                   "(export/biascorr.py), then correct the converted model's biases against "
                   "float (export/qcorrect.py). on: both stages; kernel: the first only; auto "
                   "(default): convert with and without both, keep the one closer to float on "
                   "the calibration images")
    t.add_argument("--weight-rounding", choices=WEIGHT_ROUNDING, default=None,
                   help="int8 with bias correction: choose floor/ceil per weight to minimise "
                   "each layer's output error on calibration images (adaptive, Nagel et al. "
                   "2020; the default) or round kernels to the nearest grid point (nearest: "
                   "faster on wide backbones such as ResNet50)")
    t.add_argument("--no-validate", action="store_true", help="skip validation (not advised)")
    t.add_argument("--no-gate", dest="gate", action="store_false",
                   help="leave out the input gate: no 'ood' output (\"not a dermoscopy photo\")"
                   " and no measured gate thresholds in the card (the demo then checks photo"
                   " quality with default thresholds only)")
    t.add_argument("--no-compact", action="store_true",
                   help="ship the converter's bytes as they are: do not store identical "
                   "quantization vectors once (the compacted file is lossless and smaller)")
    t.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    q = t.add_argument_group("quantization-aware training (with --int8; needs `python -m "
                             "export qat-setup` once)")
    q.add_argument("--qat", action="store_true",
                   help="fine-tune with fake quantization on the run's train split before the "
                   "int8 conversion; PTQ int8 is converted and validated too, side by side")
    q.add_argument("--qat-epochs", type=int, default=None, metavar="N",
                   help=f"QAT epochs (default {DEFAULT_QAT_EPOCHS})")
    q.add_argument("--qat-steps", type=int, default=None, metavar="N",
                   help="cap on QAT batches per epoch (default: the whole train split)")
    q.add_argument("--qat-lr", type=float, default=None, metavar="LR",
                   help=f"QAT learning rate (default {DEFAULT_QAT_LR:g})")
    q.add_argument("--qat-target", choices=QAT_TARGETS, default=None,
                   help="what QAT fits: the float model's outputs (distill, default: the int8 "
                   "model learns to answer like the float one) or the training labels")
    q.add_argument("--qat-python", default=None, metavar="PYTHON",
                   help="interpreter of the QAT environment (default $DERMEDGE_QAT_PYTHON, "
                   "else the one `qat-setup` made)")
    b = sub.add_parser("bench", help="LiteRT latency / size / memory of a bundle or .tflite",
                       parents=[common], description="Time LiteRT inference of bundles or "
                       ".tflite files side by side, and report size and peak memory.")
    b.add_argument("model", nargs="+", help="bundle folder(s) or .tflite file(s)")
    b.add_argument("--runs", type=int, default=50, help="timed runs per model (the median is "
                   "reported)")
    b.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    b.add_argument("--threads", type=int, default=None,
                   help="LiteRT CPU threads (default: LiteRT's own choice)")
    b.add_argument("--json", type=Path, default=None, help="also write the results here")
    s = sub.add_parser("qat-setup", help="build the Python environment --qat runs in (cached)",
                       parents=[common], description="Build the cached virtual environment "
                       "(tensorflow + tf-keras + tensorflow-model-optimization) that --int8 --qat "
                       "fine-tunes in.")
    s.add_argument("--python", default=None, help="base interpreter for the venv (default: this "
                   "one)")
    s.add_argument("--force", action="store_true", help="rebuild it even if it exists")
    s.add_argument("--requirements", action="store_true",
                   help="only print the pip requirements (to build your own; use it with "
                   "--qat-python)")
    _add_mobile_parsers(sub)
    return p


def _add_mobile_parsers(sub) -> None:
    """``inspect`` and ``metadata-setup`` (issue 27: TFLite metadata, export/tflite_metadata.py)."""
    i = sub.add_parser("inspect", help="what a mobile developer needs from a bundle or .tflite: "
                       "input, outputs in subgraph order with labels, metadata, MediaPipe check",
                       description="Print what a mobile developer needs from a bundle or a "
                       ".tflite file: the input's name, shape, dtype and quantization, the "
                       "outputs in subgraph order with their labels, the TFLite metadata found, "
                       "and whether MediaPipe Tasks loads the file.")
    i.add_argument("model", help="bundle folder or .tflite file")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--no-mediapipe", action="store_true",
                   help="skip loading the file in MediaPipe Tasks (its environment is not "
                   "created by inspect; `metadata-setup` or an export creates it)")
    m = sub.add_parser("metadata-setup", help="build the MediaPipe environment that writes TFLite "
                       "metadata (cached; every export otherwise builds it on first use)",
                       description="Build the pinned, cached MediaPipe environment that writes "
                       "TFLite Model Metadata into exported files (every export otherwise builds "
                       "it on first use).")
    m.add_argument("--python", default=None, help="base interpreter for the venv (default: this "
                   "one)")
    m.add_argument("--force", action="store_true", help="rebuild it even if it exists")
    m.add_argument("--requirements", action="store_true",
                   help="only print the pinned pip requirements (install them with --no-deps "
                   "and set $DERMEDGE_MEDIAPIPE_PYTHON)")


def _config(args):
    from export.config import QuantizationConfig

    modes = args.mode or []
    if len(modes) > 1:
        got = " ".join("--" + m for m in modes)
        raise DermedgeError(f"Choose one quantization mode; received {got}.")
    mode = modes[0] if modes else "float32"
    qat_flags = [f for f, v in (("--qat-epochs", args.qat_epochs), ("--qat-steps", args.qat_steps),
                                ("--qat-lr", args.qat_lr), ("--qat-python", args.qat_python),
                                ("--qat-target", args.qat_target))
                 if v is not None]
    if args.weight_rounding is not None and (mode != "int8" or args.qat):
        raise DermedgeError(f"--weight-rounding {args.weight_rounding} only applies to "
                            "post-training --int8 exports with bias correction; drop it.")
    if args.bias_correction is not None and (mode != "int8" or args.qat):
        raise DermedgeError(f"--bias-correction {args.bias_correction} only applies to "
                            "post-training --int8 exports (float modes and --qat, which is "
                            "compared with the default post-training export, do not correct "
                            "biases); drop it.")
    if args.float_heads:
        if mode != "int8" or args.qat:
            what = "--qat" if args.qat else f"a {mode} export (already float)"
            raise DermedgeError(f"--float-heads keeps the heads of a post-training --int8 model "
                                f"in float; {what} does not use it. Drop --float-heads.")
    if qat_flags and not args.qat:
        raise DermedgeError(f"{' '.join(qat_flags)} only apply with --qat; add --int8 --qat or "
                            "drop them.")
    if args.qat:
        if mode != "int8":
            raise DermedgeError(f"--qat fine-tunes the model for full-integer int8; received "
                                f"--qat with {'--' + mode if modes else 'no mode (float32)'}. "
                                "Add --int8" + (f" and drop --{mode}." if modes else "."))
        if args.keep_float:
            raise DermedgeError("--keep-float cannot be combined with --qat: QAT learns the int8 "
                                "ranges of every layer. Drop one of them.")
        return QuantizationConfig.int8_qat(
            args.representative, io_dtype=args.io or "uint8", seed=args.seed,
            output_dtype=args.output_io,
            epochs=DEFAULT_QAT_EPOCHS if args.qat_epochs is None else args.qat_epochs,
            steps_per_epoch=args.qat_steps,
            lr=DEFAULT_QAT_LR if args.qat_lr is None else args.qat_lr,
            target=args.qat_target or "distill", compact=not args.no_compact)
    if mode == "int8":
        return QuantizationConfig.int8(args.representative, io_dtype=args.io or "uint8",
                                       keep_float=args.keep_float, seed=args.seed,
                                       bias_correction=args.bias_correction or "auto",
                                       weight_rounding=args.weight_rounding,
                                       output_dtype=args.output_io,
                                       float_heads=args.float_heads,
                                       compact=not args.no_compact)
    if args.output_io is not None:
        raise DermedgeError(f"--output-io {args.output_io} only applies to int8 exports; a {mode} "
                            "model always returns float32. Add --int8 or drop --output-io.")
    if args.io is not None:
        raise DermedgeError(f"--io {args.io} only applies to int8 exports; a {mode} model always "
                            "takes and returns float32. Add --int8 or drop --io.")
    return QuantizationConfig(mode, keep_float=tuple(args.keep_float),
                              compact=not args.no_compact)


def check_out(out: Path) -> None:
    """Refuse an --out the bundle could not be written to, before any conversion."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"is inside {parent}, which is a file"
            raise DermedgeError(f"--out {out} {where}; pass a folder path for the bundle "
                                "(new, empty, or an earlier bundle to replace).")
        if parent.exists():
            break
    if out.is_dir() and any(out.iterdir()) and not (out / "model_card.json").is_file():
        raise DermedgeError(f"--out {out} is a non-empty folder that is not an export bundle; "
                            "refusing to replace it. Pass a new or empty folder.")
    if out.exists() and not os.access(out if out.is_dir() else out.parent, os.W_OK):
        raise DermedgeError(f"--out {out} is not writable. Pass a folder you can write to.")


def _precheck_tflite(args, config) -> None:
    from export.api import default_out
    from export.rundir import open_run

    run = open_run(args.run)  # no TensorFlow: the card, model file and splits are checked
    if args.data is not None and not args.data.exists():
        raise DermedgeError(f"--data {args.data} not found. Pass a splits.csv or a folder with "
                            "one sub-folder per diagnosis, or drop --data to validate on the "
                            "run's own split.")
    label = "int8-qat" if config.qat is not None else config.mode
    check_out(Path(args.out) if args.out is not None else default_out(run, label))


def cmd_tflite(args) -> int:
    from export.config import Tolerances

    config = _config(args)
    _precheck_tflite(args, config)
    quiet_tensorflow(args.verbose)
    from export.api import export_run

    tol = Tolerances.for_mode(config.mode).with_overrides(args.tolerance)
    res = export_run(args.run, config, args.out, data=args.data, split=args.split,
                     tolerances=tol, debug=args.debug, validate=not args.no_validate,
                     log=lambda m: print(f"[export] {m}", file=sys.stderr),
                     qat_python=args.qat_python, gate=args.gate)
    v = res.report["validation"]
    ex = res.card["export"]
    print(f"{res.mode} bundle: {res.path} ({res.tflite_bytes:,} bytes, sha256 "
          f"{ex['sha256'][:12]}, input {ex['inputs']['image']['dtype']}) in {res.seconds:.1f} s")
    if v.get("skipped"):
        print("validation: skipped (--no-validate)")
        return EXIT_OK
    h = v["heads"]
    print(f"validation on {v['n']} images: diagnosis agreement "
          f"{h['diagnosis']['top1_agreement']:.4f}, melanoma agreement "
          f"{h['melanoma']['threshold_agreement']:.4f}, Δ balanced acc "
          f"{_s(v['metrics']['delta']['balanced_accuracy'])}{_crossfit(v)}, Δ melanoma AUC "
          f"{_s(v['metrics']['delta']['melanoma_auc'])}")
    if "ptq" in res.report:
        print(_qat_table(res.report))
    if res.report.get("debug"):
        print("largest quantization error (rmse/scale):")
        for r in res.report["debug"]["top"]:
            print(f"  {r['rmse_over_scale']:.3f}  {r['op']:<16} {r['tensor'][:90]}")
    if not res.passed:
        print(_para("Validation FAILED, export REFUSED: " + "; ".join(v["failed"])
                    + f". The bundle in {res.path} is marked refused ({REFUSED_NOTICE}; "
                    "validation.json and the card say passed=false): do not ship it. Retry "
                    "with more --representative images, --keep-float on the worst layers (see "
                    "--debug), or another mode."),
              file=sys.stderr)
        return EXIT_GATE_FAILED
    print("validation: passed")
    return EXIT_OK


def _s(x) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _qat_table(report: dict) -> str:
    from export.bench import table
    from export.qat import side_by_side

    v = report["validation"]
    rows = side_by_side(v["metrics"]["float"], report["ptq"]["validation"], v)
    return table(rows, [("metric", "metric", ""), ("float", "float", ".4f"),
                        ("PTQ int8", "ptq", ".4f"), ("QAT int8", "qat", ".4f")])


def cmd_qat_setup(args) -> int:
    from export.qat import QAT_ENV, setup_qat_env

    return _setup_env(args, QAT_ENV, setup_qat_env)


def _setup_env(args, env, build) -> int:
    """``qat-setup`` / ``metadata-setup``: print the pins, or build the cached venv."""
    if args.requirements:
        print("\n".join(env.requirements))
        return EXIT_OK
    py = build(args.python, force=args.force,
               log=lambda m: print(f"[export] {m}", file=sys.stderr))
    print(f"{env.label} environment: {py}")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from export.inspect_tflite import format_inspect, inspect_model

    info = inspect_model(args.model, mediapipe=not args.no_mediapipe)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return EXIT_OK


def cmd_metadata_setup(args) -> int:
    from export.tflite_metadata import MEDIAPIPE_ENV, setup_env

    return _setup_env(args, MEDIAPIPE_ENV, setup_env)


def cmd_bench(args) -> int:
    from export.bench import bench, bench_table

    results = [bench(m, runs=args.runs, warmup=args.warmup, threads=args.threads)
               for m in args.model]
    print(bench_table(results))
    if args.json:
        write_json(args.json, results, allow_nan=True)
    return EXIT_OK


def _para(msg: str) -> str:
    return textwrap.fill(" ".join(str(msg).split()), width=100)


def _crossfit(v: dict) -> str:
    cf = v["metrics"].get("balanced_accuracy_crossfit")
    return "" if not cf else (f" (cross-fitted {_s(-cf['drop'])}, the gate's: the run's class "
                              "offsets were fitted on these images)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``export`` / ``python -m export``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error the parser printed (2)
        return int(exc.code or 0)
    try:
        commands = {"tflite": cmd_tflite, "bench": cmd_bench, "qat-setup": cmd_qat_setup,
                    "inspect": cmd_inspect, "metadata-setup": cmd_metadata_setup}
        return commands[args.command](args)
    except (DermedgeError, ValueError) as exc:
        print(error_text(PROG, exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("tensorflow", "keras", "pandas", "yaml"):
            raise
        print(error_text(PROG, f"`{PROG} {args.command}` needs the training stack, which is not "
                         f"installed here (no module named '{exc.name}'). Install it with pip "
                         "install -e '.[train]' (or '.[gpu]' on a CUDA machine)."),
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; no bundle was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
