"""edge_demo: the Flask API, input handling, tiers and the fallback policy (tiny bundles)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from ci import need
from demo_fixtures import SIZE, THRESHOLD, jpeg_bytes, tiny_bundles
from PIL import Image

from dermedge.image import load_image
from edge_demo.app import create_app
from edge_demo.cli import main
from edge_demo.errors import BundleError, PolicyError
from edge_demo.imaging import center_crop_resize, decode_upload
from edge_demo.policy import Policy
from edge_demo.tiers import Tier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


def make_app(bundles, **config):
    cfg = {"DEVICE_BUNDLE": str(bundles["int8"]), "CLOUD_BUNDLE": str(bundles["float32"]),
           "INTERPRETERS": 2, "LOG_JSON": False, **config}
    return create_app(cfg)


@pytest.fixture(scope="module")
def app(bundles):
    return make_app(bundles)


@pytest.fixture
def client(app):
    return app.test_client()


def post_image(client, data: bytes, filename="photo.jpg", url="/api/v1/classify"):
    return client.post(url, data={"image": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def asym_image(w=64, h=48) -> Image.Image:
    """Asymmetric content so that a wrong orientation or crop changes the pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr)


def encode(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


# --- endpoints --------------------------------------------------------------------------
def test_health_ready_and_models(client, bundles):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"
    models = client.get("/api/v1/models").get_json()
    sha = hashlib.sha256((bundles["int8"] / "model.tflite").read_bytes()).hexdigest()
    assert models["device"]["sha256"] == sha
    assert models["device"]["mode"] == "int8" and models["cloud"]["mode"] == "float32"
    assert models["device"]["card"]["heads"]["melanoma"]["threshold"] == THRESHOLD
    assert models["device"]["input"]["dtype"] == "uint8"
    assert models["policy"]["source"] == "defaults"
    assert "conservative default" in models["policy"]["note"]


def test_classify_response_shape(client, bundles):
    resp = post_image(client, jpeg_bytes())
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    dev = body["device"]
    assert list(dev["diagnosis"]) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert abs(sum(dev["diagnosis"].values()) - 1.0) < 7 / 256 + 1e-6
    assert 0.0 <= dev["melanoma"] <= 1.0
    assert dev["top"]["label"] == max(dev["diagnosis"], key=dev["diagnosis"].get)
    assert set(body["timings_ms"]) == {"decode", "gate", "device", "cloud", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["device"]
    assert body["advice"]["decision"] in ("refer", "no_action") and body["advice"]["rules_fired"]
    assert "not a diagnosis" in body["disclaimer"]
    assert body["models"]["device"]["name"] == "tiny-int8"
    assert resp.headers["X-Request-ID"] == body["request_id"]
    # The conservative defaults send the near-uniform tiny model to the cloud.
    assert body["fallback"]["used"] is True and "low_confidence" in body["fallback"]["rules_fired"]
    assert body["cloud"] is not None and body["tier_path"] == "device+cloud"


def test_cloud_endpoint_and_missing_cloud(client, bundles):
    body = post_image(client, jpeg_bytes(), url="/api/v1/cloud/classify").get_json()
    assert body["tier_path"] == "cloud" and set(body["cloud"]) >= {"melanoma", "diagnosis"}
    solo = make_app(bundles, CLOUD_BUNDLE=None).test_client()
    resp = post_image(solo, jpeg_bytes(), url="/api/v1/cloud/classify")
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "no_cloud_tier"


def test_page_is_mobile_and_self_contained(client):
    html = client.get("/").get_data(as_text=True)
    assert '<meta name="viewport"' in html
    assert 'accept="image/*"' in html and 'capture="environment"' in html
    for eid in ('id="result"', 'id="advice"', 'id="disclaimer"', 'id="preview"'):
        assert eid in html
    assert "Research tool, not a diagnosis" in html
    assert "conservative default" in html
    assert "http://" not in html and "https://" not in html  # no CDN
    with client.get("/static/app.js") as js:
        assert js.status_code == 200 and b"api/v1/classify" in js.data
    with client.get("/static/style.css") as css:
        assert css.status_code == 200


# --- bad input --------------------------------------------------------------------------
def _error(resp, status, code, *words):
    assert resp.status_code == status, resp.get_data(as_text=True)
    err = resp.get_json()["error"]
    assert err["code"] == code
    for w in words:
        assert w.lower() in err["message"].lower(), err["message"]
    return err


def test_empty_body_and_missing_field(client):
    _error(client.post("/api/v1/classify"), 400, "empty_body", "empty", "image")
    resp = client.post("/api/v1/classify", data={"photo": (io.BytesIO(b"x"), "a.jpg")},
                       content_type="multipart/form-data")
    _error(resp, 400, "missing_image", "'image'", "photo")
    _error(post_image(client, b""), 400, "empty_file", "empty")
    resp = client.post("/api/v1/classify", json={"image": "abc"})
    _error(resp, 415, "unsupported_media_type", "multipart/form-data", "application/json")


def post_raw(client, data: bytes, ctype="image/jpeg", url="/api/v1/classify", query=""):
    return client.post(url + query, data=data, content_type=ctype)


def _answer(body):
    return {t: body.get(t) and {k: body[t][k] for k in ("diagnosis", "melanoma", "top")}
            for t in ("device", "cloud")}


@pytest.mark.parametrize("ctype", ["image/jpeg", "application/octet-stream", "image/png"])
def test_photo_as_the_whole_body_answers_like_multipart(client, ctype):
    """The photo as the body (fetch(url, {body: file}), curl --data-binary): same answer as
    the multipart field; the declared type picks the form, the bytes are sniffed."""
    photo = jpeg_bytes()
    want = _answer(post_image(client, photo).get_json())
    for url in ("/api/v1/classify", "/api/v1/cloud/classify"):
        resp = post_raw(client, photo, ctype, url)
        assert resp.status_code == 200, resp.get_json()
        got = _answer(resp.get_json())
        if url == "/api/v1/classify":
            assert got == want
        else:
            assert got["cloud"] == want["cloud"]


def test_photo_as_the_body_errors_name_both_forms(client):
    _error(post_raw(client, b""), 400, "empty_body", "empty", "image/jpeg", "'image'")
    _error(post_raw(client, b"hello, not an image" * 10, "application/octet-stream"), 400,
           "not_an_image", "not an image")
    _error(post_raw(client, encode(asym_image(), "GIF"), "image/gif"), 415, "unsupported_format",
           "GIF")
    err = _error(client.post("/api/v1/classify", data="x", content_type="text/plain"), 415,
                 "unsupported_media_type", "text/plain", "multipart/form-data", "image/jpeg")
    assert "body" in err["message"]


def test_non_image_and_truncated(client):
    _error(post_image(client, b"hello, this is not an image" * 10), 400, "not_an_image",
           "not an image")
    data = jpeg_bytes((256, 192))
    _error(post_image(client, data[: len(data) // 2]), 400, "corrupt_image", "truncated")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_unsupported_formats(client, fmt):
    data = encode(asym_image(), fmt)
    _error(post_image(client, data, f"x.{fmt.lower()}"), 415, "unsupported_format", fmt,
           "JPEG, PNG, WebP")


def test_upload_too_large_is_json_413(bundles):
    small = make_app(bundles, MAX_CONTENT_LENGTH=20_000).test_client()
    big = encode(Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)), "PNG")
    assert len(big) > 20_000
    _error(post_image(small, big, "big.png"), 413, "request_entity_too_large", "20,000 bytes")
    _error(post_raw(small, big, "image/png"), 413, "request_entity_too_large", "20,000 bytes")


def test_decompression_bomb_and_pixel_limit(client, bundles):
    _error(post_image(client, png_declaring(100_000, 100_000), "bomb.png"), 413,
           "too_many_pixels", "decompression")
    _error(post_image(client, png_declaring(9000, 6000), "big.png"), 413, "too_many_pixels",
           "9000x6000", "50,000,000")
    tight = make_app(bundles, MAX_PIXELS=1000).test_client()
    _error(post_image(tight, jpeg_bytes((64, 48))), 413, "too_many_pixels", "64x48")


def test_404_405_are_json(client):
    _error(client.get("/api/v1/nope"), 404, "not_found", "no such endpoint")
    resp = client.get("/api/v1/classify")
    _error(resp, 405, "method_not_allowed", "post")
    assert "POST" in resp.headers["Allow"]


def test_internal_error_is_json_500(bundles, monkeypatch):
    app = make_app(bundles)
    svc = app.extensions["edge_demo"]["service"]

    def boom(data):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(svc.device, "predict", lambda image: boom(image))
    resp = post_image(app.test_client(), jpeg_bytes())
    err = _error(resp, 500, "internal_error", "request_id")
    assert "simulated" not in err["message"]
    assert app.test_client().get("/healthz").status_code == 200


# --- image handling ---------------------------------------------------------------------
def test_exif_rotated_jpeg_matches_upright(client):
    upright = asym_image(64, 48)
    kw = {"quality": 100, "subsampling": 0}
    up_bytes = encode(upright, "JPEG", **kw)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rot_bytes = encode(stored, "JPEG", exif=exif, **kw)
    a = np.asarray(decode_upload(up_bytes, max_pixels=10**6), np.int16)
    b = np.asarray(decode_upload(rot_bytes, max_pixels=10**6), np.int16)
    assert a.shape == b.shape == (48, 64, 3)
    assert np.abs(a - b).mean() < 2.0
    raw = np.asarray(Image.open(io.BytesIO(rot_bytes)).convert("RGB"))
    assert raw.shape == (64, 48, 3)  # without EXIF handling the photo would lie on its side
    r1 = post_image(client, up_bytes).get_json()["device"]
    r2 = post_image(client, rot_bytes).get_json()["device"]
    assert abs(r1["melanoma"] - r2["melanoma"]) <= 2 / 256
    for k in r1["diagnosis"]:
        assert abs(r1["diagnosis"][k] - r2["diagnosis"][k]) <= 2 / 256


@pytest.mark.parametrize("orient", [1, 3, 6])
def test_upright_without_a_copy_has_the_same_pixels(orient):
    """The server's decode skips exif_transpose's full-size copy for upright photos; the pixels
    are the reference's either way."""
    from dermedge.image import upright_rgb8

    exif = Image.Exif()
    exif[0x0112] = orient
    data = encode(asym_image(64, 48), "JPEG", exif=exif)
    ref = upright_rgb8(Image.open(io.BytesIO(data)))
    im = Image.open(io.BytesIO(data))
    im.load()
    fast = upright_rgb8(im, copy=False)
    assert (fast is im) == (orient == 1)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(ref))


def test_reuse_image_memory_leaves_pillow_env_settings_alone():
    from edge_demo.imaging import IMAGE_BLOCK_SIZE, IMAGE_BLOCKS_KEPT, reuse_image_memory

    before = Image.core.get_block_size(), Image.core.get_blocks_max()
    try:
        Image.core.set_block_size(4 << 20)
        Image.core.set_blocks_max(0)
        reuse_image_memory({"PILLOW_BLOCKS_MAX": "0"})
        assert (Image.core.get_block_size(), Image.core.get_blocks_max()) == (IMAGE_BLOCK_SIZE, 0)
        reuse_image_memory({})
        assert Image.core.get_blocks_max() == IMAGE_BLOCKS_KEPT
        assert IMAGE_BLOCK_SIZE * IMAGE_BLOCKS_KEPT <= 32 << 20  # what may stay held
    finally:
        Image.core.set_block_size(before[0])
        Image.core.set_blocks_max(before[1])


@pytest.mark.parametrize("case", ["L", "RGBA", "P", "CMYK", "I;16", "WEBP"])
def test_odd_modes_are_accepted(client, case):
    im = asym_image()
    if case == "CMYK":
        data, name = encode(im.convert("CMYK"), "JPEG"), "c.jpg"
    elif case == "I;16":
        arr16 = (np.asarray(im.convert("L"), np.uint16) * 257).astype(np.uint16)
        data, name = encode(Image.fromarray(arr16), "PNG"), "g16.png"
        decoded = np.asarray(decode_upload(data, max_pixels=10**6))
        np.testing.assert_array_equal(decoded[..., 0], np.asarray(im.convert("L")))
    elif case == "WEBP":
        data, name = encode(im, "WEBP", lossless=True), "w.webp"
    else:
        data, name = encode(im.convert(case), "PNG"), "m.png"
    resp = post_image(client, data, name)
    assert resp.status_code == 200, resp.get_json()
    assert decode_upload(data, max_pixels=10**6).mode == "RGB"


def test_upload_decode_then_crop_equals_load_image_of_the_file(tmp_path):
    """The server's path (bytes -> decode_upload -> center_crop_resize) gives the pixels of
    the reference file path training uses (dermedge.image.load_image)."""
    cases = {"wide.png": encode(asym_image(67, 45)), "tall.jpg": encode(asym_image(31, 70),
             "JPEG"), "grey16.png": encode(Image.fromarray(
                 np.arange(50 * 40, dtype=np.uint16).reshape(40, 50) * 31))}
    exif = Image.Exif()
    exif[0x0112] = 8
    cases["exif.jpg"] = encode(asym_image(64, 48), "JPEG", exif=exif)
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        for size in (SIZE, 224):
            ours = center_crop_resize(decode_upload(data, max_pixels=10**7), size)
            np.testing.assert_array_equal(ours, load_image(p, size), err_msg=name)


@pytest.mark.shared
def test_upload_decode_then_crop_equals_load_image_on_a_real_photo(shared_dir):
    photo = sorted((shared_dir / "data/ham10000_raw_600x450/images").glob("*.jpg"))[0]
    ours = center_crop_resize(decode_upload(photo.read_bytes(), max_pixels=10**7), 224)
    np.testing.assert_array_equal(ours, load_image(photo, 224))


# --- tiers ------------------------------------------------------------------------------
def test_int8_tier_matches_float_reference(bundles):
    q, f = Tier.from_bundle(bundles["int8"]), Tier.from_bundle(bundles["int8_reference"])
    assert q.input.dtype == np.uint8 and q.outputs["diagnosis"].quantized
    for seed in range(4):
        im = decode_upload(jpeg_bytes((80, 60), seed=seed), max_pixels=10**6)
        a, b = q.predict(q.prepare(im)), f.predict(f.prepare(im))
        assert abs(a["melanoma"] - b["melanoma"]) < 0.03
        assert max(abs(a["diagnosis"][k] - b["diagnosis"][k]) for k in a["diagnosis"]) < 0.03
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        q.predict(np.zeros((16, 16, 3), np.uint8))


def test_tier_is_thread_safe(bundles):
    from concurrent.futures import ThreadPoolExecutor

    tier = Tier.from_bundle(bundles["int8"], pool_size=3)
    images = [tier.prepare(decode_upload(jpeg_bytes(seed=s), max_pixels=10**6))
              for s in range(6)]
    expected = [tier.predict(x)["diagnosis"] for x in images]
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda i: tier.predict(images[i % 6])["diagnosis"], range(60)))
    assert all(g == expected[i % 6] for i, g in enumerate(got))


