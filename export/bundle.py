"""Writing the export bundle (docs/ARTIFACTS.md) atomically (a temp dir beside --out, then a
rename), and its USAGE.md from the templates in export/snippets/."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from dermedge.files import replace_dir
from dermedge.labels import INPUT_NAME

BUNDLE_FILES: tuple[str, ...] = ("model.tflite", "labels_diagnosis.txt", "labels_melanoma.txt",
                                 "model_card.json", "validation.json", "validation.md", "USAGE.md")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _patient_md(prior: dict | None) -> str:
    """The USAGE.md paragraph on the card's metadata tables (``trainer metadata``), if any."""
    if not prior:
        return ""
    m = prior.get("metrics") or {}
    measured = "" if not m else (
        f" On the run's validation split they moved balanced accuracy "
        f"{m['val_image_only']['balanced_accuracy']:.3f} → {m['val']['balanced_accuracy']:.3f} "
        f"and melanoma AUC {m['val_image_only']['melanoma_auc']:.3f} → "
        f"{m['val']['melanoma_auc']:.3f}.")
    return f"""
## Patient metadata (optional)

When the app knows the patient's age, sex or body site, `model_card.json → metadata_prior` holds
naive-Bayes tables ({', '.join(prior['fields'])}; counted on the training split) that update the
answer: add `{prior['weight']:g} × log_likelihood[value]` of each known field to the log of
`diagnosis` and renormalise, update the melanoma odds the same way, then compare P(melanoma)
with **{prior['melanoma_threshold']:.4g}** (`metadata_prior.melanoma_threshold`) instead.
Missing or unknown fields change nothing; the formula is in dermedge's docs/ARTIFACTS.md
(`metadata_prior`).{measured}
"""


SNIPPETS = Path(__file__).with_name("snippets")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def threshold_text(thr: float) -> str:
    """The melanoma threshold for people: 4 significant digits (the card keeps the exact one)."""
    return f"{float(thr):.4g}"


