"""The demo server under hostile and heavy use (issue 30), against the real waitress server
on 127.0.0.1 (in this process, on a free port), with bounded counts and seconds.

Each test failed before its fix: bodies were spooled to a temporary file over 512 kB; a 60 MB
body was read in full before the 413; 110 slow connections filled waitress' connection table
(100) so /healthz timed out; /healthz queued behind busy worker threads; large JPEGs were
decoded at full size; MPO photos got 415; start-up errors were tracebacks.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ci import skip_unless
from demo_fixtures import jpeg_bytes, tiny_bundles
from PIL import Image

from dermedge.image import draft_scale, load_image
from edge_demo.app import create_app
from edge_demo.cli import build_parser, main
from edge_demo.errors import BundleError, RequestError
from edge_demo.imaging import DecodeBudget, decode_upload, open_upload
from edge_demo.server import make_server, urls
from edge_demo.tiers import Tier

BOUNDARY = "hardening0b7e"


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


class Live:
    """A real waitress server (edge_demo.server) running the app on 127.0.0.1."""

    def __init__(self, app, **kw):
        self.app = app
        self.server = make_server(app, host="127.0.0.1", port=0,
                                  max_body=app.config["MAX_CONTENT_LENGTH"], **kw)
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.stop()
        self.thread.join(10)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read(), time.perf_counter() - t0
        finally:
            conn.close()

    def classify(self, data: bytes, timeout: float = 30.0) -> tuple[int, dict]:
        body, ctype = multipart(data)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/api/v1/classify", body, {"Content-Type": ctype})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


def multipart(data: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
             .encode() for k, v in (fields or {}).items()]
    parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\";"
                 f" filename=\"p.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode() + data
                 + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), \
        f"multipart/form-data; boundary={BOUNDARY}"


def app_for(bundles, **config):
    return create_app({"DEVICE_BUNDLE": str(bundles["int8"]), "INTERPRETERS": 4,
                       "LOG_JSON": False, **config})


@pytest.fixture(scope="module")
def live(bundles):
    srv = Live(app_for(bundles, MAX_CONTENT_LENGTH=8 * 1024 * 1024))
    yield srv
    srv.close()


def open_files() -> dict[str, str]:
    """fd -> target of this process' descriptors that are files (not sockets/pipes)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith("/dev/"):
            out[fd] = target
    return out


def noisy_png(nbytes: int) -> bytes:
    """A valid PNG of random pixels of about ``nbytes`` bytes (noise does not compress)."""
    side = int((nbytes / 3) ** 0.5) + 1
    arr = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), "PNG", compress_level=1)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# --- 1. nothing of an upload touches the disk; the body limit is the server's ------------
