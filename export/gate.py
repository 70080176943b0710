"""The input gate's export side: the ``ood`` output and the thresholds, measured.

``ood`` ("this does not look like a dermoscopy photo") models the in-distribution: a
probabilistic-PCA density of the backbone's pooled features, fitted on the run's train split.
Its score is the low-rank Mahalanobis distance plus the residual off the principal subspace,

    s(f) = sum_i z_i^2 + |r|^2 / noise,  z = W (f - mean) / sqrt(variances),
    r = (f - mean) - W^T W (f - mean),

mapped to ``ood = sigmoid((s - center) / width)`` with ``center`` at the validation split's
``1 - budget`` quantile (0.5 there) and ``width`` a third of the distance from the median.
Everyday photos sit off the dermoscopy subspace: the residual is what separates them (the
principal part alone does not; benchmarks/input_gate.md). The head is compiled into the graph
with layers that quantize to int8 well (whitened projections, squares of comparable values,
one range anchor so that far-away photos do not saturate at the calibration images' range),
about 2 x components x feature-size weights: 82 kB for EfficientNet-Lite0 at 32 components.

The thresholds: each quality check of the gate table (edge_demo/static/gate_rules.json, read
here as data) gets the more lenient of its default and the validation split's quantile at its
budget; ``ood_max`` the quantile of the shipped model's own ``ood`` on the validation split.
The card's ``gate`` section records them with the measured refusal rates (Wilson 95 %), and
the validation adds a ``gate_agreement`` gate: the converted model's gate decisions against
the float model's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermedge import quality
from dermedge.labels import OOD, OOD_LABELS
from dermedge.metrics import wilson

POOL_LAYER = "pool"  # trainer.model's global-average-pooling layer: the features modelled
COMPONENTS = 32
FIT_IMAGES = 2000
ANCHOR = 12.0  # the logit the anchor pins the int8 range to: sigmoid(12) = 0.999994
# The gate table is the demo's (edge_demo/static/gate_rules.json); the export reads it as data.
RULES_FILE = Path(__file__).resolve().parents[1] / "edge_demo" / "static" / "gate_rules.json"
GATE_VERSION = 1


def rules() -> dict[str, Any]:
    return json.loads(RULES_FILE.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class OodFit:
    """The fitted density and the score's mapping to ``ood`` in [0, 1]."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    noise: float  # mean variance off the principal subspace
    center: float
    width: float
    fit_images: int

    def score(self, features: np.ndarray) -> np.ndarray:
        """The float reference of the in-graph score ``s``."""
        d = np.asarray(features, np.float64) - self.mean
        p = d @ self.components.T
        resid = (d ** 2).sum(1) - (p ** 2).sum(1)
        return (p ** 2 / self.variances).sum(1) + resid / self.noise

    def ood(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.score(features) - self.center) / self.width))

    def describe(self) -> dict[str, Any]:
        return {"method": "probabilistic PCA of the pooled backbone features (low-rank"
                          " Mahalanobis distance + residual off the principal subspace)",
                "layer": POOL_LAYER, "components": int(len(self.variances)),
                "feature_size": int(self.mean.shape[0]), "fit_images": self.fit_images,
                "fit_split": "train", "noise_variance": float(self.noise),
                "center": float(self.center), "width": float(self.width), "anchor": ANCHOR,
                "head_weights": int(2 * self.components.size + 2 * (self.components.shape[0]
                                                                     + self.mean.shape[0]))}


