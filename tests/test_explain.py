"""Grad-CAM (trainer.explain): heatmaps, ``trainer explain``, the evaluate gallery, the demo.

The corner model is a tiny_cnn trained for a few seconds on 64 px images where class ``mel``
has a bright square near the top-left corner and ``nv`` has none: its heatmaps must peak there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from ci import need
from PIL import Image

keras = need("keras", "the train extra installs it: pip install -e '.[train,demo,dev]'")

from demo_fixtures import jpeg_bytes, tiny_bundles  # noqa: E402
from export_fixtures import card_for, train_quickly  # noqa: E402

from dermedge.labels import DIAGNOSIS_LABELS  # noqa: E402
from trainer.backbones import REGISTRY, get_backbone  # noqa: E402
from trainer.cli import main as trainer_main  # noqa: E402
from trainer.errors import DermedgeError  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.explain import (  # noqa: E402
    INDEX_COLUMNS,
    GradCAM,
    crop_box,
    heatmap_on_photo,
    pick_gallery,
)
from trainer.model import backbone_submodel, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S = 64
MEL, NV = DIAGNOSIS_LABELS.index("mel"), DIAGNOSIS_LABELS.index("nv")


def corner_images(n: int, patch: bool, seed: int, size: tuple[int, int] = (S, S),
                  offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Noisy skin-ish images; with ``patch`` a bright 14 px square near the top-left corner of
    the square at ``offset`` (x, y)."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = rng.uniform(90, 170, (n, 1, 1, 3)) + rng.normal(0, 18, (n, h, w, 3))
    if patch:
        for i in range(n):
            oy, ox = rng.integers(2, 9, 2)
            x[i, offset[1] + oy:offset[1] + oy + 14, offset[0] + ox:offset[0] + ox + 14] = 245
    return np.clip(x, 0, 255).astype(np.uint8)


def _save_images(folder: Path, arrays: np.ndarray, prefix: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        p = folder / f"ISIC_{prefix}_{i:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p.resolve()))
    return paths


@pytest.fixture(scope="module")
def corner(tmp_path_factory):
    """The trained corner model, its run directory (val split: 8 mel + 8 nv) and test images."""
    root = tmp_path_factory.mktemp("corner")
    xa, xb = corner_images(32, True, 0), corner_images(32, False, 1)
    keras.utils.set_random_seed(0)
    model = build_model("tiny_cnn", input_size=S, weights=None, dropout=0.0)
    for layer in backbone_submodel(model).layers:  # moving BN statistics settle in few steps
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    train_quickly(model, np.concatenate([xa, xb]), ["mel"] * 32 + ["nv"] * 32, epochs=12)
    ta, tb = corner_images(8, True, 5), corner_images(8, False, 6)

    run = root / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "model_card.json").write_text(json.dumps(card_for("corner", "tiny_cnn", S)))
    (run / "labels.txt").write_text("\n".join(DIAGNOSIS_LABELS) + "\n")
    rows = []
    for split, arrays, dx in (("train", xa[:4], "mel"), ("train", xb[:4], "nv"),
                              ("val", ta, "mel"), ("val", tb, "nv")):
        for p in _save_images(root / "images", arrays, f"{split}_{dx}"):
            rows.append({"image_id": Path(p).stem, "lesion_id": "L_" + Path(p).stem, "dx": dx,
                         "melanoma": int(dx == "mel"), "path": p, "split": split})
    pd.DataFrame(rows).to_csv(run / "splits.csv", index=False)
    return SimpleNamespace(model=model, run=run, root=root, patch=ta, plain=tb,
                           gradcam=GradCAM(model, DIAGNOSIS_LABELS, backbone="tiny_cnn"))


# --- Grad-CAM ---------------------------------------------------------------------------


def test_heatmap_peaks_on_the_corner_patch(corner):
    for head, cls in (("diagnosis", "mel"), ("melanoma", None)):
        e = corner.gradcam(corner.patch, head, cls)
        assert (e.probabilities > 0.5).mean() >= 0.75, e.probabilities  # the model learned it
        h = S // 2
        for cam in e.cams:
            y, x = np.unravel_index(cam.argmax(), cam.shape)
            assert y < h and x < h, (head, y, x)
        # share of the heatmap's mass per quadrant (TL, TR, BL, BR); chance would be 0.25 each
        quads = np.stack([e.cams[:, :h, :h], e.cams[:, :h, h:], e.cams[:, h:, :h],
                          e.cams[:, h:, h:]], 1).sum(axis=(2, 3))
        share = quads / quads.sum(axis=1, keepdims=True)
        assert (share.argmax(axis=1) == 0).all(), (head, share)
        assert share[:, 0].mean() > 0.6, (head, share)


def test_heatmap_shape_range_and_classes(corner):
    mel = corner.gradcam(corner.patch, "diagnosis", "mel")
    nv = corner.gradcam(corner.patch, "diagnosis", "nv")
    for e in (mel, nv):
        assert e.cams.shape == (len(corner.patch), S, S) and e.cams.dtype == np.float32
        assert np.isfinite(e.cams).all()
        assert e.cams.min() >= 0.0 and e.cams.max() <= 1.0
    assert (mel.cams.std(axis=(1, 2)) > 0.05).all()  # non-constant
    assert np.abs(mel.cams - nv.cams).mean(axis=(1, 2)).min() > 0.1  # class-specific
    assert mel.classes == ["mel"] * 8 and nv.classes == ["nv"] * 8
    # the probabilities are the model's own outputs
    out = corner.model.predict_on_batch(corner.patch.astype(np.float32))
    np.testing.assert_allclose(mel.probabilities, out["diagnosis"][:, MEL], atol=1e-5)
    np.testing.assert_allclose(nv.probabilities, out["diagnosis"][:, NV], atol=1e-5)
    mela = corner.gradcam(corner.patch, "melanoma")
    np.testing.assert_allclose(mela.probabilities, out["melanoma"][:, 0], atol=1e-5)
    # default target: each image's predicted class
    both = np.concatenate([corner.patch, corner.plain])
    auto = corner.gradcam(both)
    pred = [DIAGNOSIS_LABELS[i] for i in corner.model.predict_on_batch(
        both.astype(np.float32))["diagnosis"].argmax(axis=1)]
    assert auto.classes == pred == auto.predicted


def test_batches_do_not_mix_images(corner):
    both = np.concatenate([corner.patch, corner.plain])
    whole = corner.gradcam(both, "diagnosis", "mel", batch_size=32).cams
    small = corner.gradcam(both, "diagnosis", "mel", batch_size=3).cams
    np.testing.assert_allclose(small, whole, atol=1e-5)


def test_layer_override_and_errors(corner):
    g = GradCAM(corner.model, DIAGNOSIS_LABELS, backbone="tiny_cnn", layer="block3_relu")
    e = g(corner.patch[:2], "diagnosis", "mel")
    assert g.layer == "block3_relu" and e.cams.shape == (2, S, S)
    assert not np.allclose(e.cams, corner.gradcam(corner.patch[:2], "diagnosis", "mel").cams)
    with pytest.raises(DermedgeError, match="Did you mean 'block3_relu'"):
        GradCAM(corner.model, DIAGNOSIS_LABELS, backbone="tiny_cnn", layer="block3_rleu")
    with pytest.raises(DermedgeError, match="Did you mean 'melanoma'"):
        corner.gradcam(corner.patch[:1], "melanom")
    with pytest.raises(DermedgeError, match="Did you mean 'mel'.*akiec, bcc"):
        corner.gradcam(corner.patch[:1], "diagnosis", "mell")
    with pytest.raises(DermedgeError, match="one output"):
        corner.gradcam(corner.patch[:1], "melanoma", "nv")
    with pytest.raises(DermedgeError, match=r"\(N, 64, 64, 3\).*received \(2, 32, 32, 3\)"):
        corner.gradcam(np.zeros((2, 32, 32, 3), np.uint8))


FAST_BACKBONES = ["tiny_cnn", "mobilenet_v2", "efficientnet_lite0"]


@pytest.mark.parametrize("name", [
    *FAST_BACKBONES,
    *[pytest.param(n, marks=pytest.mark.slow) for n in sorted(REGISTRY)
      if n not in FAST_BACKBONES]])
def test_every_backbone_default_layer_is_its_last_feature_map(name):
    spec = get_backbone(name)
    size = max(spec.min_size, 64)  # >= 2x2 feature maps where the backbone allows
    keras.utils.set_random_seed(0)
    model = build_model(name, input_size=size, weights=None)
    bb = backbone_submodel(model)
    assert bb.get_layer(spec.last_conv_layer).output.shape == bb.output.shape
    g = GradCAM(model, DIAGNOSIS_LABELS, backbone=name)
    assert g.layer == spec.last_conv_layer
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.uint8)
    e = g(x, "melanoma")
    assert e.cams.shape == (2, size, size) and np.isfinite(e.cams).all()
    out = model.predict_on_batch(x.astype(np.float32))
    np.testing.assert_allclose(e.probabilities, out["melanoma"][:, 0], atol=1e-5)


def test_heatmap_maps_back_onto_the_photo_crop(corner):
    # A landscape photo: the model sees the centred 64x64 square (x from 16 to 80).
    photo = corner_images(1, True, 9, size=(96, 64), offset=(16, 0))[0]
    left, top, side = crop_box(96, 64)
    assert (left, top, side) == (16, 0, 64)
    crop = photo[top:top + side, left:left + side]
    cam = corner.gradcam(crop[None], "diagnosis", "mel").cams[0]
    full, picture = heatmap_on_photo(Image.fromarray(photo), cam)
    assert full.shape == (64, 96) and picture.shape == (64, 96, 3)
    np.testing.assert_allclose(full[:, left:left + side], cam, atol=1e-6)
    assert not full[:, :left].any() and not full[:, left + side:].any()
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert y < 32 and left <= x < left + 32
    # outside the crop: the photo, dimmed; inside: blended
    np.testing.assert_allclose(picture[:, :left], photo[:, :left] * 0.35, atol=0.51)
    assert not np.array_equal(picture[:, left:left + side], photo[:, left:left + side])
    # scaled down for a phone: same geometry at half size
    full2, picture2 = heatmap_on_photo(Image.fromarray(photo), cam, max_side=48)
    assert picture2.shape == (32, 48, 3) and not full2[:, :8].any() and full2[:, 8:40].any()


def test_photo_and_crop_box_reproduce_load_image(tmp_path):
    """The overlay's geometry is the model's: EXIF-upright photo, crop_box, then resize."""
    from trainer.data import load_image
    from trainer.explain import open_photo

    arr = corner_images(1, True, 3, size=(96, 64))[0]
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    photo = open_photo(path)
    assert photo.size == (64, 96)  # upright: portrait
    left, top, side = crop_box(*photo.size)
    assert (left, top, side) == (0, 16, 64)
    crop = photo.crop((left, top, left + side, top + side)).resize(
        (32, 32), Image.BILINEAR, reducing_gap=None)
    np.testing.assert_array_equal(np.asarray(crop), load_image(path, 32))


# --- trainer explain --------------------------------------------------------------------


def _cli(capsys, argv):
    code = trainer_main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _photos(corner, tmp_path) -> list[Path]:
    a = tmp_path / "photos" / "lesion_a.jpg"
    a.parent.mkdir()
    photo = corner_images(1, False, 11, size=(96, 64))[0]
    photo[:, 16:80] = corner.patch[2]  # a confidently 'mel' crop inside a landscape photo
    Image.fromarray(photo).save(a, quality=95)
    b = tmp_path / "photos" / "lesion_b.png"
    Image.fromarray(corner.plain[0]).save(b)
    return [a, b]


def test_cli_explain_writes_overlays_and_index(corner, tmp_path, capsys):
    photos = _photos(corner, tmp_path)
    out = tmp_path / "cams"
    code, stdout, err = _cli(capsys, ["explain", str(corner.run), *map(str, photos),
                                      "--out", str(out)])
    assert code == 0, err
    assert "2 heatmaps (layer block4_relu)" in stdout
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert index["png"].tolist() == ["lesion_a.diagnosis.png", "lesion_b.diagnosis.png"]
    assert (index["class"] == index["predicted"]).all()
    assert index.loc[0, "class"] == "mel" and index.loc[0, "crop_left"] == 16
    with Image.open(out / "lesion_a.diagnosis.png") as im:
        assert im.size == (96, 64) and im.mode == "RGB"  # the photo's size, not the model's
    with Image.open(out / "lesion_b.diagnosis.png") as im:
        assert im.size == (S, S)

    # another head / class replaces the folder (a previous explain output)
    code, _, err = _cli(capsys, ["explain", str(corner.run), str(photos[0]), "--out", str(out),
                                 "--class", "nv", "--max-side", "48"])
    assert code == 0, err
    index = pd.read_csv(out / "index.csv")
    assert index["class"].tolist() == ["nv"] and index.loc[0, "predicted"] == "mel"
    assert sorted(p.name for p in out.iterdir()) == ["index.csv", "lesion_a.diagnosis.png"]
    with Image.open(out / "lesion_a.diagnosis.png") as im:
        assert im.size == (48, 32)
    code, _, err = _cli(capsys, ["explain", str(corner.run), str(photos[0]), "--out", str(out),
                                 "--head", "melanoma"])
    assert code == 0, err
    row = pd.read_csv(out / "index.csv").iloc[0]
    assert row["head"] == "melanoma" and row["class"] == "melanoma" and row["probability"] > 0.5


def test_cli_explain_errors_leave_no_output(corner, tmp_path, capsys):
    photos = _photos(corner, tmp_path)
    corrupt = tmp_path / "photos" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg" * 10)
    not_explain = tmp_path / "mine"
    not_explain.mkdir()
    (not_explain / "keep.txt").write_text("x")
    out = tmp_path / "cams"
    cases = [
        ([str(tmp_path / "no-run"), str(photos[0])], "Run directory not found"),
        ([str(corner.run), str(tmp_path / "missing.jpg")], "Image file not found"),
        ([str(corner.run), str(photos[0]), str(corrupt)], "Cannot read the image"),
        ([str(corner.run), str(photos[0]), "--head", "melanom"], "Did you mean 'melanoma'"),
        ([str(corner.run), str(photos[0]), "--class", "mell"], "Did you mean 'mel'"),
        ([str(corner.run), str(photos[0]), "--layer", "block4_rel"],
         "Did you mean 'block4_relu'"),
        ([str(corner.run), str(photos[0]), "--head", "melanoma", "--class", "nv"],
         "one output"),
    ]
    for args, needle in cases:
        code, _, err = _cli(capsys, ["explain", *args, "--out", str(out)])
        assert code == 2, (args, err)
        assert err.startswith("trainer: error: ") and "Traceback" not in err
        assert needle in " ".join(err.split()), (needle, err)
        assert not out.exists(), args
    code, _, err = _cli(capsys, ["explain", str(corner.run), str(photos[0]), "--out",
                                 str(not_explain)])
    assert code == 2 and "refusing to replace" in " ".join(err.split())
    assert sorted(p.name for p in not_explain.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders


# --- trainer evaluate gallery -----------------------------------------------------------


def test_pick_gallery_takes_the_most_confident_right_and_wrong():
    true = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7],
                      [0.99, 0.01]])
    picks = pick_gallery(true, probs, 1)
    assert picks[0]["correct"].tolist() == [0] and picks[0]["wrong"].tolist() == [2]
    assert picks[1]["correct"].tolist() == [4] and picks[1]["wrong"].tolist() == [5]
    assert pick_gallery(true, probs, 5)[0]["wrong"].tolist() == [2, 3]


def test_evaluate_writes_a_gallery_per_class(corner, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DERMEDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    m = evaluate(corner.run, out=out, gallery=2, progress=False)
    assert m["n"] == 16
    files = sorted(p.name for p in (out / "gallery").iterdir())
    assert files == ["mel.png", "nv.png"]
    for name in files:
        with Image.open(out / "gallery" / name) as im:
            assert im.width > 400 and im.height > 200
    report = (out / "report.md").read_text()
    assert "## Grad-CAM gallery" in report
    assert "[mel](gallery/mel.png)" in report and "[nv](gallery/nv.png)" in report

    code, _, err = _cli(capsys, ["evaluate", str(corner.run), "--out", str(tmp_path / "e2"),
                                 "--no-gallery"])
    assert code == 0, err
    assert not (tmp_path / "e2" / "gallery").exists()
    assert "Grad-CAM" not in (tmp_path / "e2" / "report.md").read_text()
    with pytest.raises(DermedgeError, match="gallery must be"):
        evaluate(corner.run, out=tmp_path / "e3", gallery=-1)
    assert not (tmp_path / "e3").exists()


def test_gallery_is_skipped_with_a_reason_under_another_backend(monkeypatch, tmp_path):
    from trainer.evaluate import _gallery_section, gallery_step

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    note = gallery_step(tmp_path, None, {}, np.zeros((1, S, S, 3)), pd.DataFrame(), np.ones(1), 4)
    assert note.startswith("skipped: Grad-CAM needs the TensorFlow backend")
    assert "KERAS_BACKEND=tensorflow" in note and not any(tmp_path.iterdir())
    assert "Gallery skipped: Grad-CAM needs" in "\n".join(_gallery_section(note))
    assert gallery_step(tmp_path, None, {}, None, None, None, 0) is None


@pytest.mark.slow
def test_gradcam_under_another_backend_says_how_to_fix(tmp_path):
    code = ("import os\nos.environ['KERAS_BACKEND'] = 'jax'\n"
            "from trainer.model import build_model\nfrom trainer.explain import GradCAM\n"
            "from dermedge.labels import DIAGNOSIS_LABELS\n"
            "m = build_model('tiny_cnn', input_size=32, weights=None)\n"
            "try:\n    GradCAM(m, DIAGNOSIS_LABELS)\nexcept ValueError as e:\n    print(e)\n")
    need("jax", "the dev extra installs it")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert "needs the TensorFlow backend" in out.stdout and "'jax'" in out.stdout, out.stderr


# --- the demo: ?explain=1 ---------------------------------------------------------------


def _post(client, data: bytes, url: str):
    return client.post(url, data={"image": (io.BytesIO(data), "photo.jpg")},
                       content_type="multipart/form-data")


@pytest.fixture(scope="module")
def bundles():
    return tiny_bundles()


@pytest.fixture(scope="module")
def explain_app(bundles, corner):
    from edge_demo.app import create_app

    return create_app({"DEVICE_BUNDLE": str(bundles["int8"]),
                       "CLOUD_BUNDLE": str(bundles["float32"]), "LOG_JSON": False,
                       "INTERPRETERS": 1, "EXPLAIN_RUN": str(corner.run)})


def _png(data_url: str) -> Image.Image:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/png;base64"
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_demo_explain_returns_a_heatmap_of_the_answer(explain_app):
    client = explain_app.test_client()
    photo = jpeg_bytes((90, 60))
    plain = _post(client, photo, "/api/v1/classify").get_json()
    assert "explanation" not in plain and "explain" not in plain["timings_ms"]

    body = _post(client, photo, "/api/v1/classify?explain=1").get_json()
    ex = body["explanation"]
    answer = body["cloud"] or body["device"]
    assert ex["head"] == "diagnosis" and ex["class"] == answer["top"]["label"]
    assert ex["model"] == "corner" and ex["layer"] == "block4_relu"
    assert 0.0 <= ex["probability"] <= 1.0 and body["timings_ms"]["explain"] > 0
    im = _png(ex["png"])
    assert im.size == (90, 60) == (ex["width"], ex["height"])  # lines up with the upload

    mel = _post(client, photo, "/api/v1/cloud/classify?explain=melanoma").get_json()
    assert mel["explanation"]["head"] == "melanoma" and mel["explanation"]["class"] == "melanoma"
    big = _post(client, jpeg_bytes((1200, 800)), "/api/v1/classify?explain=1").get_json()
    assert _png(big["explanation"]["png"]).size == (512, 341)  # capped for the phone

    bad = _post(client, photo, "/api/v1/classify?explain=maybe")
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "bad_explain"
    models = client.get("/api/v1/models").get_json()
    assert models["explain"]["layer"] == "block4_relu"
    html = client.get("/").get_data(as_text=True)
    assert 'id="explain-input"' in html and "not enabled" not in html


def test_demo_without_explain_answers_501(bundles):
    from edge_demo.app import create_app

    client = create_app({"DEVICE_BUNDLE": str(bundles["int8"]), "LOG_JSON": False,
                         "INTERPRETERS": 1}).test_client()
    for url in ("/api/v1/classify?explain=1", "/api/v1/classify?explain=melanoma"):
        resp = _post(client, jpeg_bytes(), url)
        assert resp.status_code == 501, resp.get_data(as_text=True)
        err = resp.get_json()["error"]
        assert err["code"] == "explain_not_enabled" and "--explain RUN_DIR" in err["message"]
    assert _post(client, jpeg_bytes(), "/api/v1/classify?explain=0").status_code == 200
    assert client.get("/api/v1/models").get_json()["explain"] is None
    html = client.get("/").get_data(as_text=True)
    assert "not enabled on this server" in html and "disabled" in html


def test_demo_bad_explain_run_fails_at_start(bundles, tmp_path, capsys):
    from dermedge.errors import DermedgeError
    from edge_demo.app import create_app
    from edge_demo.cli import main as demo_main

    with pytest.raises(DermedgeError, match="not a run directory"):
        create_app({"DEVICE_BUNDLE": str(bundles["int8"]), "LOG_JSON": False,
                    "EXPLAIN_RUN": str(bundles["float32"])})  # a bundle, not a run
    code = demo_main(["serve", "--device", str(bundles["int8"]), "--explain",
                      str(tmp_path / "nope"), "--port", "1"])
    assert code == 2 and "not a run directory" in capsys.readouterr().err


def test_demo_without_tensorflow(bundles, corner):
    """TensorFlow and Keras made unimportable: plain requests work, ?explain=1 says how to
    enable it, and --explain fails at start-up with the install hint."""
    code = (
        "import sys, io\n"
        "for m in ('tensorflow', 'keras'):\n    sys.modules[m] = None\n"
        "from edge_demo.app import create_app\nfrom dermedge.errors import DermedgeError\n"
        "from PIL import Image\n"
        f"cfg = {{'DEVICE_BUNDLE': {str(bundles['int8'])!r}, 'LOG_JSON': False}}\n"
        "client = create_app(cfg).test_client()\n"
        "buf = io.BytesIO(); Image.new('RGB', (40, 30), (200, 120, 90)).save(buf, 'JPEG')\n"
        "def post(url):\n"
        "    return client.post(url, data={'image': (io.BytesIO(buf.getvalue()), 'a.jpg')},"
        " content_type='multipart/form-data')\n"
        "print('PLAIN', post('/api/v1/classify').status_code)\n"
        "r = post('/api/v1/classify?explain=1')\n"
        "print('EXPLAIN', r.status_code, r.get_json()['error']['code'])\n"
        "try:\n"
        f"    create_app(dict(cfg, EXPLAIN_RUN={str(corner.run)!r}))\n"
        "except DermedgeError as e:\n    print('START', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PLAIN 200" in out.stdout and "EXPLAIN 501 explain_not_enabled" in out.stdout
    assert "START --explain needs TensorFlow" in out.stdout, out.stdout


@pytest.mark.browser
def test_page_shows_the_heatmap_next_to_the_answer(bundles, corner, tmp_path):
    """The real server (--explain) in headless Chromium: tick "show heatmap" (and the consent
    the upload needs), see the overlay."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from test_browser_e2e import chromium, demo_server

    args = ["--device", str(bundles["int8"]), "--cloud", str(bundles["float32"]),
            "--explain", str(corner.run), "--threads", "2"]
    with demo_server(args, tmp_path / "server.log", timeout=90) as url, \
            chromium(tmp_path / "profile") as driver:
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(jpeg_bytes((600, 450)))
        driver.get(url + "/")
        driver.find_element(By.ID, "image-input").send_keys(str(photo))
        driver.find_element(By.ID, "explain-input").click()
        driver.find_element(By.ID, "submit").click()  # the heatmap needs the photo: consent
        WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "error")))
        assert "tick the consent box" in driver.find_element(By.ID, "error").text
        driver.find_element(By.ID, "consent-upload").click()
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "heatmap")))
        shown = driver.execute_script(
            "const i = document.getElementById('heatmap');"
            "return [i.complete, i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)];")
        assert shown == [True, 512, 384, "data:image/png;base64,"]
        assert "Heatmap for" in driver.find_element(By.ID, "explanation-note").text
        assert driver.find_element(By.ID, "advice").is_displayed()
        shot = os.environ.get("EDGE_DEMO_HEATMAP_SCREENSHOT")
        if shot:
            driver.save_screenshot(shot)
        for eid in ("explain-input", "submit"):  # untick: the next answer has no heatmap
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});"
                                  " arguments[0].click();", driver.find_element(By.ID, eid))
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.ID, "explanation").get_attribute("hidden") is not None
            and d.find_element(By.ID, "advice").is_displayed())