def test_bad_bundles_fail_at_start(bundles, tmp_path, capsys):
    with pytest.raises(BundleError, match="Bundle folder not found.*nowhere"):
        make_app(bundles, DEVICE_BUNDLE=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no model_card.json"):
        make_app(bundles, DEVICE_BUNDLE=str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    card = json.loads((bundles["int8"] / "model_card.json").read_text())
    del card["export"]["sha256"]  # else the sha256 check refuses it first (tested elsewhere)
    (broken / "model_card.json").write_text(json.dumps(card))
    (broken / "model.tflite").write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(BundleError, match="LiteRT cannot load"):
        make_app(bundles, CLOUD_BUNDLE=str(broken))
    mism = tmp_path / "mism"
    mism.mkdir()
    (mism / "model.tflite").write_bytes((bundles["int8"] / "model.tflite").read_bytes())
    card = json.loads((bundles["int8"] / "model_card.json").read_text())
    card["heads"]["diagnosis"]["labels"] = ["a", "b"]
    (mism / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="labels"):
        Tier.from_bundle(mism)
    rc = main(["serve", "--device", str(tmp_path / "nowhere"), "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Bundle folder not found" in err and "Traceback" not in err


# --- policy -----------------------------------------------------------------------------
def _write_policy(tmp_path, **kw) -> Path:
    return Policy(**kw).save(tmp_path / "policy.json")


NO_FALLBACK = {"min_confidence": 0.0, "mel_band_low": None, "mel_band_high": None,
               "second_opinion": False}


@pytest.mark.parametrize("kw, fired", [
    ({**NO_FALLBACK, "min_confidence": 1.0}, ["low_confidence"]),
    ({**NO_FALLBACK, "mel_band_low": 0.0, "mel_band_high": 1.0}, ["melanoma_uncertain"]),
    ({**NO_FALLBACK, "second_opinion": True, "second_opinion_above": 0.0}, ["second_opinion"]),
    (NO_FALLBACK, []),
])
def test_fallback_rules_fire_as_configured(bundles, tmp_path, kw, fired):
    client = make_app(bundles, POLICY_FILE=str(_write_policy(tmp_path, **kw))).test_client()
    body = post_image(client, jpeg_bytes()).get_json()
    assert body["fallback"]["rules_fired"] == fired
    assert body["fallback"]["used"] is bool(fired)
    assert (body["cloud"] is not None) is bool(fired)
    assert body["tier_path"] == ("device+cloud" if fired else "device")
    assert body["models"]["policy"] == "file:policy.json"
    for check in body["fallback"]["checks"]:
        assert {"id", "fired", "value", "threshold", "op", "text"} <= set(check)


@pytest.mark.parametrize("kw, decision, fired", [
    ({"min_confidence": 1.0, "cloud_min_confidence": 1.0, "refer_threshold": 1.0,
      "malignant_min_prob": 1.0}, "refer", ["cloud_unsure"]),
    ({"min_confidence": 1.0, "cloud_min_confidence": 0.0, "refer_threshold": 0.0,
      "malignant_min_prob": 1.0}, "refer", ["melanoma_risk"]),
    ({"min_confidence": 1.0, "cloud_min_confidence": 0.0, "refer_threshold": 1.0,
      "malignant_classes": ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"),
      "malignant_min_prob": 0.0}, "refer", ["malignant_top"]),
    ({"min_confidence": 1.0, "cloud_min_confidence": 0.0, "refer_threshold": 1.0,
      "malignant_min_prob": 1.0}, "no_action", ["no_referral_rule"]),
])
def test_advice_rules_fire_as_configured(bundles, tmp_path, kw, decision, fired):
    kw = {**NO_FALLBACK, **kw}
    client = make_app(bundles, POLICY_FILE=str(_write_policy(tmp_path, **kw))).test_client()
    body = post_image(client, jpeg_bytes()).get_json()
    assert body["advice"]["decision"] == decision
    assert body["advice"]["rules_fired"] == fired
    assert body["advice"]["decided_by"] == "cloud"
    expected = "Refer to a dermatologist" if decision == "refer" else "No action suggested"
    assert body["advice"]["message"].startswith(expected)


def test_fallback_without_cloud_refers(bundles, tmp_path):
    pol = _write_policy(tmp_path, **{**NO_FALLBACK, "min_confidence": 1.0,
                                     "refer_threshold": 1.0, "malignant_min_prob": 1.0})
    client = make_app(bundles, CLOUD_BUNDLE=None, POLICY_FILE=str(pol)).test_client()
    body = post_image(client, jpeg_bytes()).get_json()
    assert body["fallback"] == {**body["fallback"], "used": False, "wanted": True}
    assert "No cloud tier is configured" in body["fallback"]["reason"]
    assert body["advice"]["rules_fired"] == ["fallback_unavailable"]
    assert body["advice"]["decision"] == "refer"


def test_policy_unit_rules_and_thresholds():
    dev = {"melanoma": 0.4, "top": {"label": "nv", "probability": 0.9},
           "diagnosis": {"nv": 0.9}}
    p = Policy(min_confidence=0.5, mel_band_low=0.3, mel_band_high=0.5, second_opinion=True,
               second_opinion_above=0.6, refer_threshold=None)
    d = p.decide(dev, None, device_threshold=0.35)
    assert d.fallback_rules == ["melanoma_uncertain"]
    assert d.advice_rules == ["fallback_unavailable", "melanoma_risk"]
    cloud = {"melanoma": 0.2, "top": {"label": "nv", "probability": 0.8}, "diagnosis": {}}
    d = p.decide(dev, cloud, device_threshold=0.35, cloud_threshold=0.25)
    assert d.decision == "no_action" and d.decided_by == "cloud"
    mel = next(c for c in d.advice_checks if c.id == "melanoma_risk")
    assert mel.threshold == 0.25 and mel.value == 0.2  # the cloud card's threshold
    d = p.decide({**dev, "melanoma": 0.7}, None, device_threshold=0.35)
    assert d.fallback_rules == ["second_opinion"]


def test_policy_file_roundtrip_and_errors(tmp_path):
    p = Policy(min_confidence=0.42, coverage=({"fallback_rate": 0.1},),
               provenance={"by": "test"})
    loaded = Policy.load(p.save(tmp_path / "p.json"))
    assert loaded == Policy(min_confidence=0.42, coverage=({"fallback_rate": 0.1},),
                            source="file:p.json")
    assert loaded.provenance == {"by": "test"}
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["version"] == 2 and doc["policy"]["min_confidence"] == 0.42
    assert doc["gate"] == {} and doc["temperature"] == {}
    v1 = {"version": 1, "policy": doc["policy"]}  # a version-1 file reads with neither section
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert Policy.load(tmp_path / "v1.json") == dataclasses.replace(
        loaded, source="file:v1.json", coverage=())
    sections = Policy(gate={"blur_min": 40}, temperature={"device": {"melanoma": 1.25}})
    again = Policy.load(sections.save(tmp_path / "s.json"))
    assert again.gate == {"blur_min": 40.0} and again.temperature_of("device", "melanoma") == 1.25
    assert again.temperature_of("cloud", "diagnosis") == 1.0
    assert again.sha256 == sections.sha256 != loaded.sha256
    assert Policy(min_confidence=0.42).sha256 == loaded.sha256  # source/coverage: not identity
    for bad in ({"version": 3, "policy": {}}, {"version": 2, "policy": {}, "gate": [1]},
                {"version": 2, "policy": {}, "temperature": {"device": {"melanoma": 0}}}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(PolicyError, match="version|gate|temperature"):
            Policy.load(tmp_path / "bad.json")
    doc["policy"]["min_confidense"] = doc["policy"].pop("min_confidence")
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match="Did you mean 'min_confidence'"):
        Policy.load(tmp_path / "bad.json")
    with pytest.raises(PolicyError, match=r"\[0, 1\]"):
        Policy(min_confidence=1.5)
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(tmp_path / "missing.json")


# --- operations -------------------------------------------------------------------------
def test_request_log_is_structured_without_image_data(bundles):
    app = make_app(bundles, LOG_JSON=True)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger("edge_demo.request").addHandler(handler)
    try:
        data = jpeg_bytes()
        post_image(app.test_client(), data)
        app.test_client().get("/healthz")
    finally:
        logging.getLogger("edge_demo.request").removeHandler(handler)
    rec = json.loads(records[0])
    assert {"method", "path", "status", "ms", "request_id", "tier_path"} <= set(rec)
    assert rec["path"] == "/api/v1/classify" and rec["status"] == 200
    assert rec["tier_path"] == "device+cloud"
    assert all(len(r) < 400 for r in records)


def test_nothing_is_written_without_a_case_log(bundles, tmp_path, monkeypatch):
    app = make_app(bundles)
    assert app.config["CASES_DIR"] is None and app.config["KEEP_PHOTOS"] is False
    monkeypatch.chdir(tmp_path)
    body = post_image(app.test_client(), jpeg_bytes()).get_json()
    assert body["case"]["logged"] is False
    assert list(tmp_path.iterdir()) == []


def test_env_config(bundles, monkeypatch):
    monkeypatch.setenv("EDGE_DEMO_DEVICE_BUNDLE", str(bundles["int8"]))
    monkeypatch.setenv("EDGE_DEMO_MAX_PIXELS", "1234")
    monkeypatch.setenv("EDGE_DEMO_LOG_JSON", "0")
    app = create_app({"INTERPRETERS": 1})
    assert app.config["MAX_PIXELS"] == 1234 and app.config["LOG_JSON"] is False
    assert app.extensions["edge_demo"]["service"].cloud is None


def test_cli_predict_prints_json(bundles, tmp_path, capsys):
    img = tmp_path / "x.jpg"
    img.write_bytes(jpeg_bytes())
    assert main(["predict", "--device", str(bundles["int8"]), str(img)]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["image"] == str(img) and body["tier_path"] == "device"
    assert main(["predict", "--device", str(bundles["int8"]), str(tmp_path / "no.jpg")]) == 1


def test_edge_demo_never_imports_tensorflow(bundles):
    code = (
        "import sys, io\n"
        "from edge_demo.app import create_app\n"
        f"app = create_app({{'DEVICE_BUNDLE': {str(bundles['int8'])!r},"
        f" 'CLOUD_BUNDLE': {str(bundles['float32'])!r}, 'LOG_JSON': False}})\n"
        "from PIL import Image\n"
        "buf = io.BytesIO(); Image.new('RGB', (40, 30), (200, 120, 90)).save(buf, 'JPEG')\n"
        "r = app.test_client().post('/api/v1/classify', data={'image': (io.BytesIO("
        "buf.getvalue()), 'a.jpg')}, content_type='multipart/form-data')\n"
        "assert r.status_code == 200, r.get_data()\n"
        "bad = [m for m in ('tensorflow', 'keras', 'trainer', 'export', 'tf_keras')"
        " if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout


def test_keras_run_dir_as_cloud_tier(bundles):
    """Optional: the cloud tier may be a run directory's model.keras when TF is installed."""
    need("keras", "the train extra installs it")
    client = make_app(bundles, CLOUD_BUNDLE=str(bundles["keras_run"])).test_client()
    assert client.get("/api/v1/models").get_json()["cloud"]["mode"] == "keras"
    keras_body = post_image(client, jpeg_bytes(), url="/api/v1/cloud/classify").get_json()
    lite_body = post_image(make_app(bundles).test_client(), jpeg_bytes(),
                           url="/api/v1/cloud/classify").get_json()
    a, b = keras_body["cloud"], lite_body["cloud"]  # same model: Keras vs float32 TFLite
    assert abs(a["melanoma"] - b["melanoma"]) < 1e-4
    assert max(abs(a["diagnosis"][k] - b["diagnosis"][k]) for k in a["diagnosis"]) < 1e-4


def test_a_bundle_that_failed_validation_is_flagged(tmp_path, caplog):
    """Served for comparison, but the start-up log and every summary say it failed."""
    import shutil

    src = tiny_bundles()["int8"]
    assert Tier.from_bundle(src).summary()["validation_passed"] is None  # never validated
    bad = tmp_path / "failed-int8"
    shutil.copytree(src, bad)
    card = json.loads((bad / "model_card.json").read_text())
    card["export"]["validation"] = {"passed": False, "n": 50, "failed": ["diagnosis_agreement"]}
    (bad / "model_card.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING, logger="edge_demo"):
        tier = Tier.from_bundle(bad)
    assert tier.summary()["validation_passed"] is False
    assert "failed its export validation" in caplog.text and str(bad) in caplog.text
