"""``python -m export inspect BUNDLE_OR_TFLITE``: what a mobile developer needs to know of a file.

The input and outputs come from LiteRT (outputs in the subgraph's order, which is the order
MediaPipe and ML Model Binding use); the metadata from the flatbuffer and the zip of associated
files; whether MediaPipe Tasks loads it from MediaPipe itself (``ImageClassifier`` on one grey
image, in the pinned MediaPipe venv), when that environment exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.errors import BundleError


def model_path(target: str | Path) -> Path:
    """``target``'s .tflite: a bundle folder's model.tflite, or the file itself."""
    p = Path(target)
    if p.is_dir():
        p = p / "model.tflite"
        if not p.is_file():
            raise BundleError(f"{target} is a folder without model.tflite; pass an export bundle "
                              "folder or a .tflite file.")
    elif not p.is_file():
        raise BundleError(f"{target} does not exist; pass an export bundle folder or a .tflite "
                          "file.")
    return p


def _flatbuffer_metadata(data: bytes) -> dict[str, int]:
    """``{name: bytes}`` of the model's metadata entries (TFLITE_METADATA, ...)."""
    from ai_edge_litert import schema_py_generated as fb  # the schema, without TensorFlow

    from export.tflite_metadata import split_file

    flat = split_file(data)[0]
    model = fb.Model.GetRootAs(flat, 0)
    out = {}
    for i in range(model.MetadataLength()):
        m = model.Metadata(i)
        out[m.Name().decode()] = int(model.Buffers(m.Buffer()).DataLength())
    return out


def inspect_model(target: str | Path, *, mediapipe: bool = True) -> dict:
    """Everything ``inspect`` prints, as a dict (``--json``)."""
    from dermedge.litert import make_interpreter, signature_io
    from export.tflite_metadata import (
        MetadataError,
        mediapipe_classify,
        mediapipe_python,
        output_order,
        read_metadata,
        split_file,
    )

    path = model_path(target)
    data = path.read_bytes()
    io_ = signature_io(make_interpreter(data))
    order = output_order(data)
    try:
        meta_entries = _flatbuffer_metadata(data)
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises many types on bad bytes
        raise BundleError(f"Cannot read {path}'s flatbuffer ({type(exc).__name__}: {exc}); "
                          "re-export it.") from None
    _, files = split_file(data)
    packed = {name: payload.decode("utf-8", "replace").splitlines() for name, payload in files}
    info: dict = {"file": str(path), "size_bytes": len(data),
                  "inputs": io_["inputs"], "outputs": [], "metadata": {
                      "flatbuffer": meta_entries, "associated_files": sorted(packed)}}
    md = None
    if "TFLITE_METADATA" in meta_entries and mediapipe:
        try:
            md = read_metadata(path, python=mediapipe_python(create=False))["metadata"]
        except MetadataError as exc:
            info["metadata"]["read"] = f"not read: {exc}"
    tensors = (md or {}).get("subgraph_metadata", [{}])[0].get("output_tensor_metadata", [])
    for i, name in enumerate(order):
        out = {"index": i, "name": name, **io_["outputs"][name]}
        files_ = [f["name"] for f in (tensors[i].get("associated_files", []) if i < len(tensors)
                                      else [])]
        label_file = next((f for f in files_ if f in packed), f"labels_{name}.txt")
        out["metadata_name"] = tensors[i].get("name") if i < len(tensors) else None
        out["label_file"] = label_file if label_file in packed else None
        out["labels"] = packed.get(label_file)
        info["outputs"].append(out)
    if md is not None:
        sub = md["subgraph_metadata"][0]
        image = (sub.get("input_tensor_metadata") or [{}])[0]
        units = image.get("process_units") or [{}]
        custom = {c["name"]: _custom(c) for c in sub.get("custom_metadata") or []}
        info["metadata"].update(
            {k: md.get(k) for k in ("name", "version", "description", "author", "license",
                                    "min_parser_version")},
            input={"name": image.get("name"),
                   "color_space": image.get("content", {}).get("content_properties", {})
                   .get("color_space"),
                   "normalization": units[0].get("options")},
            custom=custom)
    info["mediapipe"] = _mediapipe_check(path, info, mediapipe, mediapipe_classify,
                                         mediapipe_python, MetadataError)
    return info


