"""Grad-CAM heatmaps on a run's float ``model.keras``: ``trainer explain`` and the evaluate gallery.

Grad-CAM (Selvaraju et al., 2017) on the model that takes raw RGB 0-255: the gradient of the
target's score before its activation (the diagnosis logit of a class, or the melanoma logit)
with respect to a backbone feature map, averaged per channel, weights that map's channels; the
weighted sum goes through a ReLU, is divided by its maximum (so 0-1 per image) and is
resized bilinearly to the model's ``S x S`` input. The feature map is the registry's
``last_conv_layer`` of the run's backbone unless ``layer`` names another backbone layer.

Heatmaps are computed on the same centre crop the model sees (``trainer.data.load_image``).
``trainer explain`` maps each one back onto the crop square of the **original** photo (EXIF
upright), so the PNG lines up with the file the user gave; the part of the photo outside
the crop, which the model never sees, is dimmed. The evaluate gallery draws on the model's
``S x S`` crop. Gradients need the TensorFlow backend (a core dependency).
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dermedge.errors import RunDirError
from dermedge.labels import HEADS
from trainer.errors import DataError, DermedgeError

if TYPE_CHECKING:
    import keras
    import pandas as pd

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("image", "png", "head", "class", "probability", "predicted",
                 "predicted_probability", "layer", "crop_left", "crop_top", "crop_side")
ALPHA = 0.45  # heatmap opacity in the overlays
DIM_OUTSIDE = 0.35  # brightness of the photo outside the crop the model saw
COLORMAP = "jet"
BATCH = 32


# --------------------------------------------------------------------------- Grad-CAM


@dataclass(frozen=True)
class Explanation:
    """Heatmaps ``cams (N, S, S)`` in [0, 1] for ``head``; per image the explained class
    (``classes``), its probability, and the diagnosis head's top class and probability."""

    head: str
    layer: str
    cams: np.ndarray
    classes: list[str]
    probabilities: np.ndarray
    predicted: list[str]
    predicted_probabilities: np.ndarray


