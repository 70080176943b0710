"""HTTPS on the demo's port, the local CA, and how files reach the phone: compressed copies,
content-hash ETags, versioned URLs, cross-origin isolation. The real waitress server (in a
subprocess, or in-process with a small WSGI app for the TLS front's limits) and a real headless
Chromium that trusts the test CA through its NSS database."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ci import need, unavailable
from conftest import demo_server

from edge_demo import certs
from edge_demo.cli import main
from edge_demo.errors import EdgeDemoError
from edge_demo.server import lan_addresses, make_server
from edge_demo.tls import TlsFront, _Handshaking

TEST_NAME = "dermedge.test"  # mapped to 127.0.0.1 in Chromium; never resolved elsewhere
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin",
             "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}


def _x509():
    from cryptography import x509

    return x509


# --- the local CA ------------------------------------------------------------------------
def test_local_ca_is_made_once_and_issues_a_server_certificate_for_the_machine(tmp_path):
    x509 = _x509()
    names = certs.machine_names("0.0.0.0", (TEST_NAME, "10.9.8.7"))
    assert {"localhost", "127.0.0.1", TEST_NAME, "10.9.8.7", *lan_addresses()} <= {
        *names.dns, *names.ips}
    host = socket.gethostname().lower()
    assert host in names.dns
    ca = certs.LocalCA(tmp_path / "state")
    first = ca.server_files(names)
    assert first.issued and first.ca_cert == tmp_path / "state" / "tls" / "ca.crt"
    for key in (ca.key_path, first.key):
        assert key.stat().st_mode & 0o777 == 0o600
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(first.cert.read_bytes())
    leaf.verify_directly_issued_by(ca_cert)
    basic = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {TEST_NAME, "localhost", host} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.9.8.7", *lan_addresses()} <= {
        str(a) for a in san.get_values_for_type(x509.IPAddress)}
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life <= dt.timedelta(days=398)  # what Safari and Chrome accept for a leaf

    again = certs.LocalCA(tmp_path / "state").server_files(names)  # a restart
    assert not again.issued and again.cert.read_bytes() == first.cert.read_bytes()

    moved = certs.Names(names.dns, ("127.0.0.1", "10.1.2.3"))  # the laptop changed network
    new = ca.server_files(moved)
    assert new.issued and "10.1.2.3" in new.names and "10.9.8.7" not in new.names
    x509.load_pem_x509_certificate(new.cert.read_bytes()).verify_directly_issued_by(ca_cert)
    assert ca.cert_path.read_bytes() == again.ca_cert.read_bytes()  # the same CA

    late = dt.datetime.now(dt.UTC) + dt.timedelta(days=380)  # under 30 days left
    assert ca.server_files(moved, now=late).issued


def test_a_damaged_ca_is_refused_with_the_fix(tmp_path):
    ca = certs.LocalCA(tmp_path)
    ca.ensure()
    ca.key_path.write_text("not a key")
    with pytest.raises(EdgeDemoError, match=r"cannot be read .*delete .*tls"):
        ca.ensure()


# --- the TLS front in front of waitress (in-process, a small WSGI app) ---------------------
def _echo(environ, start_response):
    if environ["PATH_INFO"] == "/304":
        start_response("304 Not Modified", [("ETag", '"x"')])
        return [b""]
    body = json.dumps({"addr": environ["REMOTE_ADDR"], "port": int(environ["REMOTE_PORT"]),
                       "scheme": environ["wsgi.url_scheme"],
                       "body": len(environ["wsgi.input"].read())}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    """(port, client TLS context, server) for a TLS-enabled DemoServer running ``_echo``."""
    files = certs.LocalCA(tmp_path_factory.mktemp("echo")).server_files(
        certs.machine_names("127.0.0.1"))
    server = make_server(_echo, host="127.0.0.1", port=0, threads=2, max_body=100_000,
                         request_timeout=1.5, tls=True)
    server.enable_tls(TlsFront(server, files.context(), handshake_timeout=1.5))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.effective_port, ssl.create_default_context(cafile=str(files.ca_cert)), server
    server.stop()
    thread.join(10)


def _tls_socket(port, ctx):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_all(s) -> str:
    """What the server sends until it closes the connection."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_one_port_answers_http_and_https_with_the_client_address(echo):
    port, ctx, _ = echo
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    conn.request("POST", "/x", body=b"a" * 50_000)
    body = json.loads(conn.getresponse().read())
    local = conn.sock.getsockname()
    assert body == {"addr": "127.0.0.1", "port": local[1], "scheme": "https", "body": 50_000}
    conn.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=10) as r:
        assert json.loads(r.read())["scheme"] == "http"
    with urllib.request.urlopen(f"https://localhost:{port}/healthz", context=ctx,
                                timeout=10) as r:
        assert r.read() == b'{"status":"ok"}\n'