@skip_unless(Path("/proc/self/fd").is_dir(), "needs Linux /proc")
@pytest.mark.parametrize("form", ["multipart", "body"])
def test_a_5mb_upload_creates_no_file(live, form):
    photo = noisy_png(5 * 1024 * 1024)
    assert len(photo) > 5 * 1024 * 1024
    body, ctype = multipart(photo) if form == "multipart" else (photo, "image/png")
    before = open_files()
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
        s.sendall(f"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:-100])
        time.sleep(0.5)  # the server holds 5 MB of the body now
        during = open_files()
        s.sendall(body[-100:])
        reply = recv_response(s)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    new = {fd: t for fd, t in during.items() if before.get(fd) != t}
    assert new == {}, f"files opened while the upload was held: {new}"


def recv_response(s: socket.socket, limit_s: float = 30.0) -> bytes:
    s.settimeout(limit_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    n = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length:")), b"0"))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_a_body_over_the_limit_gets_json_413_before_it_is_sent(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
        s.sendall(b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                  b"form-data; boundary=b\r\nContent-Length: 62914560\r\n\r\n" + b"x" * 1000)
        t0 = time.perf_counter()
        reply = recv_response(s, 5.0)
    assert time.perf_counter() - t0 < 3.0
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head
    err = json.loads(payload)["error"]
    assert err["code"] == "request_entity_too_large"
    assert "8,388,608 bytes (8 MB)" in err["message"]


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(live):
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                  b"form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8 * 16 + 1):  # one chunk over the 8 MB limit, then nothing more
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        reply = recv_response(s, 10.0)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload)["error"]["code"] == "request_entity_too_large"


# --- 2. slow clients cannot lock anyone out -------------------------------------------------
def test_110_slow_clients_do_not_lock_out_healthz_or_classify(live):
    socks = []
    try:
        for _ in range(110):  # each sends its request one byte at a time
            s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
            s.sendall(b"P")
            socks.append(s)
        worst = 0.0
        for step in range(3):
            for s in socks:
                s.sendall(b"OST /api/v1/classify HTTP/1.1\r\n"[step:step + 1])
            status, body, secs = live.get("/healthz", timeout=5)
            assert status == 200 and json.loads(body) == {"status": "ok"}
            worst = max(worst, secs)
            time.sleep(0.3)
        assert worst < 1.0, f"/healthz took {worst:.2f} s under 110 slow clients"
        status, answer = live.classify(jpeg_bytes((120, 90)), timeout=10)
        assert status == 200 and answer["tier_path"] == "device"
    finally:
        for s in socks:
            s.close()


def test_a_slow_sender_gets_408_and_is_closed(bundles):
    srv = Live(app_for(bundles), request_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            t0 = time.perf_counter()
            s.setblocking(False)
            reply = b""
            for ch in b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\n" * 10:
                try:
                    s.send(bytes([ch]))
                    reply += s.recv(4096)
                except BlockingIOError:
                    pass
                except OSError:
                    break
                if reply or time.perf_counter() - t0 > 6:
                    break
                time.sleep(0.1)
            s.settimeout(3)
            try:
                while chunk := s.recv(4096):
                    reply += chunk
            except OSError:
                pass
        secs = time.perf_counter() - t0
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        assert 0.9 < secs < 5.0
    finally:
        srv.close()


def test_healthz_does_not_wait_for_busy_workers(bundles):
    """One worker thread busy with large PNGs: /healthz is still answered at once."""
    srv = Live(app_for(bundles, INTERPRETERS=1), threads=1)
    big = encode(Image.fromarray(np.random.default_rng(1).integers(
        0, 256, (1500, 2000, 3), dtype=np.uint8)), "PNG", compress_level=1)
    try:
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(srv.classify(big)[0]))
                   for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.3)
        lat = [srv.get("/healthz")[2] for _ in range(5)]
        for w in workers:
            w.join(60)
        assert results == [200] * 4
        assert max(lat) < 0.25, f"/healthz latencies {lat}"
    finally:
        srv.close()


