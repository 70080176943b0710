"""TFLite Model Metadata in every exported ``.tflite``, written by MediaPipe's metadata writer.

MediaPipe Tasks (``ImageClassifier`` on Android, iOS, web and Python) and Android Studio's ML
Model Binding read a model's heads, labels and input normalisation from the ``TFLITE_METADATA``
buffer and the label files zipped after the flatbuffer. MediaPipe's generic
``metadata_writer.MetadataWriter`` (the maintained writer; mediapipe 0.10.21, as 1.x's does not
import) needs numpy<2, so it runs in its own pinned venv (:func:`mediapipe_python`, created
under ``$DERMEDGE_CACHE`` on first use, as export/qat.py isolates tfmot) through
export/tflite_metadata_worker.py. This module is the core side:

* it describes the heads in the subgraph's output order (not the signature's) with one label
  file each (``labels_melanoma.txt``, ``labels_diagnosis.txt``: the writer's default
  ``labels.txt`` would collide);
* it takes MediaPipe's metadata buffer and label files and puts them into the export's own
  flatbuffer (read and written with TensorFlow's schema, re-compacted when the export was
  compacted: MediaPipe's populator re-serialises the model and would undo compaction);
* it appends the label files as a zip with fixed timestamps and modes, so two exports of a
  model are byte-identical, and checks that the file still gives bit-identical outputs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from dermedge.labels import HEADS, OOD, OOD_LABELS
from export.errors import ExportError
from export.venvs import PinnedVenv

ENV_VAR = "DERMEDGE_MEDIAPIPE_PYTHON"
# Installed with --no-deps: MediaPipe's own requirements add jax, sounddevice and the GUI
# OpenCV, none of which the metadata writer or the ImageClassifier use.
MEDIAPIPE_REQUIREMENTS: tuple[str, ...] = (
    "mediapipe==0.10.21", "numpy==1.26.4", "flatbuffers==25.2.10", "absl-py==2.1.0",
    "protobuf==4.25.8", "attrs==25.3.0", "opencv-contrib-python-headless==4.10.0.84",
    "matplotlib==3.9.4", "contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.69.1",
    "kiwisolver==1.5.1", "packaging==26.4", "pillow==13.0.0", "pyparsing==3.3.3",
    "python-dateutil==4.0.0", "tzdata==2026.6")
METADATA_NAME = "TFLITE_METADATA"
CUSTOM_NAME = "dermedge"  # the subgraph's custom metadata entry: threshold + preprocessing
LABEL_FILES = {name: f"labels_{name}.txt" for name in (*HEADS, OOD)}
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: reproducible bytes
NORM_MEAN, NORM_STD = [0.0], [1.0]  # the model takes RGB 0-255; normalisation is in the graph
WORKER = Path(__file__).with_name("tflite_metadata_worker.py")


class MetadataError(ExportError):
    """TFLite metadata cannot be written or read (no MediaPipe environment, a bad file)."""


# ----------------------------------------------------------------------------- environment
def env_dir() -> Path:
    """The cached MediaPipe venv: keyed by the Python version and the pinned requirements."""
    return MEDIAPIPE_ENV.directory()


def setup_hint() -> str:
    reqs = " ".join(f'"{r}"' for r in MEDIAPIPE_REQUIREMENTS)
    return (f"Metadata is written by MediaPipe's metadata writer in its own Python environment "
            f"(mediapipe 0.10.21 needs numpy<2, about 400 MB). It is created on the first export "
            f"(cached in {env_dir()}) and needs PyPI access once; create it ahead with "
            f"`python -m export metadata-setup`, or make one yourself with `python3.11 -m venv "
            f"VENV && VENV/bin/pip install --no-deps {reqs}` and set {ENV_VAR}=VENV/bin/python.")


MEDIAPIPE_ENV = PinnedVenv("MediaPipe", "mediapipe", MEDIAPIPE_REQUIREMENTS, ENV_VAR,
                           MetadataError, setup_hint, no_deps=True, pip_timeout=1200)


def mediapipe_python(*, create: bool = True, log=None) -> Path:
    """The MediaPipe interpreter: ``$DERMEDGE_MEDIAPIPE_PYTHON``, else the cached venv (built
    here on first use when ``create``)."""
    value = os.environ.get(ENV_VAR)
    if value:
        return MEDIAPIPE_ENV.explicit_python(value, ENV_VAR)
    py = MEDIAPIPE_ENV.cached_python()
    if py is not None:
        return py
    if not create:
        raise MetadataError(f"No MediaPipe environment found. {setup_hint()}")
    return setup_env(log=log)


def setup_env(base_python: str | os.PathLike | None = None, *, force: bool = False,
              log=None) -> Path:
    """Build (or reuse) the cached MediaPipe venv; returns its python. Built aside, then renamed."""
    return MEDIAPIPE_ENV.build(base_python, force=force, log=log)


def run_worker(mode: str, spec: dict, workdir: Path, *, python: Path | None = None,
               log=None, timeout: int = 300) -> None:
    """Run export/tflite_metadata_worker.py ``mode`` on ``spec`` in the MediaPipe venv."""
    exe = python or mediapipe_python(log=log)
    path = workdir / f"{mode}.json"
    path.write_text(json.dumps(spec))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONNOUSERSITE": "1", "GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        proc = subprocess.run([str(exe), str(WORKER), mode, str(path)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=workdir, check=False)
    except subprocess.TimeoutExpired:
        raise MetadataError(f"MediaPipe's {mode} step did not finish in {timeout} s.") from None
    if proc.returncode:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-800:]
        raise MetadataError(f"MediaPipe's {mode} step failed ({exe}): {tail}")


# ----------------------------------------------------------------------------- the file
def output_order(tflite: bytes) -> list[str]:
    """The signature's output names in the subgraph's output order (what metadata follows)."""
    from dermedge.labels import SIGNATURE
    from dermedge.litert import make_interpreter

    interp = make_interpreter(tflite)
    by_index = {d["index"]: name for name, d in
                interp.get_signature_runner(SIGNATURE).get_output_details().items()}
    return [by_index[d["index"]] for d in interp.get_output_details()]


def preprocessing(size: int) -> dict:
    """The image contract in words and numbers, as the custom metadata carries it."""
    return {"crop": "centred square of side min(width, height), offsets ((w - s) // 2, "
                    "(h - s) // 2), after EXIF orientation, 8-bit RGB",
            "resize": f"bilinear to {size}x{size}", "pixels": "RGB 0-255, no normalisation "
            "(it is inside the model)", "region_of_interest": "pass the centred square as the "
            "region of interest: MediaPipe and ML Model Binding otherwise stretch the whole photo"}


def metadata_spec(card: dict, mode: str, order: list[str]) -> dict:
    """What the writer embeds: general fields from the card, the input, the heads in ``order``."""
    heads = card["heads"]
    thr = float(heads["melanoma"]["threshold"])
    size = int(card["input"]["shape"][0])
    data = card.get("data") or {}
    licence = card.get("license") or (
        "Trained on HAM10000 (CC BY-NC 4.0, Tschandl et al. 2018): non-commercial use, with "
        "attribution" if "ham10000" in f"{data.get('layout')} {data.get('source')}".lower()
        else "See model_card.json")
    versions = card.get("versions") or {}
    gate = card.get("gate") or {}
    ood_max = (gate.get("thresholds") or {}).get("ood_max")
    desc = {"melanoma": f"P(melanoma). MediaPipe applies one global score threshold: the app "
                        f"calls it positive when score >= {round(thr, 4):g} (the model's "
                        f"threshold, custom metadata '{CUSTOM_NAME}').",
            "diagnosis": f"{len(heads['diagnosis']['labels'])} diagnosis probabilities: "
                         + ", ".join(heads["diagnosis"]["labels"]) + ".",
            "ood": "The input gate's atypicality in [0, 1]: how far the photo's features lie "
                   "from the dermoscopy photos the model was trained on. Not a diagnosis: "
                   "refuse the photo (ask for a retake, show no diagnosis) when it is > "
                   + (f"{ood_max:g}" if ood_max is not None else "the card's gate.thresholds."
                      "ood_max") + f" (custom metadata '{CUSTOM_NAME}' -> gate, with the photo"
                   " quality checks)."}
    labels = {"melanoma": list(heads["melanoma"]["labels"]),
              "diagnosis": list(heads["diagnosis"]["labels"]),
              "ood": list((gate.get("ood") or {}).get("labels") or OOD_LABELS)}
    custom = {"melanoma_threshold": round(thr, 6), "heads": order, "input_size": size,
              "preprocessing": preprocessing(size)}
    if gate.get("thresholds"):
        custom["gate"] = {"thresholds": gate["thresholds"], "params": gate.get("params"),
                          "output": OOD if OOD in order else None,
                          "rules": "a photo is refused when side < min_side, mean_luma <"
                                   " mean_luma_min, dark_share > dark_share_max,"
                                   " clipped_share > clipped_share_max, sharpness <"
                                   " sharpness_min or ood > ood_max (dermedge docs/MOBILE.md)"}
    return {
        "general": {
            "name": str(card.get("name") or "dermedge"),
            "version": f"{card.get('created', '')} ({mode}, dermedge "
                       f"{versions.get('dermedge', '?')})".strip(),
            "description": (f"{card.get('backbone')} skin-lesion classifier ({mode}): P(melanoma) "
                            f"and the diagnosis. Input: the centred square of the photo, RGB "
                            f"0-255, {size}x{size}. Research use, not a medical device."),
            "author": str(card.get("author") or "dermedge (python -m export tflite)"),
            "license": licence},
        "input": {"name": "image", "norm_mean": NORM_MEAN, "norm_std": NORM_STD,
                  "description": f"RGB photo: the centred square, resized to {size}x{size}; "
                                 "pixels 0-255."},
        "outputs": [{"name": name, "description": desc[name],
                     "labels": labels[name], "label_file": LABEL_FILES[name]}
                    for name in order],
        "custom": {"name": CUSTOM_NAME, "data": custom},
    }


def split_file(data: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """``(flatbuffer, [(name, bytes) of the zipped associated files, in order])``."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data, []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        start = min(i.header_offset for i in infos)
        return data[:start], [(i.filename, zf.read(i)) for i in infos]