def test_limits_hold_over_https(echo):
    port, ctx, _ = echo
    with _tls_socket(port, ctx) as s:  # over the body limit: 413 before the body is read
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
        head = _read_all(s)
    assert head.startswith("HTTP/1.1 413") and "request_entity_too_large" in head
    with _tls_socket(port, ctx) as s:  # a slow sender: 408 after request_timeout
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        head = _read_all(s)
    assert head.startswith("HTTP/1.1 408") and "request_timeout" in head
    assert 1.0 < time.monotonic() - t0 < 8


def test_a_304_keeps_the_connection_open(echo):
    port, ctx, _ = echo
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    conn.request("GET", "/304")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 304 and resp.getheader("Connection") is None
    sock = conn.sock
    conn.request("GET", "/x")
    assert conn.getresponse().status == 200 and conn.sock is sock  # the same connection
    conn.close()


def test_failed_and_stalled_handshakes_free_their_place(echo):
    port, _, server = echo

    def handshaking(n: int) -> int:  # connections in their handshake, once it is n
        deadline = time.monotonic() + 10
        while True:
            now = sum(isinstance(v, _Handshaking) for v in list(server._map.values()))
            if now == n or time.monotonic() > deadline:
                return now

    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_socket(port, untrusting)
    assert handshaking(0) == 0
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"\x16\x03\x01")  # a TLS record header, then nothing
    assert handshaking(1) == 1  # counted against the connection limit meanwhile
    assert stalled.recv(100) == b""  # closed after the handshake timeout (1.5 s)
    stalled.close()
    assert handshaking(0) == 0


