"""``edge-demo serve | predict | calibrate | cases | report``: thin argparse over functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from dermedge.cli import Parser, print_error
from dermedge.errors import DermedgeError

from .errors import EdgeDemoError
from .server import CONNECTION_LIMIT, IDLE_TIMEOUT_S, REQUEST_TIMEOUT_S
from .service import DEFAULT_DECODE_MIN_CROP


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be a whole number; received {text!r}."
                                         ) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"--port must be between 1 and 65535 (0 picks a free port); received {port}.")
    return port


def default_threads() -> int:
    """The usable CPU cores (at least 2): the workers' work is all computation."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 2
    return max(2, n)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; received {text!r}.")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0; received {text!r}.")
    return x


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def _tls_name(text: str) -> str:
    import ipaddress

    name = text.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"--tls-name must be a host name (e.g. clinic-laptop.local) or an IP address;"
            f" received {text!r}.")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="edge-demo", description=(
        "The dermedge phone-to-cloud demo: an on-device LiteRT tier, a cloud tier and an"
        " explicit fallback policy. Research tool, not a diagnosis."))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="serve the page and the JSON API with waitress",
        description="Serve the demo page and the JSON API (docs/SERVING.md: limits, timeouts,"
                    " what touches the disk). Uploads stay in memory; nothing is stored unless"
                    " --cases is given (then one row per decision, and photos only with"
                    " --keep-photos and the tester's consent).")
    s.add_argument("--device", required=True, help="on-device export bundle folder (int8)")
    s.add_argument("--cloud", help="cloud export bundle folder (e.g. float32), or a run"
                   " directory with model.keras when TensorFlow is installed")
    s.add_argument("--policy", help="policy file from `edge-demo calibrate` (else the"
                   " conservative defaults)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is"
                   " this machine only, 0.0.0.0 every interface (phones on the same LAN)")
    s.add_argument("--port", type=_port, default=8080, help="TCP port (1-65535; 0 = any free)")
    s.add_argument("--threads", type=_positive_int, default=default_threads(),
                   help="worker threads, one LiteRT interpreter each; this machine's usable"
                        " CPUs (at least 2) unless set: a worker only computes (waitress reads"
                        " and writes in its I/O thread), so more threads than cores contend")
    s.add_argument("--max-mb", type=_positive_float, default=10.0,
                   help="request body limit in MB, enforced by the server before reading")
    s.add_argument("--request-timeout", type=_positive_float, default=REQUEST_TIMEOUT_S,
                   help="seconds a request may take to arrive after its first byte (slow"
                        " senders get 408)")
    s.add_argument("--idle-timeout", type=_positive_float, default=IDLE_TIMEOUT_S,
                   help="seconds an idle keep-alive connection stays open")
    s.add_argument("--connection-limit", type=_positive_int, default=CONNECTION_LIMIT,
                   help="open connections accepted at once (more wait in the listen queue)")
    s.add_argument("--decode-min-crop", type=_positive_float, default=DEFAULT_DECODE_MIN_CROP,
                   help="JPEGs are decoded at 1/2, 1/4 or 1/8 scale keeping the centred crop at"
                        " least this many times the model side where a reduced scale allows"
                        " it, else at least 1x: less work per photo, within a stated tolerance"
                        " of the reference resize (docs/SERVING.md)")
    s.add_argument("--reference-decode", dest="fast_decode", action="store_false",
                   help="decode every photo in full, exactly as training and export do"
                        " (slower; for comparisons)")
    s.add_argument("--allow-unvalidated", action="store_true",
                   help="serve a bundle whose card says it failed its export validation"
                        " (for comparison only)")
    s.add_argument("--no-browser-inference", dest="browser_inference", action="store_false",
                   help="run the device model on the server for every photo (default: the"
                        " page runs it in the browser with LiteRT.js and uploads the photo"
                        " only on fallback)")
    s.add_argument("--no-gate", dest="gate", action="store_false",
                   help="turn the input gate off (research only): photos the gate would refuse as"
                        " blurry, badly lit, too small or not dermoscopy get a diagnosis too;"
                        " every answer records gate.enabled=false")
    s.add_argument("--cases", metavar="DIR", help="keep the site's case log (SQLite, one row"
                   " per decision: answers, rules, advice, latencies, patient fields; private"
                   " folder) in DIR; /cases shows it behind the token printed at start")
    s.add_argument("--keep-photos", action="store_true",
                   help="with --cases: keep a case's photo beside the log when the tester"
                        " recorded consent for it (never otherwise)")
    s.add_argument("--site-id", help="the clinic's id for the case log, when the page sends"
                   " none")
    s.add_argument("--tester-id", help="the tester's id for the case log, when the page sends"
                   " none")
    s.add_argument("--explain", metavar="RUN_DIR", help="enable Grad-CAM heatmaps (?explain=1)"
                   " from this `trainer fit` run directory's model.keras (needs TensorFlow)")
    t = s.add_argument_group(
        "HTTPS", "The port answers plain HTTP and HTTPS alike (docs/SERVING.md#https). A phone"
        " needs HTTPS for offline use, installing the page, the threaded runtime and"
        " persistent storage; /trust, over plain HTTP, shows how to trust the local CA once.")
    t.add_argument("--tls", choices=("auto", "on", "off"), default="auto",
                   help="serve HTTPS too: auto = on unless --host is a loopback address"
                        " (127.0.0.1 and localhost are secure contexts already)")
    t.add_argument("--tls-cert", metavar="PEM", help="your own certificate (chain) instead of"
                   " one from the local CA; needs --tls-key")
    t.add_argument("--tls-key", metavar="PEM", help="the unencrypted private key of --tls-cert")
    t.add_argument("--tls-name", metavar="NAME", type=_tls_name, action="append",
                   help="another host name or address the local CA's certificate must cover"
                        " (repeatable); it always covers localhost, this machine's host name"
                        " (and <name>.local) and its LAN addresses")
    t.add_argument("--state-dir", metavar="DIR", help="where the server keeps its local CA,"
                   " certificates and compressed static files (default: "
                   "~/.local/share/dermedge/edge-demo; the CA is made once and reused)")
    t.add_argument("--compress", choices=("best", "fast", "off"), default=None,
                   help="static files are compressed once per content (kept in the state"
                        " folder) in the background: best (brotli 11, gzip 9; about a minute"
                        " per runtime build, once), fast (brotli 5, gzip 6) or off; default"
                        " best")

    r = sub.add_parser(
        "predict", help="classify image files and print JSON",
        description="Classify each image with the same pipeline as the server and print one"
                    " JSON object per image. An unreadable image is reported on stderr and the"
                    " rest still run; the exit status is 1 when any image failed.")
    r.add_argument("--device", required=True, help="on-device export bundle folder")
    r.add_argument("--cloud", help="cloud export bundle folder or run directory")
    r.add_argument("--policy", help="policy file from `edge-demo calibrate` (else defaults)")
    r.add_argument("--age", help="patient age in years (optional metadata)")
    r.add_argument("--sex", help="male or female (optional metadata)")
    r.add_argument("--site", help="body site, e.g. back (optional metadata)")
    r.add_argument("--allow-unvalidated", action="store_true",
                   help="use a bundle whose card says it failed its export validation")
    r.add_argument("--no-gate", dest="gate", action="store_false",
                   help="turn the input gate off (research only): photos the gate would refuse as"
                        " blurry, badly lit, too small or not dermoscopy get a diagnosis too;"
                        " every answer records gate.enabled=false")
    r.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP)")

    c = sub.add_parser(
        "calibrate",
        help="choose policy thresholds on a labelled set",
        description="Run both tiers on a labelled validation set and choose the fallback and"
                    " referral thresholds for a target fallback rate and melanoma sensitivity;"
                    " writes a policy file for `edge-demo serve --policy`.")
    c.add_argument("--device", required=True, help="on-device export bundle folder")
    c.add_argument("--cloud", help="cloud export bundle folder or run directory (needed with"
                   " --data; with --cases it lets both tiers re-run on the kept photos)")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="a run's splits.csv or a folder with one sub-folder per"
                       " class (the developers' validation split)")
    where.add_argument("--cases", metavar="DIR", help="a site's case log (`edge-demo serve"
                       " --cases DIR`): fit the site's operating point on its labelled cases")
    c.add_argument("--policy", help="with --cases: the policy the cases were served under"
                   " (default: the conservative defaults); it keeps its fallback rules when"
                   " only device answers exist")
    c.add_argument("--site-id", help="with --cases: only this site's cases")
    c.add_argument("--no-temperature", dest="temperature", action="store_false",
                   help="with --cases: do not fit temperatures")
    c.add_argument("--split", default="val", help="which split of splits.csv to use")
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

    k = sub.add_parser(
        "cases", help="the site's case log: labels, export, delete",
        description="Work on the case log of `edge-demo serve --cases DIR` (it may be serving:"
                    " the log takes concurrent writers).")
    ksub = k.add_subparsers(dest="cases_command", required=True)
    ki = ksub.add_parser("import",
                         help="import reference diagnoses from a CSV",
                         description="Read labels.csv (columns case, diagnosis, other, source,"
                                     " date; case is the XXXX-XXXX code the page showed) and"
                                     " store every row, or none when a row is wrong.")
    ki.add_argument("labels", type=Path, help="the labels CSV")
    ke = ksub.add_parser("export",
                         help="write the cases with labels and both tiers' answers as CSV")
    ke.add_argument("--out", type=Path, help="CSV to write (default: standard output)")
    kd = ksub.add_parser("delete",
                         help="delete cases: their rows, labels and photos")
    kd.add_argument("refs", nargs="+", metavar="CASE", help="case codes (XXXX-XXXX) or ids")
    for sp in (ki, ke, kd):
        sp.add_argument("--cases", required=True, metavar="DIR", help="the case log folder")

    f = sub.add_parser(
        "report", help="write the field report (HTML + JSON)",
        description="Summarise a case log against the policy's promise: cases over time,"
                    " fallback/referral/gate rates with prediction intervals (drift flags),"
                    " device/cloud agreement, sensitivity and specificity on labelled cases,"
                    " a reliability diagram and latency per phone build.")
    f.add_argument("--cases", required=True, metavar="DIR", help="the case log folder")
    f.add_argument("--out", required=True, type=Path, help="folder for report.html and"
                   " report.json")
    f.add_argument("--policy", help="the policy file being served (default: the conservative"
                   " defaults, which promise nothing)")
    f.add_argument("--device", help="the device bundle (for the default policy's threshold)")
    f.add_argument("--site-id", help="only this site's cases")
    return p