def append_zip(flatbuffer: bytes, files: list[tuple[str, bytes]]) -> bytes:
    """``flatbuffer`` followed by ``files`` stored as a zip with fixed timestamps and modes."""
    buf = io.BytesIO(flatbuffer)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_STORED) as zf:
        for name, payload in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.create_system, info.external_attr = 3, 0o644 << 16
            zf.writestr(info, payload)
    return buf.getvalue()


def metadata_buffer(tflite: bytes) -> bytes | None:
    """The ``TFLITE_METADATA`` buffer of a .tflite file, or None."""
    from ai_edge_litert import schema_py_generated as fb  # the schema, without TensorFlow

    model = fb.Model.GetRootAs(split_file(tflite)[0], 0)  # read lazily: no full unpack
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name().decode() == METADATA_NAME:
            return model.Buffers(meta.Buffer()).DataAsNumpy().tobytes()
    return None


def _insert(tflite: bytes, metadata: bytes, compacted: bool) -> bytes:
    """``tflite`` with its ``TFLITE_METADATA`` buffer set, written as compact.py writes it."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from export.compact import _TFLITE_FILE_IDENTIFIER, _builder_class

    model = fbu.read_model_from_bytearray(bytearray(tflite))
    buf = fbu.schema_fb.BufferT()
    buf.data = np.frombuffer(metadata, np.uint8)
    model.metadata = [m for m in (model.metadata or []) if m.name.decode() != METADATA_NAME]
    model.buffers.append(buf)
    entry = fbu.schema_fb.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata.append(entry)
    if not compacted:
        return bytes(fbu.convert_object_to_bytearray(model))
    builder = _builder_class()(max(1024, len(tflite) + len(metadata)))
    builder.Finish(model.Pack(builder), file_identifier=_TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def embed(tflite: bytes, card: dict, mode: str, images: np.ndarray, *, compacted: bool,
          log=None, python: Path | None = None) -> tuple[bytes, dict]:
    """``(tflite with TFLite Model Metadata and its label files, report)``; outputs unchanged."""
    from export.compact import same_outputs

    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    order = output_order(tflite)
    spec = metadata_spec(card, mode, order)
    with tempfile.TemporaryDirectory(prefix="dermedge-metadata-") as tmp:
        work = Path(tmp)
        (work / "model.tflite").write_bytes(tflite)
        run_worker("write", {**spec, "model": str(work / "model.tflite"),
                             "out": str(work / "out.tflite"), "out_json": str(work / "out.json")},
                   work, python=python, log=say)
        written = (work / "out.tflite").read_bytes()
        meta_json = json.loads((work / "out.json").read_text())
    metadata = metadata_buffer(written)
    _, files = split_file(written)
    if metadata is None or sorted(n for n, _ in files) != sorted(LABEL_FILES[o] for o in order):
        raise MetadataError(f"MediaPipe's writer returned no {METADATA_NAME} or other label files "
                            f"({[n for n, _ in files]}); this is a bug in dermedge's export.")
    files = sorted(files, key=lambda f: [o["label_file"] for o in spec["outputs"]].index(f[0]))
    out = append_zip(_insert(tflite, metadata, compacted), files)
    ok, why = same_outputs(tflite, out, images[:2])
    if not ok:
        raise MetadataError(f"Embedding the metadata changed the model ({why}). This is a bug in "
                            "dermedge's export: please report it with the run's model_card.json.")
    report = {"format": METADATA_NAME, "writer": "mediapipe 0.10.21 metadata_writer.MetadataWriter",
              "min_parser_version": meta_json.get("min_parser_version"),
              "output_order": order, "associated_files": [n for n, _ in files],
              "custom": spec["custom"], "metadata_bytes": len(metadata),
              "size_before": len(tflite), "size_after": len(out),
              "mediapipe_repacked_size": len(written), "recompacted": compacted,
              "seconds": round(time.perf_counter() - t0, 2)}
    say(f"metadata: {METADATA_NAME} ({len(metadata):,} bytes) and "
        f"{', '.join(report['associated_files'])}; heads in subgraph order {order}")
    return out, report


def with_metadata(conv, card: dict, images: np.ndarray, log=None, python: Path | None = None):
    """``conv`` (export/convert.py's Converted) with metadata embedded; the report lands in
    ``conv.checks["metadata"]`` (validation.json) for the card's ``export.metadata``."""
    compacted = bool((conv.compaction or {}).get("applied"))
    tflite, report = embed(conv.tflite, card, conv.mode, images, compacted=compacted, log=log,
                           python=python)
    return replace(conv, tflite=tflite, checks={**conv.checks, "metadata": report})


# ----------------------------------------------------------------------------- consumers
def centred_square_roi(width: int, height: int) -> tuple[float, float, float, float]:
    """The image contract's crop (dermedge.image.crop_box) as a normalised region of interest
    ``(left, top, right, bottom)``, what MediaPipe's ImageProcessingOptions takes."""
    from dermedge.image import crop_box

    left, top, right, bottom = crop_box(width, height)
    return left / width, top / height, right / width, bottom / height


def mediapipe_classify(model: str | Path, images, *, roi: bool = False, log=None,
                       python: Path | None = None) -> list[dict[str, dict]]:
    """MediaPipe Tasks ``ImageClassifier`` (Python API, in the MediaPipe venv) on ``images``
    (uint8 RGB arrays or photo paths): per image ``{head name: {"index", "labels", "scores"}}``
    in MediaPipe's head order, categories in label order. ``roi``: the centred square."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="dermedge-mediapipe-") as tmp:
        work = Path(tmp)
        items = []
        for i, item in enumerate(images):
            if isinstance(item, np.ndarray):
                np.save(work / f"{i}.npy", np.ascontiguousarray(item, np.uint8))
                entry, size = {"npy": str(work / f"{i}.npy")}, (item.shape[1], item.shape[0])
            else:
                entry = {"path": str(Path(item).resolve())}
                with Image.open(item) as im:
                    size = im.size
            if roi:
                entry["roi"] = list(centred_square_roi(*size))
            items.append(entry)
        run_worker("classify", {"model": str(Path(model).resolve()), "images": items,
                                "out": str(work / "out.json")}, work, python=python, log=log)
        rows = json.loads((work / "out.json").read_text())
    return [{h["name"]: {"index": h["index"], "labels": [c[1] for c in h["categories"]],
                         "scores": np.array([c[2] for c in h["categories"]], np.float32)}
             for h in row} for row in rows]


def read_metadata(model: str | Path, *, log=None, python: Path | None = None) -> dict:
    """MediaPipe's ``MetadataDisplayer`` on ``model``: ``{"metadata": the metadata as JSON,
    "associated_files": [names]}``; raises MetadataError when the file has none."""
    with tempfile.TemporaryDirectory(prefix="dermedge-metadata-") as tmp:
        work = Path(tmp)
        run_worker("read", {"model": str(Path(model).resolve()), "out": str(work / "out.json")},
                   work, python=python, log=log)
        return json.loads((work / "out.json").read_text())