# --- bad TLS options: a clear error and exit 2, before any model loads ---------------------
def _self_signed(tmp_path, *, days=30, start=None, name="localhost", password=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    start = start or dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    c, k = tmp_path / f"{name}-{days}.crt", tmp_path / f"{name}-{days}-{bool(password)}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8, enc))
    return c, k


def _bad_tls_cases(tmp_path):
    good_c, good_k = _self_signed(tmp_path)
    other_c, _ = _self_signed(tmp_path, name="other")
    old_c, old_k = _self_signed(tmp_path, days=1,
                                start=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    _, locked_k = _self_signed(tmp_path, name="locked", password=b"secret")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return [
        (["--tls-cert", str(good_c)], "--tls-key is missing"),
        (["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(good_k)], "no such file"),
        (["--tls-cert", str(text), "--tls-key", str(good_k)], "is not a PEM certificate"),
        (["--tls-cert", str(other_c), "--tls-key", str(good_k)],
         "key does not belong to the certificate"),
        (["--tls-cert", str(old_c), "--tls-key", str(old_k)], "expired on"),
        (["--tls-cert", str(good_c), "--tls-key", str(locked_k)], "encrypted"),
        (["--tls", "off", "--tls-cert", str(good_c), "--tls-key", str(good_k)], "contradicts"),
        (["--tls-cert", str(good_c), "--tls-key", str(good_k), "--tls-name", "x.test"],
         "--tls-name names what the local CA"),
        (["--tls-name", "not a name!"], "--tls-name must be a host name"),
    ]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def test_bad_tls_options_exit_2_with_the_fix(tmp_path, capsys):
    for extra, needle in _bad_tls_cases(tmp_path):
        rc = _exit_code(["serve", "--device", str(tmp_path / "no-bundle"), "--port", "0",
                         "--state-dir", str(tmp_path / "state"), *extra])
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert needle in err and "edge-demo: error:" in err, (extra, err)
        assert "Traceback" not in err


# --- the real server (subprocess) ----------------------------------------------------------
@pytest.fixture(scope="module")
def bundles():
    from test_browser_e2e import browser_bundles, ensure_runtime

    ensure_runtime()
    return browser_bundles()


@pytest.fixture(scope="module")
def https_server(bundles, tmp_path_factory):
    """(port, state dir, client TLS context) of `edge-demo serve --tls on` on 127.0.0.1."""
    state = tmp_path_factory.mktemp("https_state")
    log = tmp_path_factory.mktemp("https_server") / "server.log"
    with demo_server(["--device", str(bundles["int8"]), "--cloud", str(bundles["float32"]),
                      "--threads", "2", "--tls", "on", "--tls-name", TEST_NAME,
                      "--state-dir", str(state), "--compress", "fast"], log) as url:
        port = int(url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(state / "tls" / "ca.crt"))
        yield port, state, ctx, log


def _get(url, ctx=None, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _page_config(base, ctx):
    _, _, html = _get(base + "/", ctx)
    raw = re.search(rb'<script id="browser-config" type="application/json">(.*?)</script>',
                    html, re.S).group(1)
    return html.decode(), json.loads(raw)


def test_threaded_runtime_and_model_are_served_versioned_with_isolation_headers(https_server):
    port, _, ctx, _ = https_server
    base = f"https://localhost:{port}"
    html, cfg = _page_config(base, ctx)
    assert re.search(r'src="/static/app\.js\?v=[0-9a-f]{16}"', html)
    assert re.match(r"^/runtime/[0-9a-f]{16}/$", cfg["runtime"]) and cfg["runtime_id"]
    assert re.fullmatch(r"[0-9a-f]{64}", cfg["policy_sha256"]) and cfg["cache_key"]
    from test_browser_e2e import WEB

    wasm_dir = WEB / "node_modules" / "@litertjs" / "core" / "wasm"
    for name, mime in (("litert_wasm_threaded_internal.js", "text/javascript"),
                       ("litert_wasm_threaded_internal.wasm", "application/wasm")):
        status, headers, body = _get(base + cfg["runtime"] + "core/wasm/" + name, ctx)
        assert status == 200 and headers["Content-Type"].startswith(mime), name
        assert body == (wasm_dir / name).read_bytes()
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert {k: headers[k] for k in ISOLATION} == ISOLATION
        status, headers, _ = _get(base + "/runtime/core/wasm/" + name, ctx)  # unversioned
        assert status == 200 and headers["Cache-Control"] == "no-cache"
    status, headers, body = _get(base + cfg["model"], ctx)
    assert status == 200 and headers["X-Model-SHA256"] == cfg["sha256"]
    assert headers["ETag"] == f'"{cfg["sha256"]}"' and "immutable" in headers["Cache-Control"]
    version = json.loads(_get(base + "/api/v1/version", ctx)[2])
    assert version["model_sha256"] == cfg["sha256"] and version["tls"] == "local-ca"
    assert version["runtime"]["id"] == cfg["runtime_id"]
    assert version["cache_key"] == cfg["cache_key"]
    _, headers, _ = _get(base + "/", ctx)
    assert {k: headers[k] for k in ISOLATION} == ISOLATION


def _when_compressed(url, ctx, encoding, timeout=120):
    """The response for ``Accept-Encoding: <encoding>`` once the background copy exists."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = _get(url, ctx, {"Accept-Encoding": encoding})
        if headers.get("Content-Encoding") == encoding or time.monotonic() > deadline:
            assert headers.get("Content-Encoding") == encoding, url
            return status, headers, body
        time.sleep(0.5)


def test_compressed_copies_decompress_to_the_original_and_revalidate(https_server):
    brotli = need("brotli", "the demo extra installs it")
    port, _, ctx, _ = https_server
    base = f"https://localhost:{port}"
    _, cfg = _page_config(base, ctx)
    from test_browser_e2e import REPO, WEB

    files = {"/static/app.js": REPO / "edge_demo" / "static" / "app.js",
             cfg["runtime"] + "core/wasm/litert_wasm_threaded_internal.wasm":
                 WEB / "node_modules/@litertjs/core/wasm/litert_wasm_threaded_internal.wasm"}
    for path, source in files.items():
        original = source.read_bytes()
        status, headers, body = _when_compressed(base + path, ctx, "br")
        _, gz_headers, gz = _when_compressed(base + path, ctx, "gzip")
        assert brotli.decompress(body) == original and len(body) < len(original)
        assert headers["Vary"] == "Accept-Encoding"
        assert gzip.decompress(gz) == original
        _, plain_headers, plain = _get(base + path, ctx, {"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in plain_headers and plain == original
        tags = {headers["ETag"], gz_headers["ETag"], plain_headers["ETag"]}
        assert len(tags) == 3  # one per representation, all from the content hash
        assert all(hashlib.sha256(original).hexdigest() in t for t in tags)
        status, h304, body = _get(base + path, ctx, {"Accept-Encoding": "br",
                                                     "If-None-Match": gz_headers["ETag"]})
        assert status == 304 and body == b"" and h304["ETag"] == headers["ETag"]


def test_certificate_covers_the_lan_and_the_ca_is_kept_across_restarts(https_server, bundles,
                                                                       tmp_path):
    x509 = _x509()
    port, state, ctx, log = https_server
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(
            raw, server_hostname=TEST_NAME) as s:  # verified against the kept CA
        leaf = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    ca = x509.load_pem_x509_certificate((state / "tls" / "ca.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert set(lan_addresses()) <= ips and "127.0.0.1" in ips
    assert {TEST_NAME, "localhost", socket.gethostname().lower()} <= set(
        san.get_values_for_type(x509.DNSName))
    assert (state / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    text = log.read_text()
    assert certs.fingerprint(state / "tls" / "ca.crt") in text and "/trust" in text
    assert "https://127.0.0.1:" in text  # the URLs to open
    with demo_server(["--device", str(bundles["int8"]), "--threads", "1", "--tls", "on",
                      "--tls-name", TEST_NAME, "--state-dir", str(state), "--compress", "off"],
                     tmp_path / "again.log") as url:
        again_port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", again_port)) as raw, ctx.wrap_socket(
                raw, server_hostname=TEST_NAME) as s:
            again = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    assert again.serial_number == leaf.serial_number  # same CA, same certificate: reused
    assert "(new)" not in (tmp_path / "again.log").read_text()


def test_trust_page_and_ca_file_over_plain_http(https_server):
    x509 = _x509()
    port, state, _, _ = https_server
    status, headers, body = _get(f"http://127.0.0.1:{port}/ca.crt")
    assert status == 200 and headers["Content-Type"] == "application/x-x509-ca-cert"
    pem = (state / "tls" / "ca.crt").read_bytes()
    assert x509.load_der_x509_certificate(body) == x509.load_pem_x509_certificate(pem)
    status, _, html = _get(f"http://127.0.0.1:{port}/trust")
    html = html.decode()
    assert status == 200 and 'id="android"' in html and 'id="ios"' in html
    for step in ("Install a certificate", "Certificate Trust Settings", "Profile Downloaded",
                 "offline", "installing the page", "several cores", "persistent storage"):
        assert step in html, step
    assert f'href="https://127.0.0.1:{port}/"' in html
    assert certs.fingerprint(state / "tls" / "ca.crt") in html


def test_own_certificate_is_served_and_no_ca_is_offered(bundles, tmp_path):
    cert, key = _self_signed(tmp_path, name="localhost")
    with demo_server(["--device", str(bundles["int8"]), "--threads", "1", "--tls-cert",
                      str(cert), "--tls-key", str(key), "--compress", "off"],
                     tmp_path / "own.log") as url:
        port = int(url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(cert))
        status, _, body = _get(f"https://localhost:{port}/readyz", ctx)
        assert status == 200 and json.loads(body)["status"] == "ready"
        status, _, body = _get(f"http://127.0.0.1:{port}/ca.crt")
        assert status == 404 and json.loads(body)["error"]["code"] == "no_local_ca"
        assert "operator" in _get(f"http://127.0.0.1:{port}/trust")[2].decode()
    assert str(cert) in (tmp_path / "own.log").read_text()


# --- Chromium at a non-localhost name ------------------------------------------------------
def _nss_home(tmp_path: Path, ca: Path) -> Path:
    """A HOME whose NSS database (what Chromium on Linux reads) trusts ``ca``."""
    if shutil.which("certutil") is None:
        from test_browser_e2e import _apt_install

        _apt_install("libnss3-tools")
        if shutil.which("certutil") is None:
            unavailable("apt-get ran but certutil (libnss3-tools) is missing.")
    home = tmp_path / "home"
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    for cmd in (["-N", "--empty-password"], ["-A", "-t", "C,,", "-n", "dermedge test CA",
                                             "-i", str(ca)]):
        subprocess.run(["certutil", "-d", f"sql:{db}", *cmd], check=True,
                       capture_output=True, timeout=60)
    return home


@pytest.fixture(scope="module")
def phone(https_server, tmp_path_factory):
    """Chromium that trusts the server's CA and resolves dermedge.test to 127.0.0.1."""
    from test_browser_e2e import chromium

    _, state, _, _ = https_server
    tmp = tmp_path_factory.mktemp("phone")
    home = _nss_home(tmp, state / "tls" / "ca.crt")
    with chromium(tmp / "profile", args=(f"--host-resolver-rules=MAP {TEST_NAME} 127.0.0.1",),
                  env={**os.environ, "HOME": str(home)}) as driver:
        yield driver


def _classify(driver, tmp_path) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from test_browser_e2e import _photo

    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.ID, "device-status").get_attribute("data-state"))
    status = driver.find_element(By.ID, "device-status").text
    driver.find_element(By.ID, "image-input").send_keys(str(_photo(tmp_path)))
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "advice")))
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
    return status