def _tls_mode(args: argparse.Namespace) -> str:
    """off, local-ca or own; ``EdgeDemoError`` for options that do not go together."""
    from .errors import EdgeDemoError

    own = args.tls_cert or args.tls_key
    if own and not (args.tls_cert and args.tls_key):
        missing = "--tls-key" if args.tls_cert else "--tls-cert"
        raise EdgeDemoError(f"{missing} is missing: --tls-cert and --tls-key go together (your"
                            " certificate and its key, both PEM).")
    if own and args.tls == "off":
        raise EdgeDemoError("--tls off contradicts --tls-cert/--tls-key: leave out one or the"
                            " other.")
    if own and args.tls_name:
        raise EdgeDemoError("--tls-name names what the local CA's certificate covers; your own"
                            " certificate (--tls-cert) covers what it says. Leave out one.")
    if own:
        return "own"
    loopback = args.host in ("localhost", "::1") or args.host.startswith("127.")
    if args.tls == "off" or (args.tls == "auto" and loopback):
        return "off"
    return "local-ca"


def _tls_files(args, mode: str, state_dir: Path):
    """The certificate to serve (checked), and how to renew it when the addresses change."""
    from .certs import LocalCA, load_own, machine_names

    if mode == "own":
        return load_own(args.tls_cert, args.tls_key), None
    ca = LocalCA(state_dir)
    files = ca.server_files(machine_names(args.host, tuple(args.tls_name or ())))

    def renew():
        new = ca.server_files(machine_names(args.host, tuple(args.tls_name or ())))
        if not new.issued:
            return None
        print(f"edge-demo: this machine's addresses changed; new certificate for"
              f" {', '.join(new.names)}", file=sys.stderr, flush=True)
        return new.context()

    return files, renew


