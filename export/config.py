"""Typed, frozen export configuration: quantization modes and validation tolerances."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace

from export.errors import ExportError

MODES: tuple[str, ...] = ("float32", "float16", "dynamic", "int8")
IO_DTYPES: tuple[str, ...] = ("uint8", "int8", "float32")
BIAS_CORRECTION: tuple[str, ...] = ("auto", "on", "kernel", "off")
WEIGHT_ROUNDING: tuple[str, ...] = ("nearest", "adaptive")
# The default for bias-corrected int8 exports: on the mobile backbones adaptive rounding took the
# same export time as nearest and agreed better with float on both edge runs
# (benchmarks/quantization.md); on wide backbones (ResNet50) it is several times slower.
DEFAULT_WEIGHT_ROUNDING = "adaptive"
DEFAULT_REPRESENTATIVE_IMAGES = 300
MIN_REPRESENTATIVE_IMAGES = 10
# --float-heads: the two heads' dense layers and softmax/sigmoid stay in float (the backbones
# have no other FULLY_CONNECTED op), so logits and probabilities are not rounded to int8.
FLOAT_HEAD_OPS: tuple[str, ...] = ("FULLY_CONNECTED", "SOFTMAX", "LOGISTIC")
DEFAULT_QAT_EPOCHS = 2
DEFAULT_QAT_LR = 1e-5
# What QAT fits: the float model's own outputs on the same augmented images ("distill": the
# int8 model learns to answer like the float model, which is what validation gates), or the
# training labels with the run's losses ("labels": can drift from the float model).
QAT_TARGETS: tuple[str, ...] = ("distill", "labels")


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware fine-tuning before int8 conversion (see export/qat.py)."""

    epochs: int = DEFAULT_QAT_EPOCHS
    steps_per_epoch: int | None = None  # cap on batches per epoch (None: the whole train split)
    lr: float = DEFAULT_QAT_LR
    target: str = "distill"

    def __post_init__(self):
        for flag, value in (("--qat-epochs", self.epochs), ("--qat-steps", self.steps_per_epoch)):
            if value is None and flag == "--qat-steps":
                continue  # no cap: the whole train split every epoch
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExportError(f"{flag} must be a whole number >= 1; received {value!r}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or \
                not 0 < self.lr < 1:
            raise ExportError(f"The QAT learning rate must be a number in (0, 1), e.g. "
                              f"{DEFAULT_QAT_LR}; received --qat-lr {self.lr!r}.")
        if self.target not in QAT_TARGETS:
            hint = difflib.get_close_matches(str(self.target), QAT_TARGETS, n=1)
            raise ExportError(f"Unknown QAT target {self.target!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else ".")
                              + f" Choose one of: {', '.join(QAT_TARGETS)}.")


@dataclass(frozen=True)
class QuantizationConfig:
    """How to convert. Build it with a named constructor: ``QuantizationConfig.int8(300)``."""

    mode: str = "float32"
    io_dtype: str = "float32"
    representative_images: int = 0
    keep_float: tuple[str, ...] = ()
    seed: int = 0
    qat: QATConfig | None = None  # int8 only: quantization-aware fine-tuning first
    # int8 PTQ: round kernels + correct biases first (export/biascorr.py). "auto" converts with
    # and without and keeps the one closer to float on the calibration images.
    bias_correction: str = "off"
    # How the bias-corrected kernels are rounded onto the int8 grid: "nearest", or "adaptive"
    # (floor or ceil chosen per weight to minimise each layer's output error). The field default is
    # "nearest" because the dataclass default has no bias correction; QuantizationConfig.int8()
    # picks DEFAULT_WEIGHT_ROUNDING.
    weight_rounding: str = "nearest"
    # int8 only: the outputs' dtype when it differs from the input's (``io_dtype``), e.g. uint8
    # camera pixels in, float32 probabilities out. None: the same as io_dtype.
    output_dtype: str | None = None
    # Re-serialise the converted file with identical vectors (zero points, scales, shapes)
    # stored once (export/compact.py): lossless, checked bit-identical before it is used.
    compact: bool = True

    @property
    def out_dtype(self) -> str:
        """The dtype of the model's outputs."""
        return self.output_dtype or self.io_dtype

    def __post_init__(self):
        if self.mode not in MODES:
            hint = difflib.get_close_matches(str(self.mode), MODES, n=1)
            raise ExportError(f"Unknown quantization mode {self.mode!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else ".")
                              + f" Choose one of: {', '.join(MODES)}.")
        if self.io_dtype not in IO_DTYPES:
            raise ExportError(f"Unknown I/O dtype {self.io_dtype!r}; choose one of "
                              f"{', '.join(IO_DTYPES)}.")
        if self.output_dtype is not None and self.output_dtype not in IO_DTYPES:
            raise ExportError(f"Unknown output dtype {self.output_dtype!r}; choose one of "
                              f"{', '.join(IO_DTYPES)}.")
        if self.mode != "int8":
            if self.out_dtype != "float32":
                raise ExportError(f"--output-io {self.out_dtype} only applies to int8 exports; a "
                                  f"{self.mode} model always returns float32. Add --int8 or "
                                  "drop --output-io.")
            if self.io_dtype != "float32":
                raise ExportError(f"--io {self.io_dtype} only applies to int8 exports; a "
                                  f"{self.mode} model always takes and returns float32. Add "
                                  "--int8 or drop --io.")
            if self.keep_float:
                raise ExportError("--keep-float only applies to int8 exports (it keeps the named "
                                  "layers in float inside an integer model). Add --int8 or drop "
                                  "--keep-float.")
        if self.bias_correction not in BIAS_CORRECTION:
            raise ExportError(f"Unknown bias correction {self.bias_correction!r}; choose one of "
                              f"{', '.join(BIAS_CORRECTION)}.")
        if self.weight_rounding not in WEIGHT_ROUNDING:
            hint = difflib.get_close_matches(str(self.weight_rounding), WEIGHT_ROUNDING, n=1)
            raise ExportError(f"Unknown weight rounding {self.weight_rounding!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else ".")
                              + f" Choose one of: {', '.join(WEIGHT_ROUNDING)}.")
        if self.weight_rounding != "nearest" and self.bias_correction == "off":
            raise ExportError(f"--weight-rounding {self.weight_rounding} chooses how the "
                              "bias-corrected kernels are rounded, but bias correction is off. "
                              "Drop --weight-rounding or use --bias-correction auto|on.")
        if self.bias_correction != "off" and self.mode != "int8":
            raise ExportError(f"Bias correction prepares a model for post-training full-integer "
                              f"int8; a {self.mode} export does not use it. Pass "
                              "--bias-correction off (or bias_correction='off').")
        if self.qat is not None:
            if self.mode != "int8":
                raise ExportError(f"--qat fine-tunes the model for full-integer int8, but the mode "
                                  f"is {self.mode}. Add --int8 (and drop --{self.mode}).")
            if self.keep_float:
                raise ExportError("--keep-float cannot be combined with --qat: QAT learns the "
                                  "int8 ranges of every layer. Drop one of them.")
        if self.mode == "int8" and int(self.representative_images) < MIN_REPRESENTATIVE_IMAGES:
            raise ExportError(
                f"int8 calibration needs at least {MIN_REPRESENTATIVE_IMAGES} representative "
                f"images; received representative_images={self.representative_images}. Use "
                f"--representative {DEFAULT_REPRESENTATIVE_IMAGES} (the default) or more.")

    @classmethod
    def float32(cls) -> QuantizationConfig:
        return cls("float32")

    @classmethod
    def float16(cls) -> QuantizationConfig:
        """float16 weights, float32 compute and I/O (half the size)."""
        return cls("float16")

    @classmethod
    def dynamic(cls) -> QuantizationConfig:
        """Dynamic-range: int8 weights, float activations and I/O. Not an int8 model."""
        return cls("dynamic")

    @classmethod
    def int8(cls, representative_images: int = DEFAULT_REPRESENTATIVE_IMAGES,
             io_dtype: str = "uint8", keep_float: tuple[str, ...] | list[str] = (),
             seed: int = 0, bias_correction: str = "auto",
             weight_rounding: str | None = None,
             output_dtype: str | None = None, float_heads: bool = False,
             compact: bool = True) -> QuantizationConfig:
        """Full-integer int8; uint8 RGB 0–255 input by default (raw camera pixels).

        ``output_dtype``: the outputs' dtype if not ``io_dtype`` (e.g. ``"float32"``: the
        probabilities come out dequantized).
        ``float_heads``: also keep ``FLOAT_HEAD_OPS`` in float, with float32 outputs.
        ``bias_correction``: ``"on"`` rounds the conv kernels onto their int8 grid and corrects
        each channel's mean shift on train images before converting (export/biascorr.py), then
        corrects the converted model's activation-quantization shift (export/qcorrect.py);
        ``"kernel"`` does the first stage only; ``"auto"`` (the default) converts with and
        without both and keeps the model that agrees better with float on the calibration
        images; ``"off"`` converts the model as trained.
        ``weight_rounding``: ``"adaptive"`` (the default with bias correction) or ``"nearest"``
        (see export/biascorr.py); without bias correction kernels are rounded to nearest by the
        converter.
        """
        if weight_rounding is None:
            weight_rounding = DEFAULT_WEIGHT_ROUNDING if bias_correction != "off" else "nearest"
        keep_float = tuple(keep_float)
        if float_heads:
            if output_dtype not in (None, "float32"):
                raise ExportError(f"--float-heads outputs float32 probabilities, but --output-io "
                                  f"is {output_dtype}. Drop one of them.")
            output_dtype = "float32"
            keep_float = tuple(dict.fromkeys([*keep_float, *FLOAT_HEAD_OPS]))
        return cls("int8", io_dtype, int(representative_images), keep_float, int(seed),
                   bias_correction=str(bias_correction), weight_rounding=str(weight_rounding),
                   output_dtype=output_dtype, compact=bool(compact))

    @classmethod
    def int8_qat(cls, representative_images: int = DEFAULT_REPRESENTATIVE_IMAGES,
                 io_dtype: str = "uint8", *, epochs: int = DEFAULT_QAT_EPOCHS,
                 steps_per_epoch: int | None = None, lr: float = DEFAULT_QAT_LR,
                 seed: int = 0, output_dtype: str | None = None,
                 target: str = "distill", compact: bool = True) -> QuantizationConfig:
        """Full-integer int8 after a few epochs of quantization-aware fine-tuning (export/qat.py).

        The representative images calibrate the fake-quant ranges before fine-tuning. The QAT
        model is validated side by side with the default post-training export of the same run
        (``bias_correction`` applies to that one), so the report says whether QAT was worth it.
        """
        return cls("int8", io_dtype, int(representative_images), (), int(seed),
                   QATConfig(epochs, steps_per_epoch, lr, target), output_dtype=output_dtype,
                   bias_correction="auto", weight_rounding=DEFAULT_WEIGHT_ROUNDING,
                   compact=bool(compact))

    @classmethod
    def for_mode(cls, mode: str, **kwargs) -> QuantizationConfig:
        return cls(mode, **kwargs) if kwargs else cls(mode)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep_float"] = list(self.keep_float)
        return d


@dataclass(frozen=True)
class Tolerances:
    """Validation gates. ``*_drop`` are allowed metric drops vs float; ``None`` disables a gate."""

    diagnosis_agreement: float | None = 0.98
    melanoma_agreement: float | None = 0.98
    balanced_accuracy_drop: float | None = 0.01
    melanoma_auc_drop: float | None = 0.01
    melanoma_sensitivity_drop: float | None = None
    max_abs_diff: float | None = None
    # The input gate's refuse/accept decisions, converted vs float ``ood`` (export/gate.py).
    gate_agreement: float | None = 0.98

    @classmethod
    def for_mode(cls, mode: str) -> Tolerances:
        """Defaults; a float32 conversion must also match the Keras model numerically."""
        return cls(max_abs_diff=1e-3) if mode == "float32" else cls()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def with_overrides(self, items: list[str] | tuple[str, ...] | dict | None) -> Tolerances:
        """Apply ``NAME=VALUE`` strings (or a dict); ``VALUE`` may be ``none`` to disable."""
        if not items:
            return self
        pairs = items.items() if isinstance(items, dict) else [_split(s) for s in items]
        changes = {}
        for name, value in pairs:
            if name not in self.names():
                hint = difflib.get_close_matches(name, self.names(), n=1)
                raise ExportError(f"Unknown tolerance {name!r}"
                                  + (f"; did you mean {hint[0]!r}?" if hint else ".")
                                  + f" Known tolerances: {', '.join(self.names())}.")
            changes[name] = _parse_value(name, value)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {n: getattr(self, n) for n in self.names()}


def _split(item: str) -> tuple[str, str]:
    if "=" not in str(item):
        raise ExportError(f"A tolerance must look like NAME=VALUE (e.g. diagnosis_agreement=0.97); "
                          f"received {item!r}.")
    name, value = str(item).split("=", 1)
    return name.strip(), value.strip()


def _parse_value(name: str, value) -> float | None:
    if value is None or str(value).lower() in ("none", "off", ""):
        return None
    try:
        v = float(value)
    except ValueError:
        raise ExportError(f"The tolerance {name} must be a number or 'none'; received "
                          f"{value!r}.") from None
    if not 0 <= v <= 1:
        raise ExportError(f"The tolerance {name} must lie in [0, 1]; received {v}.")
    return v