FEATURES = ("return {secure: window.isSecureContext, isolated: window.crossOriginIsolated,"
            " sab: typeof SharedArrayBuffer === 'function', scheme: location.protocol}")


@pytest.mark.browser
def test_https_page_at_a_lan_name_is_secure_and_cross_origin_isolated(https_server, phone,
                                                                      tmp_path):
    from selenium.webdriver.common.by import By

    port = https_server[0]
    phone.get(f"https://{TEST_NAME}:{port}/")
    assert phone.execute_script(FEATURES) == {"secure": True, "isolated": True, "sab": True,
                                              "scheme": "https:"}
    assert phone.find_element(By.ID, "http-notice").get_attribute("hidden") is not None
    assert "runs in this browser" in _classify(phone, tmp_path)
    stored = phone.execute_async_script(  # the service worker registered and stored the page
        "const cb = arguments[0]; window.dermedgeOffline.ready.then(cb, () => cb(null));")
    cores = phone.execute_script("return navigator.hardwareConcurrency;")
    assert stored and stored["build"] == ("threaded" if cores > 1 else "single"), stored
    assert phone.find_element(By.ID, "offline-status").get_attribute("data-state") == "ready"
    worker = phone.execute_async_script(
        "const cb = arguments[0]; navigator.serviceWorker.getRegistration().then((r) => cb(r &&"
        " r.active ? {scope: r.scope, script: r.active.scriptURL} : null));")
    origin = f"https://{TEST_NAME}:{port}/"
    assert worker == {"scope": origin, "script": f"{origin}sw.js?build={stored['build']}"}
    advice = phone.find_element(By.ID, "advice").text
    assert "Refer to a dermatologist" in advice or "No action suggested" in advice