def fit_density(features: np.ndarray, components: int = COMPONENTS):
    """``(mean, components (k, D), variances (k,), noise)`` of ``features`` (N, D); ``k`` is
    ``components`` or less for a small model or train split (at most D/2 and N/2)."""
    x = np.asarray(features, np.float64)
    components = min(int(components), x.shape[1] // 2, x.shape[0] // 2)
    if components < 1:
        from export.errors import ExportError

        raise ExportError(f"The ood density needs at least 2 train images and 2 features; "
                          f"received {x.shape[0]} x {x.shape[1]}. Export with --no-gate.")
    mean = x.mean(0)
    lam, vec = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    lam, vec = lam[::-1], vec[:, ::-1]
    noise = float(max(lam[components:].mean(), 1e-8))
    return mean, vec[:, :components].T.copy(), np.maximum(lam[:components], noise), noise


def fit_ood(train_features: np.ndarray, val_features: np.ndarray, budget: float,
            components: int = COMPONENTS) -> OodFit:
    """Fit on train; place ``center`` at the validation ``1 - budget`` quantile."""
    mean, comp, var, noise = fit_density(train_features, components)
    fit = OodFit(mean, comp, var, noise, 0.0, 1.0, int(len(train_features)))
    s = fit.score(val_features)
    center = float(np.quantile(s, 1.0 - budget))
    width = max((center - float(np.median(s))) / 3.0, 1e-6)
    return OodFit(mean, comp, var, noise, center, width, int(len(train_features)))


# ----------------------------------------------------------------------------- the graph
def feature_model(model):
    """``image -> pooled features`` of a model from ``trainer.model.build_model``, or None
    when it has no ``pool`` layer (an ensemble)."""
    import keras

    try:
        pool = model.get_layer(POOL_LAYER)
    except ValueError:
        return None
    return keras.Model(model.input, pool.output)


def features(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    fm = feature_model(model)
    out = [np.asarray(fm(np.asarray(images[i:i + batch_size], np.float32), training=False))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def with_ood_output(model, fit: OodFit, *, int8: bool = True):
    """``model`` with a third named output ``ood`` computed from its pooled features.

    ``int8``: sum the terms in a dense layer whose second, constant column pins the int8
    range of the logit (full-integer exports); else sum them with reductions (float modes, and
    dynamic-range quantization, which would quantize that layer's input on the fly)."""
    import keras
    from keras import layers

    class TakeFirst(layers.Layer):
        """The first column: the anchor column only pins the int8 range."""

        def call(self, x):
            return x[:, :1]

    class SumTerms(layers.Layer):
        """``sum(a) + sum(b)`` over the features, ``(N, 1)``."""

        def call(self, a, b):
            return (keras.ops.sum(a, axis=-1, keepdims=True)
                    + keras.ops.sum(b, axis=-1, keepdims=True))

    f = model.get_layer(POOL_LAYER).output
    k, dim = fit.components.shape
    sigma = math.sqrt(fit.noise)
    sd = np.sqrt(fit.variances)
    centred = layers.Rescaling(1.0 / sigma, offset=(-fit.mean / sigma).astype(np.float32),
                               name="ood_centre", dtype="float32")(f)
    z = layers.Dense(k, name="ood_project", dtype="float32")(f)
    back = layers.Dense(dim, use_bias=False, name="ood_back", dtype="float32")(z)
    resid = layers.Subtract(name="ood_residual", dtype="float32")([centred, back])
    z2 = layers.Multiply(name="ood_z2", dtype="float32")([z, z])
    r2 = layers.Multiply(name="ood_r2", dtype="float32")([resid, resid])
    if int8:
        terms = layers.Concatenate(name="ood_terms", dtype="float32")([z2, r2])
        logit = TakeFirst(name="ood_take", dtype="float32")(
            layers.Dense(2, name="ood_logit", dtype="float32")(terms))
    else:
        logit = layers.Rescaling(1.0 / fit.width, offset=-fit.center / fit.width,
                                 name="ood_logit", dtype="float32")(
            SumTerms(name="ood_sum", dtype="float32")(z2, r2))
    ood = layers.Activation("sigmoid", name=OOD, dtype="float32")(logit)
    outputs = dict(model.output)
    outputs[OOD] = ood
    out = keras.Model(model.input, outputs, name=model.name)
    out.get_layer("ood_project").set_weights([
        (fit.components.T / sd).astype(np.float32),
        (-(fit.mean @ fit.components.T) / sd).astype(np.float32)])
    out.get_layer("ood_back").set_weights([((fit.components.T * sd).T / sigma)
                                           .astype(np.float32)])
    if int8:
        w = np.zeros((k + dim, 2), np.float32)
        w[:, 0] = 1.0 / fit.width
        out.get_layer("ood_logit").set_weights([w, np.array([-fit.center / fit.width, ANCHOR],
                                                            np.float32)])
    return out


# ----------------------------------------------------------------------------- thresholds
def photo_measures(paths) -> list[dict[str, float]]:
    """The quality measures of each image file as decoded (dermedge.quality)."""
    from PIL import Image

    from dermedge.image import upright_rgb8

    out = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            out.append(quality.measure_image(upright_rgb8(im)))
    return out


def _refuses(check: dict, values: np.ndarray, threshold: float | None) -> np.ndarray:
    if threshold is None:
        return np.zeros(len(values), bool)
    return values < threshold if check["op"] == "<" else values > threshold


def choose_thresholds(measures: list[dict[str, float]], ood: np.ndarray | None,
                      image_size: int) -> dict[str, float | None]:
    """Each check's threshold (the module docstring): lenient default vs validation quantile."""
    out: dict[str, float | None] = {}
    for c in rules()["checks"]:
        name, budget = c["threshold"], c.get("budget")
        if name == "min_side":
            out[name] = float(image_size)
            continue
        vals = (ood if c["value"] == OOD else
                np.array([m[c["value"]] for m in measures], np.float64))
        if vals is None or len(vals) == 0:
            out[name] = None if c["default"] is None else float(c["default"])
            continue
        if c["op"] == "<":
            q = float(np.quantile(vals, budget, method="lower"))
            out[name] = q if c["default"] is None else min(float(c["default"]), q)
        else:
            q = float(np.quantile(vals, 1.0 - budget, method="higher"))
            out[name] = q if c["default"] is None else max(float(c["default"]), q)
    return out


def refusals(measures: list[dict[str, float]], ood: np.ndarray | None,
             thresholds: dict[str, float | None]) -> dict[str, np.ndarray]:
    """Per check, which images it refuses (the union is the gate's decision)."""
    out = {}
    for c in rules()["checks"]:
        vals = (ood if c["value"] == OOD else
                np.array([m[c["value"]] for m in measures], np.float64))
        out[c["id"]] = (np.zeros(len(measures), bool) if vals is None
                        else _refuses(c, np.asarray(vals), thresholds.get(c["threshold"])))
    return out


def rates(refused: dict[str, np.ndarray]) -> dict[str, Any]:
    """Refusal counts and rates with Wilson intervals, per check and in total."""
    n = len(next(iter(refused.values())))
    total = np.any(np.stack(list(refused.values())), axis=0)

    def row(mask):
        k = int(mask.sum())
        return {"refused": k, "rate": k / n if n else None, "ci95": wilson(k, n)}

    return {"n": n, "total": row(total), "per_check": {k: row(v) for k, v in refused.items()}}


def section(*, thresholds, measured: dict, fit: OodFit | None, where: str | None,
            agreement: dict | None, note: str | None = None) -> dict[str, Any]:
    """The card's ``gate`` section (docs/ARTIFACTS.md)."""
    out = {"version": GATE_VERSION, "thresholds": thresholds, "params": quality.params(),
           "budgets": {c["threshold"]: c.get("budget") for c in rules()["checks"]},
           "defaults": {c["threshold"]: c["default"] for c in rules()["checks"]},
           "ood": None if fit is None else {"output": OOD, "labels": list(OOD_LABELS),
                                            **fit.describe()},
           "measured": {"data": where, **measured} if measured else None,
           "validation": agreement}
    if note:
        out["note"] = note
    return out


def agreement(measures, ood_float: np.ndarray, ood_lite: np.ndarray,
              thresholds: dict[str, float | None], limit: float | None) -> dict[str, Any]:
    """The gate's decisions with the float model's ``ood`` vs the converted model's, at the
    same thresholds (the quality checks see the same pixels either way)."""
    a = np.any(np.stack(list(refusals(measures, ood_float, thresholds).values())), axis=0)
    b = np.any(np.stack(list(refusals(measures, ood_lite, thresholds).values())), axis=0)
    value = float(np.mean(a == b)) if len(a) else None
    d = np.abs(np.asarray(ood_float) - np.asarray(ood_lite))
    return {"n": int(len(a)), "decision_agreement": value, "limit": limit,
            "passed": True if limit is None or value is None else bool(value >= limit),
            "ood_max_abs_diff": float(d.max()) if len(d) else None,
            "ood_mean_abs_diff": float(d.mean()) if len(d) else None,
            "refused_float": int(a.sum()), "refused_converted": int(b.sum())}


def as_dict(fit: OodFit) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(fit).items()}