# --- 3. bounded memory for large images -----------------------------------------------------
def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@skip_unless(Path("/proc/self/status").is_file(), "needs Linux /proc")
def test_eight_large_jpegs_at_once_stay_small_in_memory(live):
    """A 24 MP phone-size JPEG is decoded at 1/8 scale for a 32-px model; eight at once
    used to cost 72 MB each."""
    w, h = 5664, 4248  # 24 MP
    small = np.asarray(Image.open(io.BytesIO(jpeg_bytes((708, 531), seed=3))))
    photo = encode(Image.fromarray(small).resize((w, h), Image.NEAREST), "JPEG", quality=70)
    del small
    assert len(photo) < 8 * 1024 * 1024
    base, peak, stop = rss_mb(), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(live.classify(photo)[0]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join()
    assert statuses == [200] * 8
    assert peak[0] - base < 100, f"RSS grew {peak[0] - base:.0f} MB for 8 large JPEGs"


def test_png_over_the_decoded_pixel_limit_is_413_but_a_big_jpeg_is_drafted(bundles):
    # the gate would keep this small photo's square at its own 300 px (edge_demo/gate.py)
    client = app_for(bundles, MAX_DECODED_PIXELS=10_000, GATE=False).test_client()
    png = encode(Image.new("RGB", (200, 200), (200, 150, 140)), "PNG")
    r = client.post("/api/v1/classify", data={"image": (io.BytesIO(png), "x.png")},
                    content_type="multipart/form-data")
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "too_many_pixels"
    assert "Send the photo as JPEG" in r.get_json()["error"]["message"]
    jpg = jpeg_bytes((400, 300))  # decoded at 1/8: 50 x 38 for the 32-px model
    r = client.post("/api/v1/classify", data={"image": (io.BytesIO(jpg), "x.jpg")},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_json()


def test_decode_budget_bounds_pixels_in_flight():
    budget = DecodeBudget(100, timeout=5)
    seen, lock = [], threading.Lock()

    def work():
        with budget.hold(60):
            with lock:
                seen.append(budget.in_use)
            time.sleep(0.05)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 6 and max(seen) == 60 and budget.in_use == 0
    with budget.hold(1000):  # larger than the budget: runs alone
        tight = DecodeBudget(10, timeout=0.1)
        with tight.hold(10), pytest.raises(RequestError) as err:
            with tight.hold(1):
                pass
    assert err.value.status == 503 and err.value.code == "busy_decoding"


def test_draft_scale_keeps_twice_the_model_size_where_it_can_else_once():
    assert draft_scale(4032, 3024, 224) == 4  # a 12 MP phone photo: 756 x 756 crop (not 378)
    assert draft_scale(8160, 6120, 224) == 8  # 50 MP: 765
    assert draft_scale(600, 450, 32) == 4  # 112 px crop: >= 2 x 32
    assert draft_scale(600, 450, 224) == 2  # 2x only in full: 1/2 keeps 225 >= 224 instead
    assert draft_scale(600, 450, 224, min_crop=1.0) == 2
    assert draft_scale(4032, 3024, 224, min_crop=1.0) == 8
    assert draft_scale(300, 250, 224) == 1  # no reduced scale keeps 224: decoded in full
    assert draft_scale(100, 100, 224) == 1


def _fast_input(data: bytes, size: int, **kw) -> np.ndarray:
    """The server's model input: open_upload (reduced-scale decode) -> Photo.model_input."""
    return open_upload(data, max_pixels=10**8, size=size, **kw).load().model_input(size)


def _pixel_diffs(photos, size, upscale=1, **kw) -> list[float]:
    out = []
    for p in photos:
        data = p.read_bytes()
        if upscale > 1:
            with Image.open(p) as im:
                data = encode(im.resize((im.width * upscale, im.height * upscale),
                                        Image.BICUBIC), "JPEG", quality=95)
        got = _fast_input(data, size, **kw).astype(np.int16)
        ref = load_image(io.BytesIO(data), size).astype(np.int16)
        out.append(float(np.abs(got - ref).mean()))
    return out


def _resave_diffs(photos, size, quality=90) -> list[float]:
    """How far re-saving each photo as JPEG (what phones and messengers do) moves the input."""
    out = []
    for p in photos:
        with Image.open(p) as im:
            again = encode(im, "JPEG", quality=quality)
        got = load_image(io.BytesIO(again), size).astype(np.int16)
        out.append(float(np.abs(got - load_image(p, size).astype(np.int16)).mean()))
    return out


@pytest.mark.shared
def test_fast_decode_stays_close_to_the_reference_on_real_photos(shared_dir):
    """Reduced-scale JPEG decoding vs dermedge.image.load_image on the real 600x450 photos at
    224 px, with the stated tolerances (benchmarks/serving.md has the figures and the answers).

    A 600x450 photo keeps 2x the model side only in full, so it is decoded at 1/2 (a 225 px
    crop): within 0.8 mean absolute difference over the photos and 1.2 for any one (measured
    0.67 and 1.01; 1.41 and 2.43 before the crop box was mapped in fractional pixels), and
    closer to the reference than re-saving the photo as JPEG quality 90 (0.90 mean). The photos
    enlarged 4x (a phone-size stand-in) keep 2x at 1/4: within 0.3 per photo (measured 0.21
    mean, 0.27 worst). With the fast path off (no model size) the input is the reference's."""
    photos = sorted((shared_dir / "data" / "ham10000_raw_600x450" / "images").glob("*.jpg"))
    assert len(photos) >= 100
    for p in photos[:10]:
        exact = decode_upload(p.read_bytes(), max_pixels=10**8)
        np.testing.assert_array_equal(tier_input(np.asarray(exact), 224), load_image(p, 224))
    up = _pixel_diffs(photos[:12], 224, upscale=4)
    assert max(up) <= 0.3, up
    half = _pixel_diffs(photos, 224)
    assert np.mean(half) <= 0.8 and max(half) <= 1.2, (np.mean(half), max(half))
    assert np.mean(half) < np.mean(_resave_diffs(photos, 224))


def tier_input(image: np.ndarray, size: int) -> np.ndarray:
    from dermedge.image import center_crop_resize

    return center_crop_resize(Image.fromarray(image), size)


@pytest.mark.shared
@pytest.mark.parametrize("orient", range(1, 9))
def test_reduced_decode_maps_the_crop_for_every_exif_orientation(shared_dir, orient):
    """A 597x451 photo (sides not divisible by the DCT scale) stored so that EXIF orientation
    ``orient`` makes it upright: the reduced-scale input stays as close to the reference as the
    upright photo's does (measured 0.53-0.55 at 1/2 for every orientation; 1.06-1.43 for the
    flipped ones when the partial edge pixel is ignored)."""
    photo = sorted((shared_dir / "data" / "ham10000_raw_600x450" / "images").glob("*.jpg"))[3]
    upright = Image.open(photo).convert("RGB").crop((0, 0, 597, 451))
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(undo[orient]) if orient in undo else upright
    exif = Image.Exif()
    exif[0x0112] = orient
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    for size, scale in ((224, 2), (100, 4)):
        upload = open_upload(data, max_pixels=10**8, size=size, min_crop=1.0)
        assert upload.scale == scale
        ref = load_image(io.BytesIO(data), size)
        assert ref.shape == (size, size, 3)
        diff = np.abs(upload.load().model_input(size).astype(np.int16) - ref).mean()
        assert diff <= 0.8, (orient, size, diff)
    # the reference itself applied the orientation: it sees the upright photo
    same = load_image(io.BytesIO(encode(upright, "JPEG", quality=95)), 224).astype(np.int16)
    assert np.abs(same - load_image(io.BytesIO(data), 224)).mean() < 1.0  # not rotated: > 10


# --- 4. MPO: the multi-picture JPEG phones write ---------------------------------------------
def test_mpo_photo_is_classified_from_its_first_image(live):
    first = Image.open(io.BytesIO(jpeg_bytes((160, 120), seed=5))).convert("RGB")
    second = Image.fromarray(255 - np.asarray(first))
    mpo = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    with Image.open(io.BytesIO(mpo)) as im:
        assert im.format == "MPO" and im.n_frames == 2
        want = np.asarray(im.convert("RGB"))
    got = np.asarray(decode_upload(mpo, max_pixels=10**6))
    assert np.array_equal(got, want)
    assert np.abs(got.astype(int) - np.asarray(second, int)).mean() > 50
    status, answer = live.classify(mpo)
    assert status == 200 and answer["tier_path"] == "device"


# --- 5. start-up errors: exit 2, one paragraph, no traceback ---------------------------------
def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_one_paragraph(err: str, *needles: str):
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("usage:", "  "))
             and not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("edge-demo: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_port_out_of_range_is_refused(port, capsys, bundles):
    code, err = run_cli(["serve", "--device", str(bundles["int8"]), "--port", port], capsys)
    assert code == 2
    assert_one_paragraph(err, "--port")


def test_port_in_use_and_foreign_host_are_one_paragraph(bundles, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = run_cli(["serve", "--device", str(bundles["int8"]), "--port", str(port)],
                            capsys)
    assert code == 2
    assert_one_paragraph(err, f"Port {port}", "already in use", "--port")
    code, err = run_cli(["serve", "--device", str(bundles["int8"]), "--host", "192.0.2.77",
                         "--port", "0"], capsys)
    assert code == 2
    assert_one_paragraph(err, "192.0.2.77", "does not belong to this machine", "--host")


def test_a_swapped_model_file_is_refused(bundles, tmp_path, capsys):
    import shutil

    bad = tmp_path / "swapped"
    shutil.copytree(bundles["int8"], bad)
    shutil.copy(bundles["float32"] / "model.tflite", bad / "model.tflite")
    with pytest.raises(BundleError, match="does not match its model_card.json"):
        Tier.from_bundle(bad)
    code, err = run_cli(["predict", "--device", str(bad), "x.jpg"], capsys)
    assert code == 2
    assert_one_paragraph(err, "sha256", "re-export")


def failed_bundle(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    card = json.loads((dest / "model_card.json").read_text())
    card["export"]["validation"] = {"passed": False, "n": 50, "failed": [
        "diagnosis_agreement = 0.8100 is below the minimum 0.9500 (short by 0.1400)"]}
    (dest / "model_card.json").write_text(json.dumps(card))
    return dest


def test_a_bundle_that_failed_validation_needs_an_explicit_option(bundles, tmp_path, capsys):
    bad = failed_bundle(bundles["int8"], tmp_path / "failed")
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes())
    code, err = run_cli(["predict", "--device", str(bad), str(img)], capsys)
    assert code == 2
    assert_one_paragraph(err, "failed its export validation", "diagnosis_agreement = 0.8100",
                         "--allow-unvalidated")
    assert main(["predict", "--device", str(bad), "--allow-unvalidated", str(img)]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["device"]["validation_passed"] is False


def test_reference_decode_gives_the_training_input_exactly(bundles):
    """`--reference-decode` turns the reduced-scale JPEG decode off: the model input is then
    dermedge.image.load_image's, bit for bit (the fast path would decode this photo at 1/4)."""
    from edge_demo.service import DemoService

    assert build_parser().parse_args(["serve", "--device", "d"]).fast_decode is True
    args = build_parser().parse_args(["serve", "--device", "d", "--reference-decode"])
    assert args.fast_decode is False
    photo = jpeg_bytes((400, 300), seed=5)
    exact = DemoService.from_paths(bundles["int8"], fast_decode=False).decode(photo, {})[32]
    np.testing.assert_array_equal(exact, load_image(io.BytesIO(photo), 32))
    fast = DemoService.from_paths(bundles["int8"], gate=False).decode(photo, {})[32]
    assert fast.shape == exact.shape and not np.array_equal(fast, exact)


def test_the_io_loop_does_not_spin_while_a_worker_sends(bundles, monkeypatch):
    """A worker sends its own response; while its send has the GIL released, waitress' I/O loop
    saw the bytes as unsent and polled again at once, over and over (3.7-4.2 loop passes per
    request with 4 clients on 2 cores, against about 2: reading the request, the trigger)."""
    from waitress import wasyncore

    passes = [0]
    poll2 = wasyncore.poll2

    def counted(*args, **kwargs):
        passes[0] += 1
        return poll2(*args, **kwargs)

    srv = Live(app_for(bundles, INTERPRETERS=2), threads=2)
    photo = jpeg_bytes((600, 450))
    errors: list[str] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        for _ in range(n):
            conn.request("POST", "/api/v1/classify", photo, {"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(str(resp.status))
        conn.close()

    try:
        client(3)
        monkeypatch.setattr(wasyncore, "poll2", counted)
        threads = [threading.Thread(target=client, args=(50,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.close()
    assert errors == []
    assert passes[0] / 200 < 3.0, f"{passes[0] / 200:.2f} I/O loop passes per request"


def test_a_response_over_the_output_watermark_reaches_a_slow_reader():
    """Over waitress' 16 MB output watermark a worker waits for the I/O loop to drain its
    buffer, so the loop must keep writing to a connection whose worker is mid-write."""
    chunk = bytes(8 * 1024 * 1024)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(4 * len(chunk)))])
        return [chunk] * 4

    server = make_server(app, host="127.0.0.1", port=0, threads=1, max_body=1024)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.0)  # not reading: the server's output buffer passes the watermark
            reply = recv_response(s)
    finally:
        server.stop()
        thread.join(10)
    assert reply.startswith(b"HTTP/1.1 200")
    assert len(reply.partition(b"\r\n\r\n")[2]) == 4 * len(chunk)


def test_one_worker_per_core_and_a_quiet_queue(bundles, caplog):
    """Workers default to the usable cores; requests that wait for a worker are not logged
    one warning each (waitress' "Task queue depth is N")."""
    from edge_demo.cli import default_threads

    n = default_threads()
    assert n >= 2 and build_parser().parse_args(["serve", "--device", "d"]).threads == n
    if hasattr(os, "sched_getaffinity"):
        assert n == max(2, len(os.sched_getaffinity(0)))
    srv = Live(app_for(bundles), threads=1)
    try:
        photo = jpeg_bytes((400, 300), seed=2)
        with caplog.at_level(logging.DEBUG, logger="waitress"):
            threads = [threading.Thread(target=srv.classify, args=(photo,)) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert srv.classify(photo)[0] == 200
        assert not [r for r in caplog.records if "Task queue depth" in r.getMessage()]
    finally:
        srv.close()


def test_help_shows_every_default_and_describes_subcommands():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name in ("serve", "predict", "calibrate"):
        assert sub[name].description, name
        text = " ".join(sub[name].format_help().split())
        for action in sub[name]._actions:
            if (action.default not in (None, False, "==SUPPRESS==") and action.help
                    and action.nargs != 0):  # a flag (--no-...) says what it changes
                assert f"(default: {action.default})" in text, (name, action.dest)
    assert "(default: 8080)" in " ".join(sub["serve"].format_help().split())


def test_urls_to_open():
    assert urls("127.0.0.1", 8080) == ["http://127.0.0.1:8080/"]
    lan = urls("0.0.0.0", 9000)
    assert lan[0] == "http://127.0.0.1:9000/"
    assert all(u.endswith(":9000/") and "127.0.0.1" not in u for u in lan[1:])


# --- 6/7. integrity, toy flag, rounding, messages --------------------------------------------
def test_predict_names_a_bad_local_file_and_carries_on(bundles, tmp_path, capsys):
    good, bad = tmp_path / "good.jpg", tmp_path / "notes.txt"
    good.write_bytes(jpeg_bytes())
    bad.write_text("not a photo")
    code = main(["predict", "--device", str(bundles["int8"]), str(bad), str(good)])
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out)["image"] == str(good)
    assert f"file {bad}" in err and "uploaded" not in err and "Traceback" not in err


def test_models_flags_synthetic_models_and_rounds_thresholds(bundles, tmp_path):
    import shutil

    toy = tmp_path / "toy"
    shutil.copytree(bundles["int8"], toy)
    card = json.loads((toy / "model_card.json").read_text())
    card["data"] = {"synthetic": True}
    card["heads"]["melanoma"]["threshold"] = 0.5000000000000091
    (toy / "model_card.json").write_text(json.dumps(card))
    client = create_app({"DEVICE_BUNDLE": str(toy), "INTERPRETERS": 1,
                         "LOG_JSON": False}).test_client()
    dev = client.get("/api/v1/models").get_json()["device"]
    assert dev["synthetic"] is True and "synthetic images" in dev["note"]
    assert dev["melanoma_threshold"] == 0.5
    assert "0.5000000000000091" not in client.get("/api/v1/models").get_data(as_text=True
                                                                             ).split('"card"')[0]


@pytest.mark.parametrize("fields", [{"age": "4" * 1_000_000},
                                    {f"f{i}": "1" for i in range(1500)}])
def test_form_parser_limits_say_so(bundles, fields):
    client = app_for(bundles).test_client()
    body, ctype = multipart(jpeg_bytes(), fields)
    r = client.post("/api/v1/classify", data=body, content_type=ctype)
    assert r.status_code == 413
    msg = r.get_json()["error"]["message"]
    assert "form parser" in msg and "10 MB" not in msg


def test_kept_photos_get_server_made_names(bundles, tmp_path):
    """A kept photo is named by its sha256: no client value (request id, file name) is part
    of the name, so a client can neither choose nor overwrite a file."""
    import hashlib

    folder = tmp_path / "cases"
    app = app_for(bundles, CASES_DIR=str(folder), KEEP_PHOTOS=True)
    client = app.test_client()
    photos = [jpeg_bytes(seed=s) for s in range(3)]
    for rid, data in zip(("same-id", "same-id", ".."), photos, strict=True):
        body, ctype = multipart(data, {"consent_keep": "1"})
        assert client.post("/api/v1/classify", data=body, content_type=ctype,
                           headers={"X-Request-ID": rid}).status_code == 200
    app.extensions["edge_demo"]["cases"].close()
    names = sorted(p.name for p in (folder / "photos").iterdir())
    assert names == sorted(hashlib.sha256(d).hexdigest() + ".jpg" for d in photos)


def test_a_truncated_model_keras_is_not_reported_as_missing(bundles, tmp_path):
    import shutil

    from export.errors import RunDirError as ExportRunDirError
    from export.rundir import Run
    from trainer.run import RunDirError, load_run

    run = tmp_path / "run"
    shutil.copytree(bundles["keras_run"], run)
    data = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="not a complete .keras file") as err:
        load_run(run)
    assert "not found" not in str(err.value)
    with pytest.raises(ExportRunDirError, match="truncated or corrupt"):
        Run(run, {}).load_model()


def test_serve_prints_the_url_to_open_and_answers_there(bundles):
    """The real `edge-demo serve` process: the printed URL answers /healthz and /readyz."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_demo", "serve", "--device", str(bundles["int8"]),
         "--port", "0"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGE_DEMO_LOG_JSON": "0"})
    try:
        url, seen, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:(\d+)/)", line)
            if m:
                url, port = m.group(1), int(m.group(2))
        assert url is not None and port > 0, "".join(seen)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for path in ("/healthz", "/readyz"):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200, (path, resp.read())
            resp.read()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stderr.close()