def render(template: str, **values) -> str:
    """``export/snippets/TEMPLATE`` with each ``{{name}}`` replaced by ``values[name]``; every
    placeholder needs a value and every value a placeholder."""
    text = (SNIPPETS / template).read_text()
    wanted = set(PLACEHOLDER.findall(text))
    if wanted != set(values):
        raise ValueError(f"{template}: placeholders {sorted(wanted)} but values for "
                         f"{sorted(values)}")
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def usage_md(card: Mapping) -> str:
    """USAGE.md: the input contract, then MediaPipe Tasks (Kotlin, Swift, Python, web), plain
    LiteRT and Android Studio ML Model Binding snippets, from the card's tensor details. The
    text and the code are templates in export/snippets/."""
    ex = card["export"]
    img = ex["inputs"][INPUT_NAME]
    s = card["input"]["shape"][0]
    k = len(card["heads"]["diagnosis"]["labels"])
    thr = threshold_text(card["heads"]["melanoma"]["threshold"])
    in_dt = img["dtype"]
    out_dt = ex["outputs"]["diagnosis"]["dtype"]
    q = img["quantization"]
    if in_dt == "float32":
        feed = "float32 RGB values 0–255 exactly as the camera gives them (no normalisation)"
    elif in_dt == "uint8" and abs(q["scale"] - 1) < 1e-6 and q["zero_point"] == 0:
        feed = "uint8 RGB pixels 0–255 exactly as the camera gives them (scale 1, zero point 0)"
    else:
        feed = (f"{in_dt}: q = round(pixel / {q['scale']:.8g} + {q['zero_point']}) clipped to "
                f"the {in_dt} range")
    deq = ("they are float32 probabilities" if out_dt == "float32" else
           f"they are {out_dt}: real = scale × (q − zero_point) with the scale/zero point below")
    md = ex.get("metadata") or {}
    order = md.get("output_order") or list(ex["outputs"])
    outs = "\n".join(
        f"| {order.index(n) if n in order else '?'} | `{n}` | {o['dtype']} | {o['shape']} | "
        f"{o['quantization']['scale']:.8g} | {o['quantization']['zero_point']} |"
        for n, o in sorted(ex["outputs"].items(),
                           key=lambda kv: order.index(kv[0]) if kv[0] in order else 9))
    mq = ex["outputs"]["melanoma"]["quantization"]
    sc, zp = f"{mq['scale']:.8g}", mq["zero_point"]
    mel_dt = ex["outputs"]["melanoma"]["dtype"]
    comment = "" if out_dt == "float32" else "   // real = scale * (q - zeroPoint)"
    metadata = (f"`TFLITE_METADATA` ({md.get('metadata_bytes', 0):,} bytes, written by "
                f"{md.get('writer', 'MediaPipe')}) and the label files "
                f"{', '.join(f'`{f}`' for f in md.get('associated_files', []))}, zipped after "
                "the flatbuffer" if md else "**no TFLite metadata** (exported before dermedge "
                "embedded it: re-export for MediaPipe Tasks and ML Model Binding)")
    passed = ex["validation"].get("passed")
    code = {
        "mediapipe_classify_kt": render("mediapipe_classify.kt", threshold=thr),
        "mediapipe_classify_swift": render("mediapipe_classify.swift", threshold=thr),
        "mediapipe_classify_js": render("mediapipe_classify.js", threshold=thr),
        "model_binding_kt": render("model_binding.kt", threshold=thr),
        "litert_runner_kt": render(
            "litert_runner.kt", size=s, threshold=thr, input_dtype=in_dt,
            signature=ex["signature"], dequantize_comment=comment,
            input_buffer_kotlin=("ByteBuffer.allocateDirect(1 * S * S * 3)" if in_dt != "float32"
                                 else "ByteBuffer.allocateDirect(4 * S * S * 3)"),
            melanoma_bytes=1 if out_dt != "float32" else 4,
            diagnosis_bytes=k if out_dt != "float32" else 4 * k,
            read_melanoma_kotlin={
                "float32": "melanoma.float",
                "uint8": f"{sc}f * ((melanoma.get().toInt() and 0xFF) - {zp})",
                "int8": f"{sc}f * (melanoma.get().toInt() - {zp})"}[mel_dt]),
        "litert_runner_swift": render(
            "litert_runner.swift", size=s, threshold=thr, input_dtype=in_dt,
            signature=ex["signature"], dequantize_comment=comment, melanoma_dtype=mel_dt,
            output_dtype=out_dt, n_classes=k,
            read_melanoma_swift={
                "float32": "mel.data.withUnsafeBytes { $0.load(as: Float32.self) }",
                "uint8": f"Float({sc}) * (Float(mel.data[0]) - Float({zp}))",
                "int8": f"Float({sc}) * (Float(Int8(bitPattern: mel.data[0])) - Float({zp}))",
            }[mel_dt]),
    }
    return render(
        "USAGE.md", **code, mode=ex["mode"], size_bytes=f"{ex['size_bytes']:,}",
        sha256_prefix=ex["sha256"][:16], run_name=card.get("name"), backbone=card.get("backbone"),
        validation="passed" if passed else "FAILED" if passed is False else "not run",
        metadata=metadata, signature=ex["signature"], size=s, input_dtype=in_dt, feed=feed,
        resize=card["input"].get("resize"), dequantize=deq, outputs_table=outs, threshold=thr,
        n_classes=k, labels=", ".join(card["heads"]["diagnosis"]["labels"]),
        python_mediapipe=(SNIPPETS / "mediapipe_classify.py").read_text().rstrip(),
        patient=_patient_md(card.get("metadata_prior")))


def write_bundle(out: Path, files: dict[str, bytes | str], *, overwrite: bool = True) -> Path:
    """Write ``files`` into a temp dir next to ``out`` and rename it into place."""
    out = Path(out).resolve()
    if out.exists():
        if not out.is_dir():
            from export.errors import ExportError

            raise ExportError(f"--out {out} is a file; pass a folder path for the bundle.")
        if any(out.iterdir()) and not (out / "model_card.json").is_file():
            from export.errors import ExportError

            raise ExportError(f"--out {out} is a non-empty folder that is not an export bundle; "
                              "refusing to replace it. Pass a new or empty folder.")
        if not overwrite:
            from export.errors import ExportError

            raise ExportError(f"--out {out} already exists; remove it or pass another folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_default) + "\n"


def _default(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