def _custom(entry: dict):
    try:
        return json.loads(bytes(entry.get("data") or []).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{len(entry.get('data') or [])} bytes"


def _mediapipe_check(path, info, enabled, classify, find_python, error) -> dict:
    """Whether MediaPipe Tasks' ImageClassifier loads ``path`` and names its heads."""
    problems = []
    if "TFLITE_METADATA" not in info["metadata"]["flatbuffer"]:
        problems.append("no TFLITE_METADATA: MediaPipe returns unnamed heads without labels "
                        "(re-export with this dermedge)")
    shape = info["inputs"]["image"]["shape"] if "image" in info["inputs"] else None
    if shape and shape[0] != 1:
        problems.append(f"input batch is {shape[0]}, MediaPipe needs 1")
    for o in info["outputs"]:
        if o["labels"] is None:
            problems.append(f"output {o['name']!r} has no label file")
    result = {"static_problems": problems, "loads": None}
    if not enabled:
        result["loads"] = "not checked (--no-mediapipe)"
        return result
    try:
        py = find_python(create=False)
    except error as exc:
        result["loads"] = f"not checked: {str(exc).split('. ')[0]} (`python -m export " \
                          "metadata-setup` creates it)"
        return result
    s = shape[1] if shape else 224
    try:
        heads = classify(path, [np.full((s, s, 3), 128, np.uint8)], python=py)[0]
    except error as exc:
        result["loads"] = False
        result["error"] = str(exc)
        return result
    result["loads"] = True
    result["heads"] = {n: len(h["labels"]) for n, h in heads.items()}
    result["named_heads"] = all(n for n in heads) and set(heads) == {o["name"]
                                                                    for o in info["outputs"]}
    return result


def _q(d: dict) -> str:
    q = d["quantization"]
    return ("none" if np.dtype(d["dtype"]).kind == "f" else
            f"scale {q['scale']:.8g}, zero point {q['zero_point']}")


def format_inspect(info: dict) -> str:
    """The human-readable report."""
    lines = [f"{info['file']} ({info['size_bytes']:,} bytes)", "", "input (serving_default):"]
    for name, d in info["inputs"].items():
        lines.append(f"  {name}: {d['dtype']} {d['shape']}, quantization {_q(d)}")
    lines += ["", "outputs, in subgraph order (MediaPipe's head index):"]
    for o in info["outputs"]:
        labels = ("no labels" if o["labels"] is None else
                  f"{o['label_file']}: {', '.join(o['labels'])}")
        lines.append(f"  {o['index']} {o['name']}: {o['dtype']} {o['shape']}, quantization "
                     f"{_q(o)}; {labels}")
    m = info["metadata"]
    lines += ["", "metadata:"]
    lines.append("  flatbuffer: " + ", ".join(f"{k} ({v:,} B)" for k, v in m["flatbuffer"].items())
                 if m["flatbuffer"] else "  flatbuffer: none")
    lines.append("  associated files: " + (", ".join(m["associated_files"]) or "none"))
    for k in ("name", "version", "author", "license", "min_parser_version"):
        if m.get(k):
            lines.append(f"  {k}: {m[k]}")
    if m.get("input"):
        lines.append(f"  image input: {m['input']['color_space']}, normalization "
                     f"{json.dumps(m['input']['normalization'])}")
    for name, payload in (m.get("custom") or {}).items():
        lines.append(f"  custom {name!r}: {json.dumps(payload, sort_keys=True)}")
    if m.get("read"):
        lines.append(f"  {m['read']}")
    mp = info["mediapipe"]
    lines += ["", "MediaPipe Tasks ImageClassifier:"]
    for p in mp["static_problems"]:
        lines.append(f"  problem: {p}")
    if mp["loads"] is True:
        heads = ", ".join(f"{n or '(unnamed)'} ({k} labels)" for n, k in mp["heads"].items())
        lines.append(f"  loads: yes; heads {heads}")
    elif mp["loads"] is False:
        lines.append(f"  loads: NO ({mp.get('error')})")
    else:
        lines.append(f"  loads: {mp['loads']}")
    return "\n".join(lines)

