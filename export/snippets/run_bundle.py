"""Run an export bundle on images with only ai-edge-litert, numpy and pillow.

    python run_bundle.py BUNDLE_DIR IMAGE [IMAGE ...]      # prints JSON, one object per image

Reads model_card.json, resizes each photo as the card says (EXIF → RGB → centred square crop →
bilinear resize), feeds the signature input ``image`` and reads the outputs by name,
dequantizing integer outputs. Standalone: copy it next to your bundle.
"""

import json
import sys
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image, ImageOps


def load_image(path, size):
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(im, dtype=np.uint8)


def to_input(pixels, info):
    dtype = np.dtype(info["dtype"])
    if dtype == np.float32:
        return pixels.astype(np.float32)
    scale, zero = info["quantization"]["scale"], info["quantization"]["zero_point"]
    q = np.round(pixels.astype(np.float32) / scale + zero)
    return np.clip(q, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


def from_output(values, info):
    if np.dtype(info["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero = info["quantization"]["scale"], info["quantization"]["zero_point"]
    return scale * (values.astype(np.float32) - zero)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    bundle = Path(argv[0])
    card = json.loads((bundle / "model_card.json").read_text(encoding="utf-8"))
    ex = card["export"]
    size = int(card["input"]["shape"][0])
    labels = card["heads"]["diagnosis"]["labels"]
    threshold = float(card["heads"]["melanoma"]["threshold"])
    interp = Interpreter(model_path=str(bundle / "model.tflite"))
    runner = interp.get_signature_runner(ex["signature"])
    for path in argv[1:]:
        x = to_input(load_image(path, size)[None], ex["inputs"]["image"])
        out = runner(image=x)
        mel = float(from_output(out["melanoma"], ex["outputs"]["melanoma"]).reshape(-1)[0])
        dx = from_output(out["diagnosis"], ex["outputs"]["diagnosis"]).reshape(-1)
        print(json.dumps({"image": str(path), "melanoma": mel,
                          "melanoma_positive": mel >= threshold,
                          "diagnosis": {lab: float(p) for lab, p in zip(labels, dx, strict=True)},
                          "top": labels[int(np.argmax(dx))]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
