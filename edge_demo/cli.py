"""``edge-demo serve | predict | calibrate``: thin argparse over plain functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from dermedge.errors import DermedgeError

from .errors import EdgeDemoError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-demo", description=(
        "The dermedge phone-to-cloud demo: an on-device LiteRT tier, a cloud tier and an"
        " explicit fallback policy. Research tool, not a diagnosis."))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the page and the JSON API with waitress")
    s.add_argument("--device", required=True, help="on-device export bundle folder (int8)")
    s.add_argument("--cloud", help="cloud export bundle folder (e.g. float32), or a run"
                   " directory with model.keras when TensorFlow is installed")
    s.add_argument("--policy", help="policy file from `edge-demo calibrate` (else defaults)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    s.add_argument("--max-mb", type=float, default=10.0, help="upload size limit in MB")
    s.add_argument("--save-uploads-dir", help="OPT-IN: store every upload in this folder")
    s.add_argument("--no-browser-inference", dest="browser_inference", action="store_false",
                   help="run the device model on the server for every photo (default: the"
                        " page runs it in the browser with LiteRT.js and uploads the photo"
                        " only on fallback)")
    s.add_argument("--explain", metavar="RUN_DIR", help="enable Grad-CAM heatmaps (?explain=1)"
                   " from this `trainer fit` run directory's model.keras (needs TensorFlow)")

    r = sub.add_parser("predict", help="classify image files and print JSON")
    r.add_argument("--device", required=True)
    r.add_argument("--cloud")
    r.add_argument("--policy")
    r.add_argument("--age", help="patient age in years (optional metadata)")
    r.add_argument("--sex", help="male or female (optional metadata)")
    r.add_argument("--site", help="body site, e.g. back (optional metadata)")
    r.add_argument("images", nargs="+", type=Path)

    c = sub.add_parser("calibrate", help="choose policy thresholds on a labelled set")
    c.add_argument("--device", required=True)
    c.add_argument("--cloud", required=True)
    c.add_argument("--data", required=True,
                   help="a run's splits.csv or a folder with one sub-folder per class")
    c.add_argument("--split", default="val")
    c.add_argument("--target-fallback", type=float, default=0.2,
                   help="fall back to the cloud on at most this fraction of cases")
    c.add_argument("--target-sensitivity", type=float, default=0.9,
                   help="melanoma sensitivity the referral threshold must keep")
    c.add_argument("--referral-budget", type=float, metavar="SHARE",
                   help="refer at most this share of cases (e.g. 0.3) with the highest"
                        " melanoma sensitivity that allows; replaces --target-sensitivity"
                        " (default: not set)")
    c.add_argument("--limit", type=int, help="use only the first N images (quick runs)")
    c.add_argument("--out", required=True, type=Path, help="policy JSON to write")
    return p


def serve(args: argparse.Namespace) -> int:
    import waitress

    from .app import create_app

    if args.threads < 1:
        raise EdgeDemoError(f"--threads must be >= 1; received {args.threads}.")
    config = {"DEVICE_BUNDLE": args.device, "CLOUD_BUNDLE": args.cloud,
              "POLICY_FILE": args.policy, "INTERPRETERS": args.threads,
              "MAX_CONTENT_LENGTH": int(args.max_mb * 1024 * 1024),
              "SAVE_UPLOADS_DIR": args.save_uploads_dir, "EXPLAIN_RUN": args.explain,
              "BROWSER_INFERENCE": args.browser_inference}
    app = create_app({k: v for k, v in config.items() if v is not None})
    svc = app.extensions["edge_demo"]["service"]
    explainer = app.extensions["edge_demo"]["explainer"]
    print(f"edge-demo: device={svc.device.name} ({svc.device.mode})"
          f" cloud={svc.cloud.name if svc.cloud else 'none'} policy={svc.policy.source}"
          f" explain={explainer.name if explainer else 'off'}"
          f" on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    if args.save_uploads_dir:
        print(f"edge-demo: saving every upload to {args.save_uploads_dir} (opt-in)",
              file=sys.stderr)
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads,
                   ident="edge-demo", clear_untrusted_proxy_headers=True)
    return 0


def predict(args: argparse.Namespace) -> int:
    from .metadata import parse as parse_metadata
    from .service import DemoService

    meta = parse_metadata({"age": args.age, "sex": args.sex, "site": args.site})
    svc = DemoService.from_paths(args.device, args.cloud, args.policy)
    for path in args.images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EdgeDemoError(f"Cannot read {path} ({exc.strerror}).") from exc
        body = svc.classify(data, meta)
        body["image"] = str(path)
        print(json.dumps(body, indent=2))
    return 0


def calibrate_cmd(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, format_table, format_tradeoff, read_samples, run_tiers
    from .keras_tier import load_cloud_tier
    from .tiers import Tier

    device, cloud = Tier.from_bundle(args.device), load_cloud_tier(args.cloud)
    samples = read_samples(args.data, args.split)
    if args.limit:
        samples = samples[: args.limit]
    print(f"calibrate: {len(samples)} images, device={device.name} cloud={cloud.name}",
          file=sys.stderr)
    results = run_tiers(samples, device, cloud)
    policy = calibrate(results, device, cloud, target_fallback=args.target_fallback,
                       target_sensitivity=args.target_sensitivity,
                       referral_budget=args.referral_budget,
                       provenance={"data": str(Path(args.data).resolve()), "split": args.split})
    print(format_table(policy.coverage))
    print("\nreferral budget vs melanoma sensitivity (at the chosen fallback rules; 95 %"
          " Wilson intervals on this split; a new site should calibrate on its own sample):")
    print(format_tradeoff(policy.provenance["referral_tradeoff"]))
    out = policy.save(args.out)
    print(f"wrote {out}: min_confidence={policy.min_confidence:.4f}"
          f" band={policy.mel_band_low, policy.mel_band_high}"
          f" second_opinion={policy.second_opinion}@{policy.second_opinion_above:.4f}"
          f" refer_threshold={policy.refer_threshold}")
    return 0


COMMANDS = {"serve": serve, "predict": predict, "calibrate": calibrate_cmd}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except DermedgeError as exc:
        print(f"edge-demo {args.command}: error: {exc}", file=sys.stderr)
        return 2