class GradCAM:
    """Grad-CAM for a model from ``trainer.model.build_model`` (raw pixels in, dict out).

    ``labels`` are the diagnosis head's labels in head order (from the model card).
    """

    def __init__(self, model: keras.Model, labels: Sequence[str], *, backbone: str | None = None,
                 layer: str | None = None):
        import keras

        from trainer.model import BACKBONE_NAME, backbone_submodel

        if keras.backend.backend() != "tensorflow":  # before TF is imported
            raise DermedgeError(
                f"Grad-CAM needs the TensorFlow backend (it uses tf.GradientTape); this process "
                f"runs Keras on {keras.backend.backend()!r}. Run it with KERAS_BACKEND=tensorflow "
                "(or unset KERAS_BACKEND); a model trained under any backend loads there.")
        self.model = model
        self.labels = tuple(str(v) for v in labels)
        self.size = int(model.inputs[0].shape[1])
        bb = backbone_submodel(model)
        self.layer = resolve_layer(bb, backbone, layer)
        features = keras.Model(bb.inputs, [bb.get_layer(self.layer).output, bb.outputs[0]],
                               name="gradcam_backbone")
        # Replay the model around the backbone (preprocessing -> backbone -> pool -> dropout)
        # so the chosen feature map and the heads' input come out of one forward pass.
        image = keras.Input(tuple(model.inputs[0].shape[1:]), name="image", dtype="float32")
        x, fmap = image, None
        for lyr in model.layers:
            if isinstance(lyr, keras.layers.InputLayer) or lyr.name in HEADS:
                continue
            if lyr.name == BACKBONE_NAME:
                fmap, x = features(x)
            else:
                x = lyr(x)
        self._forward = keras.Model(image, [fmap, x], name="gradcam")
        self._heads = {name: model.get_layer(name) for name in HEADS}
        import tensorflow as tf

        # Traced once per head: ~5x faster than eager on a CPU.
        self._step = tf.function(self._gradcam, reduce_retracing=True)

    def _scores(self, pooled, head: str):
        """Logits (before softmax/sigmoid) of ``head``, from the heads' own weights."""
        import tensorflow as tf

        dense = self._heads[head]
        return tf.matmul(tf.cast(pooled, tf.float32), tf.cast(dense.kernel, tf.float32)) + \
            tf.cast(dense.bias, tf.float32)

    def _gradcam(self, x, head: str, want):
        """One batch: (cams (N, S, S), P(target), diagnosis probabilities, target index).
        ``want``: a diagnosis class index, or -1 for each image's predicted class."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            fmap, pooled = self._forward(x, training=False)
            diag = self._scores(pooled, "diagnosis")
            if head == "melanoma":
                logits = self._scores(pooled, "melanoma")
                idx = tf.zeros(tf.shape(x)[:1], tf.int32)
            else:
                logits = diag
                predicted = tf.argmax(diag, axis=1, output_type=tf.int32)
                idx = tf.where(want < 0, predicted, tf.fill(tf.shape(predicted), want))
            # One sum over the batch: each image's score depends only on its own map.
            score = tf.gather(logits, idx, axis=1, batch_dims=1)
            total = tf.reduce_sum(score)
        grads = tf.cast(tape.gradient(total, fmap), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(fmap, tf.float32), axis=-1))
        cam = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
        cam = tf.image.resize(cam[..., None], (self.size, self.size), method="bilinear")
        p_diag = tf.nn.softmax(diag, axis=1)
        p_head = (tf.sigmoid(score) if head == "melanoma"
                  else tf.gather(p_diag, idx, axis=1, batch_dims=1))
        return cam[..., 0], p_head, p_diag, idx

    def class_index(self, head: str, class_name: str | None) -> int | None:
        """Validate ``head`` / ``class_name``; the diagnosis class index (None: predicted)."""
        return check_target(head, class_name, self.labels)

    def __call__(self, images: np.ndarray, head: str = "diagnosis",
                 class_name: str | None = None, *, batch_size: int = BATCH) -> Explanation:
        """Heatmaps for uint8/float ``images (N, S, S, 3)`` (raw RGB 0-255, the model's input).

        ``head="diagnosis"``: the class ``class_name`` (default: each image's predicted class).
        ``head="melanoma"``: P(melanoma).
        """
        import tensorflow as tf

        target = self.class_index(head, class_name)
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise DermedgeError(f"Grad-CAM needs images of shape (N, {self.size}, {self.size}, 3)"
                                f" (the model's input); received {images.shape}. Resize them "
                                "with trainer.data.load_image.")
        cams, probs, classes, top, top_p = [], [], [], [], []
        want = tf.constant(-1 if target is None else target, tf.int32)
        for start in range(0, len(images), batch_size):
            x = tf.constant(np.asarray(images[start:start + batch_size], np.float32))
            cam, p_head, p_diag, idx = (np.asarray(t) for t in self._step(x, head, want))
            cams.append(np.clip(cam, 0.0, 1.0).astype(np.float32))
            probs.append(p_head.astype(np.float64))
            classes += (["melanoma"] * len(x) if head == "melanoma"
                        else [self.labels[i] for i in idx])
            best = p_diag.argmax(axis=1)
            top += [self.labels[i] for i in best]
            top_p.append(p_diag[np.arange(len(x)), best].astype(np.float64))
        empty = np.zeros((0,), np.float64)
        return Explanation(
            head=head, layer=self.layer,
            cams=(np.concatenate(cams) if cams
                  else np.zeros((0, self.size, self.size), np.float32)),
            classes=classes, probabilities=np.concatenate(probs) if probs else empty,
            predicted=top, predicted_probabilities=np.concatenate(top_p) if top_p else empty)


def resolve_layer(backbone: keras.Model, backbone_name: str | None, layer: str | None) -> str:
    """The feature-map layer: ``layer`` if given (checked, with a suggestion), else the
    registry's ``last_conv_layer`` for ``backbone_name``, else the backbone's last 4-D layer."""
    import keras

    from trainer.backbones import REGISTRY

    maps = [lyr.name for lyr in backbone.layers
            if not isinstance(lyr, keras.layers.InputLayer) and len(_shape(lyr)) == 4]
    if layer is None:
        spec = REGISTRY.get(str(backbone_name))
        if spec is not None and spec.last_conv_layer in maps:
            return spec.last_conv_layer
        if not maps:
            raise DermedgeError("The backbone of this model has no 4-D feature map for "
                                "Grad-CAM; pass --layer NAME.")
        return maps[-1]
    if layer in maps:
        return layer
    names = [lyr.name for lyr in backbone.layers]
    if layer in names:
        shape = _shape(backbone.get_layer(layer))
        raise DermedgeError(f"Layer {layer!r} (output shape {shape}) is not a feature map "
                            "Grad-CAM can use; it needs a convolutional block's output (N, H, "
                            f"W, C). Pick a conv/activation layer, e.g. '{maps[-1]}'.")
    close = difflib.get_close_matches(layer, maps, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DermedgeError(f"Layer {layer!r} is not a layer of the '{backbone_name}' backbone."
                        f"{hint} Feature maps run from '{maps[0]}' to '{maps[-1]}' (default: "
                        f"'{maps[-1]}').")


def _shape(layer) -> tuple:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return ()


def unexplainable(card: dict[str, Any]) -> str | None:
    """Why a run's model has no Grad-CAM (``None`` when it has one)."""
    if card.backbone == "ensemble":
        return ("an ensemble has no single feature map to explain; run `trainer evaluate` (or "
                "`trainer explain`) on its member runs")
    return None


def check_target(head: str, class_name: str | None, labels: Sequence[str]) -> int | None:
    """Validate a head and class against the card's labels; the diagnosis class index."""
    if head not in HEADS:
        close = difflib.get_close_matches(str(head), HEADS, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise DermedgeError(f"Unknown head {head!r}.{hint} Use one of: {', '.join(HEADS)}.")
    if head == "melanoma":
        if class_name not in (None, "melanoma"):
            raise DermedgeError(f"The melanoma head has one output, P(melanoma); received "
                                f"class={class_name!r}. Leave --class out, or use --head "
                                f"diagnosis --class {class_name}.")
        return None
    if class_name is None:
        return None
    labels = list(labels)
    if class_name in labels:
        return labels.index(class_name)
    close = difflib.get_close_matches(str(class_name).lower(), labels, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DermedgeError(f"Unknown diagnosis class {class_name!r}.{hint} The run's labels are: "
                        f"{', '.join(labels)}.")


# --------------------------------------------------------------------------- overlays


def colorize(cam: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3)`` float RGB in [0, 1] (matplotlib colormap)."""
    from matplotlib import colormaps

    return colormaps[COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Alpha-blend the coloured heatmap ``cam (H, W)`` onto ``rgb (H, W, 3)`` uint8."""
    rgb = np.asarray(rgb, np.float32) / 255.0
    if cam.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap {cam.shape} and image {rgb.shape[:2]} differ in size.")
    out = (1.0 - alpha) * rgb + alpha * colorize(cam)
    return np.round(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)


def crop_box(width: int, height: int) -> tuple[int, int, int]:
    """``(left, top, side)`` of the centred square crop, exactly as ``load_image`` takes it."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def heatmap_on_photo(photo: Image.Image, cam: np.ndarray, *,
                     max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map an ``S x S`` heatmap back onto the crop square of ``photo`` (upright RGB).

    Returns ``(full_cam (H, W), overlay (H, W, 3) uint8)`` at the photo's size (scaled down so
    its longer side is at most ``max_side``); outside the crop the heatmap is 0 and the photo
    is dimmed.
    """
    w, h = photo.size
    left, top, side = crop_box(w, h)
    scale = 1.0
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    x0, y0 = round(left * scale), round(top * scale)
    s = max(1, min(round(side * scale), out_w - x0, out_h - y0))
    rgb = photo if scale == 1.0 else photo.resize((out_w, out_h), Image.BILINEAR)
    rgb = np.asarray(rgb.convert("RGB"), np.uint8)
    square = Image.fromarray(np.asarray(cam, np.float32)).resize((s, s), Image.BILINEAR)
    full = np.zeros((out_h, out_w), np.float32)
    full[y0:y0 + s, x0:x0 + s] = np.clip(np.asarray(square), 0.0, 1.0)
    out = np.round(rgb.astype(np.float32) * DIM_OUTSIDE).astype(np.uint8)
    out[y0:y0 + s, x0:x0 + s] = overlay(rgb[y0:y0 + s, x0:x0 + s], full[y0:y0 + s, x0:x0 + s])
    return full, out


def open_photo(path: str | Path) -> Image.Image:
    """The photo as ``load_image`` sees it before cropping: EXIF-upright 8-bit RGB."""
    from dermedge.image import upright_rgb8

    try:
        with Image.open(path) as im:
            im.load()
            return upright_rgb8(im)
    except FileNotFoundError as exc:
        raise DataError(f"Image file not found: {path}. Check the path.") from exc
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
        raise DataError(f"Cannot read the image {path} ({type(exc).__name__}: {exc}). The file "
                        "is unreadable, truncated or not an image; pass a JPEG or PNG photo."
                        ) from exc


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- trainer explain


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DermedgeError(f"--out {out} is a file; pass a folder for the heatmaps.")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX_FILE).is_file():
        raise DermedgeError(f"--out {out} is a non-empty folder that `trainer explain` did not "
                            "write (no index.csv); refusing to replace it. Pass a new folder.")


def _png_names(paths: Sequence[Path], head: str) -> list[str]:
    names, seen = [], set()
    for i, p in enumerate(paths):
        name = f"{p.stem}.{head}.png"
        if name in seen:  # same file name from two folders
            name = f"{p.stem}-{i}.{head}.png"
        seen.add(name)
        names.append(name)
    return names


def explain_images(run_dir: str | Path, images: Sequence[str | Path], out: str | Path, *,
                   head: str = "diagnosis", class_name: str | None = None,
                   layer: str | None = None, max_side: int = 1024) -> list[dict[str, Any]]:
    """``trainer explain``: one overlay PNG per image plus ``index.csv`` in ``out``.

    Everything is checked (run, head, class, images, layer) before ``out`` is touched; the
    folder is written next to ``out`` and renamed into place (a previous ``trainer explain``
    folder there is replaced).
    """
    from trainer.data import load_image
    from trainer.run import load_run, move_into_place, read_card

    run = Path(run_dir).expanduser()
    card = read_card(run)
    labels = list(card.diagnosis_labels)
    if not labels:
        raise RunDirError(f"{run}/model_card.json has no heads.diagnosis.labels; the run "
                          "directory is corrupt.")
    why_not = unexplainable(card)
    if why_not:
        raise DermedgeError(f"No Grad-CAM for {run}: {why_not}.")
    check_target(head, class_name, labels)
    if not images:
        raise DermedgeError("No images given; pass one or more image files.")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise DermedgeError(f"max_side must be an integer >= 16 pixels; received {max_side!r}.")
    out = Path(out).expanduser().resolve()
    _check_out(out)
    size = card.input_size
    paths = [Path(p).expanduser() for p in images]
    photos = [open_photo(p) for p in paths]
    inputs = np.stack([load_image(p, size) for p in paths])

    model, card = load_run(run)
    cam = GradCAM(model, labels, backbone=card.backbone, layer=layer)
    result = cam(inputs, head, class_name)

    rows: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for i, (path, photo, name) in enumerate(zip(paths, photos, _png_names(paths, head),
                                                     strict=True)):
            _, picture = heatmap_on_photo(photo, result.cams[i], max_side=max_side)
            (work / name).write_bytes(png_bytes(picture))
            left, top, side = crop_box(*photo.size)
            rows.append({"image": str(path.resolve()), "png": name, "head": head,
                         "class": result.classes[i],
                         "probability": round(float(result.probabilities[i]), 6),
                         "predicted": result.predicted[i],
                         "predicted_probability": round(float(result.predicted_probabilities[i]),
                                                        6),
                         "layer": result.layer, "crop_left": left, "crop_top": top,
                         "crop_side": side})
        with open(work / INDEX_FILE, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.chmod(work, 0o755)
        move_into_place(work, out, overwrite=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return rows


# --------------------------------------------------------------------------- evaluate gallery


def pick_gallery(true_idx: np.ndarray, probs: np.ndarray, per_class: int) -> dict[int, dict]:
    """Per true class: the ``per_class`` most confident correct and most confident wrong cases
    (indices into the records), by the predicted class's probability."""
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(probs)), pred]
    out: dict[int, dict] = {}
    for c in np.unique(true_idx):
        mine = np.flatnonzero(true_idx == c)
        right = mine[pred[mine] == c]
        wrong = mine[pred[mine] != c]
        out[int(c)] = {"correct": right[np.argsort(-conf[right], kind="stable")][:per_class],
                       "wrong": wrong[np.argsort(-conf[wrong], kind="stable")][:per_class]}
    return out


def write_gallery(out_dir: str | Path, model: keras.Model, card: dict[str, Any],
                  images: np.ndarray, records: pd.DataFrame, probs: np.ndarray, *,
                  per_class: int = 4) -> dict[str, str]:
    """``gallery/<class>.png`` per true class: a row of correct and a row of wrong cases, each
    as the crop and its Grad-CAM for the **predicted** class. Returns ``{class: relative path}``.
    """
    from trainer.plots import new_figure, save_figure

    labels = list(card.diagnosis_labels)
    index = {d: i for i, d in enumerate(labels)}
    true_idx = np.array([index[str(d)] for d in records["dx"]], np.int64)
    picks = pick_gallery(true_idx, np.asarray(probs), per_class)
    chosen = sorted({int(i) for p in picks.values() for v in p.values() for i in v})
    if not chosen:
        return {}
    gradcam = GradCAM(model, labels, backbone=card.backbone)
    pred = np.asarray(probs).argmax(axis=1)
    crops = np.asarray(images[chosen])
    # Explain each case's predicted class (the answer the gallery captions show).
    cams = np.zeros((len(chosen), gradcam.size, gradcam.size), np.float32)
    for c in np.unique(pred[chosen]):
        sel = np.flatnonzero(pred[chosen] == c)
        cams[sel] = gradcam(crops[sel], "diagnosis", labels[int(c)]).cams
    where = {i: k for k, i in enumerate(chosen)}
    ids = records["image_id"].astype(str).tolist()

    written: dict[str, str] = {}
    out = Path(out_dir)
    for c, groups in sorted(picks.items()):
        plt, (fig, axes) = new_figure(nrows=2, ncols=2 * per_class,
                                   figsize=(1.55 * 2 * per_class, 4.2), squeeze=False)
        for row, kind in enumerate(("correct", "wrong")):
            cases = list(groups[kind])
            for k in range(per_class):
                a_img, a_cam = axes[row, 2 * k], axes[row, 2 * k + 1]
                for ax in (a_img, a_cam):
                    ax.set_axis_off()
                if k >= len(cases):
                    if k == 0:
                        a_img.text(0.0, 0.5, f"no {kind} cases", fontsize=9,
                                   transform=a_img.transAxes)
                    continue
                i = int(cases[k])
                crop, heat = crops[where[i]], cams[where[i]]
                a_img.imshow(crop)
                a_cam.imshow(overlay(crop, heat))
                a_img.set_title(ids[i][-16:], fontsize=7)
                a_cam.set_title(f"pred {labels[pred[i]]} {probs[i, pred[i]]:.2f}", fontsize=7,
                                color="black" if kind == "correct" else "firebrick")
            axes[row, 0].text(-0.08, 0.5, kind, rotation=90, va="center", ha="right",
                              fontsize=10, transform=axes[row, 0].transAxes)
        fig.suptitle(f"true {labels[c]}: {per_class} most confident correct / wrong cases; "
                     "Grad-CAM of the predicted class", fontsize=9)
        name = f"gallery/{labels[c]}.png"
        save_figure(plt, fig, out / name)
        written[labels[c]] = name
    return written