@pytest.mark.browser
def test_same_name_over_plain_http_is_not_secure_and_still_classifies(https_server, phone,
                                                                      tmp_path):
    from selenium.webdriver.common.by import By

    port = https_server[0]
    phone.get(f"http://{TEST_NAME}:{port}/")
    assert phone.execute_script(FEATURES) == {"secure": False, "isolated": False,
                                              "sab": False, "scheme": "http:"}
    notice = phone.find_element(By.ID, "http-notice")
    assert notice.is_displayed() and "cannot work offline" in notice.text
    assert notice.find_element(By.TAG_NAME, "a").get_attribute("href").endswith("/trust")
    assert "runs in this browser" in _classify(phone, tmp_path)
    offline = phone.find_element(By.ID, "offline-status")  # no service worker here
    assert offline.get_attribute("data-state") == "insecure" and "Offline use is off" in \
        offline.text
    assert phone.execute_script("return navigator.serviceWorker === undefined;")


# --- ETags and versions follow the content (Flask test client) -----------------------------
def test_etags_and_versioned_urls_follow_the_content(tmp_path):
    from test_edge_demo_browser_api import make_app

    from edge_demo.browser import RUNTIME_FILES

    fake = tmp_path / "rt" / "@litertjs"
    for name in RUNTIME_FILES:
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text("// " + name + " " * 2000)
    client = make_app(tmp_path, WEB_RUNTIME_DIR=str(tmp_path / "rt"), COMPRESS="off",
                      STATE_DIR=str(tmp_path / "state")).test_client()

    def config():
        html = client.get("/").get_data(as_text=True)
        return json.loads(re.search(r'id="browser-config" type="application/json">(.*?)<',
                                    html, re.S).group(1))

    name = "core/wasm/litert_wasm_threaded_internal.js"
    first = config()
    for path in ("/static/app.js", first["runtime"] + name):  # COMPRESS off: sent as they are
        resp = client.get(path, headers={"Accept-Encoding": "br, gzip"})
        assert resp.status_code == 200 and "Content-Encoding" not in resp.headers, path
    resp = client.get(first["runtime"] + name)
    tag = resp.headers["ETag"]
    assert resp.status_code == 200 and resp.headers["Cache-Control"].endswith("immutable")
    assert tag == f'"{hashlib.sha256((fake / name).read_bytes()).hexdigest()}"'
    assert client.get("/runtime/" + name, headers={"If-None-Match": tag}).status_code == 304

    (fake / name).write_text("// a new build" + " " * 2000)
    second = config()
    assert second["runtime_id"] != first["runtime_id"] and second["cache_key"] != \
        first["cache_key"]
    resp = client.get("/runtime/" + name, headers={"If-None-Match": tag})
    assert resp.status_code == 200 and resp.headers["ETag"] != tag
    assert resp.get_data(as_text=True).startswith("// a new build")
    stale = client.get(first["runtime"] + name)  # an old page's URL: no year-long caching
    assert stale.status_code == 200 and stale.headers["Cache-Control"] == "no-cache"

    model = client.get(first["model"])
    assert model.headers["Cache-Control"].endswith("immutable")
    wrong = client.get("/api/v1/device/model.tflite?v=0000000000000000")
    assert wrong.status_code == 200 and wrong.headers["Cache-Control"] == "no-cache"
    assert wrong.headers["ETag"] == model.headers["ETag"] == f'"{first["sha256"]}"'

    policy = client.get("/api/v1/policy")
    assert policy.get_json()["sha256"] == first["policy_sha256"]
    again = client.get("/api/v1/policy", headers={"If-None-Match": policy.headers["ETag"]})
    assert again.status_code == 304


def test_tls_auto_is_on_for_the_lan_and_off_on_loopback(tmp_path):
    from edge_demo.cli import _tls_mode, build_parser

    def mode(*extra):
        return _tls_mode(build_parser().parse_args(["serve", "--device", "b", *extra]))

    assert mode() == "off" and mode("--host", "localhost") == "off"
    assert mode("--host", "0.0.0.0") == "local-ca" and mode("--tls", "on") == "local-ca"
    assert mode("--host", "0.0.0.0", "--tls", "off") == "off"
    assert mode("--tls-cert", "c.pem", "--tls-key", "k.pem") == "own"
    from test_edge_demo_browser_api import make_app

    client = make_app(tmp_path, COMPRESS="off", STATE_DIR=str(tmp_path / "s")).test_client()
    resp = client.get("/ca.crt")
    assert resp.status_code == 404 and "does not serve HTTPS" in resp.get_json()["error"][
        "message"]
    assert "This server does not serve HTTPS" in client.get("/trust").get_data(as_text=True)
    assert client.get("/api/v1/version").get_json()["tls"] == "off"