def _print_https(args, mode: str, files, port: int) -> None:
    from .certs import fingerprint
    from .server import urls

    https = [u.replace("http://", "https://", 1) for u in urls(args.host, port)]
    print("edge-demo: HTTPS on the same port (offline use, install, threads): "
          + "  or  ".join(https), file=sys.stderr)
    if mode == "own":
        print(f"edge-demo: certificate {files.cert} for {', '.join(files.names)}, valid to"
              f" {files.not_after:%Y-%m-%d}", file=sys.stderr)
        return
    plain = urls(args.host, port)
    trust = next((u for u in plain if not u.startswith("http://127.")), plain[0]) + "trust"
    print(f"edge-demo: certificate for {', '.join(files.names)}"
          f"{' (new)' if files.issued else ''}, valid to {files.not_after:%Y-%m-%d}, from the"
          f" local CA {files.ca_cert} (SHA-256 {fingerprint(files.ca_cert)})", file=sys.stderr)
    print(f"edge-demo: on each phone, once: open {trust} and trust the CA (QR code below)",
          file=sys.stderr)
    try:
        import segno
    except ImportError:
        return  # the URL above is enough; the demo extra installs segno for the QR code
    segno.make(trust, error="l").terminal(out=sys.stderr, compact=True, border=2)


def serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .certs import default_state_dir
    from .server import make_server, urls
    from .tls import TlsFront

    mode = _tls_mode(args)
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    config = {"DEVICE_BUNDLE": args.device, "CLOUD_BUNDLE": args.cloud,
              "POLICY_FILE": args.policy, "INTERPRETERS": args.threads,
              "MAX_CONTENT_LENGTH": int(args.max_mb * 1024 * 1024),
              "ALLOW_UNVALIDATED": args.allow_unvalidated,
              "DECODE_MIN_CROP": args.decode_min_crop, "FAST_DECODE": args.fast_decode,
              "CASES_DIR": args.cases, "KEEP_PHOTOS": args.keep_photos,
              "SITE_ID": args.site_id, "TESTER_ID": args.tester_id,
              "EXPLAIN_RUN": args.explain, "BROWSER_INFERENCE": args.browser_inference,
              "STATE_DIR": str(state_dir), "COMPRESS": args.compress, "TLS_MODE": mode,
              "GATE": args.gate}
    holder: dict = {}

    def wsgi(environ, start_response):  # the app, once loaded
        return holder["app"](environ, start_response)

    # bind first, so that a busy port or a foreign --host fails before the models load
    server = make_server(wsgi, host=args.host, port=args.port, threads=args.threads,
                         max_body=config["MAX_CONTENT_LENGTH"],
                         request_timeout=args.request_timeout, idle_timeout=args.idle_timeout,
                         connection_limit=args.connection_limit, tls=mode != "off")
    try:
        files, renew = _tls_files(args, mode, state_dir) if mode != "off" else (None, None)
        context = files.context() if files else None
        if files is not None and files.ca_cert is not None:
            config["TLS_CA_CERT"] = str(files.ca_cert)
        app = holder["app"] = create_app({k: v for k, v in config.items() if v is not None})
    except BaseException:
        server.shutdown()
        raise
    if context is not None:
        server.enable_tls(TlsFront(server, context, args.request_timeout, renew))
    svc = app.extensions["edge_demo"]["service"]
    explainer = app.extensions["edge_demo"]["explainer"]
    print(f"edge-demo: device={svc.device.name} ({svc.device.mode})"
          f" cloud={svc.cloud.name if svc.cloud else 'none'} policy={svc.policy.source}"
          f" explain={explainer.name if explainer else 'off'}"
          f" gate={'on' if svc.gate.enabled else 'OFF (--no-gate, research only)'}",
          file=sys.stderr)
    addresses = urls(args.host, server.effective_port)
    print("edge-demo: open " + "  or  ".join(addresses) + "   (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    if files is not None:
        _print_https(args, mode, files, server.effective_port)
    if args.cases:
        state = app.extensions["edge_demo"]
        lead = addresses[0] if files is None else addresses[0].replace("http://", "https://", 1)
        print(f"edge-demo: case log {state['cases'].path}"
              + (" (photos kept with the tester's consent)" if args.keep_photos else
                 " (no photos kept)"), file=sys.stderr)
        print(f"edge-demo: the site lead opens {lead}cases?token={state['cases_token']}"
              "   (this token is new at every start; keep it private)", file=sys.stderr)
    _compress_in_background(app)
    sys.stderr.flush()
    server.serve_forever()
    return 0


def _compress_in_background(app) -> None:
    """Compress the page's files now (once per content; a restart finds them on disk)."""
    import threading
    import time

    from .delivery import precompress

    store, queued = precompress(app)
    if not queued:
        if store.levels:
            print(f"edge-demo: static files compressed already (kept in {store.cache_dir})",
                  file=sys.stderr, flush=True)
        return
    t0 = time.monotonic()
    print(f"edge-demo: compressing {queued} static files in the background (once; kept in"
          f" {store.cache_dir})", file=sys.stderr, flush=True)

    def report():
        store.wait()
        print(f"edge-demo: compressed {queued} static files in"
              f" {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    threading.Thread(target=report, daemon=True).start()


def predict(args: argparse.Namespace) -> int:
    from .metadata import parse as parse_metadata
    from .service import DemoService

    meta = parse_metadata({"age": args.age, "sex": args.sex, "site": args.site})
    svc = DemoService.from_paths(args.device, args.cloud, args.policy,
                                 allow_unvalidated=args.allow_unvalidated, gate=args.gate)
    failed = 0
    for path in args.images:
        try:
            data = path.read_bytes()
            body = svc.classify(data, meta, what=f"file {path}")
        except OSError as exc:
            failed += 1
            print(f"edge-demo: error: cannot read {path} ({exc.strerror}); skipped.",
                  file=sys.stderr)
            continue
        except DermedgeError as exc:
            failed += 1
            print(f"edge-demo: error: {' '.join(str(exc).split())} (skipped)",
                  file=sys.stderr)
            continue
        body["image"] = str(path)
        print(json.dumps(body, indent=2), flush=True)
    if failed:
        print(f"edge-demo: error: {failed} of {len(args.images)} images could not be"
              " classified (see above).", file=sys.stderr)
        return 1
    return 0


def calibrate_cmd(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, format_table, format_tradeoff, read_samples, run_tiers
    from .keras_tier import load_cloud_tier
    from .tiers import Tier

    if args.cases:
        return calibrate_cases(args)
    if not args.cloud:
        raise EdgeDemoError("calibrate --data needs --cloud (both tiers run on every image).")
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


def calibrate_cases(args: argparse.Namespace) -> int:
    """``calibrate --cases``: the site's operating point; exit 3 when the sample is too small
    (the conservative policy is written, with the reason in its provenance)."""
    from .caselog import CaseLog
    from .keras_tier import load_cloud_tier
    from .policy import Policy
    from .sitecal import calibrate_site, results_from_cases, site_data, site_policy, verification
    from .tiers import Tier

    if args.referral_budget is not None or args.limit or args.split != "val":
        raise EdgeDemoError("--referral-budget, --limit and --split go with --data; with"
                            " --cases the target is --target-sensitivity (and --site-id"
                            " selects cases).")
    log = CaseLog(args.cases, create=False)
    device = Tier.from_bundle(args.device)
    cloud = load_cloud_tier(args.cloud) if args.cloud else None
    conservative = Policy.conservative((cloud or device).melanoma_threshold)
    base = Policy.load(args.policy) if args.policy else conservative
    data = site_data(log, args.site_id)
    ver = verification(data)
    results, mode = results_from_cases(data.cases, device, cloud)
    excluded = {"without_photo": len(data.cases) - len(results)} if mode == "both tiers" \
        else {}
    other_policy = sum(1 for c in log.cases() if c["policy_sha256"] != base.sha256)
    print(f"calibrate: {data.n_logged} cases logged, {len(data.cases)} labelled"
          f" ({sum(c.dx == 'mel' for c in data.cases)} melanomas); mode: {mode}"
          + (f" on the {len(results)} labelled cases with a kept photo" if mode == "both tiers"
             else ""), file=sys.stderr)
    if mode == "device only":
        why = ("no --cloud given" if cloud is None else
               "no labelled case has a kept photo (serve with --keep-photos and consent)")
        print(f"calibrate: device answers only ({why}): refitting only the referral threshold;"
              " the fallback rules and temperatures stay the base policy's.", file=sys.stderr)
        if other_policy:
            print(f"calibrate: warning: {other_policy} cases were logged under another policy"
                  " than --policy; their fallback decisions are replayed under --policy.",
                  file=sys.stderr)
    print(f"calibrate: {ver['text']}", file=sys.stderr)
    cal = calibrate_site(results, device_threshold=device.melanoma_threshold,
                         conservative=conservative, base=base,
                         target_fallback=args.target_fallback,
                         target_sensitivity=args.target_sensitivity,
                         refit_fallback=mode == "both tiers", fit_temperature=args.temperature)
    policy = site_policy(cal, data, mode=mode, n_used=len(results),
                         target_fallback=args.target_fallback,
                         target_sensitivity=args.target_sensitivity, site_id=args.site_id,
                         base=base, verification_info=ver, excluded=excluded)
    out = policy.save(args.out)
    if cal.refused:
        print(f"calibrate: REFUSED. {cal.message}", file=sys.stderr)
        print(f"wrote {out}: the conservative policy (the reason is in its provenance)")
        return 3
    pr = cal.promise

    def rate(key):
        ci = pr.get(key + "_ci")
        return f"{pr[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    print(f"calibrate: {cal.message}")
    print(f"promise on {pr['n']} cases (95 % intervals): fallback {rate('fallback_rate')},"
          f" referral {rate('referral_rate')}, melanoma sensitivity"
          f" {rate('melanoma_sensitivity')}, specificity {rate('melanoma_specificity')}")
    if policy.temperature:
        print(f"temperatures: {policy.temperature}")
    print(f"wrote {out}: min_confidence={policy.min_confidence:.4f}"
          f" band={policy.mel_band_low, policy.mel_band_high}"
          f" second_opinion={policy.second_opinion}@{policy.second_opinion_above:.4f}"
          f" refer_threshold={policy.refer_threshold}")
    return 0


def cases_cmd(args: argparse.Namespace) -> int:
    from .caselog import CaseLog, export_csv, read_labels

    log = CaseLog(args.cases, create=False)
    if args.cases_command == "import":
        items = read_labels(args.labels, log)
        log.set_labels(items, via=f"csv:{args.labels.name}")
        print(f"imported {len(items)} labels into {log.path}")
    elif args.cases_command == "export":
        if args.out is None:
            n = export_csv(log, sys.stdout)
        else:
            from dermedge.files import atomic_open

            out = args.out.expanduser()
            with atomic_open(out, mode=0o600, newline="") as fh:  # health data: private
                n = export_csv(log, fh)
            print(f"wrote {n} cases to {out}", file=sys.stderr)
    else:
        ids = [log.resolve(ref) for ref in args.refs]  # every code checked before any delete
        n = log.delete(ids)
        print(f"deleted {n} cases (rows, labels and photos) from {log.path}")
    return 0


def report_cmd(args: argparse.Namespace) -> int:
    from .caselog import CaseLog
    from .policy import Policy
    from .report import field_report, short_version, write_report

    log = CaseLog(args.cases, create=False)
    if args.policy:
        policy = Policy.load(args.policy)
    else:
        threshold = 0.5
        if args.device:
            from .tiers import Tier

            threshold = Tier.from_bundle(args.device).melanoma_threshold
        policy = Policy.conservative(threshold)
    rep = field_report(log, policy, args.site_id)
    paths = write_report(rep, args.out)
    short = short_version(rep)
    print(short["headline"])
    for line in short["lines"]:
        print(("! " if line["flag"] else "  ") + line["text"])
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


COMMANDS = {"serve": serve, "predict": predict, "calibrate": calibrate_cmd,
            "cases": cases_cmd, "report": report_cmd}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except DermedgeError as exc:
        print_error("edge-demo", exc)
        return 2
    except OSError as exc:  # a file or socket the operator named cannot be used
        where = f" {exc.filename}" if exc.filename else ""
        print(f"edge-demo: error: cannot use{where} ({exc.strerror or exc}). Check the path"
              " and its permissions.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
