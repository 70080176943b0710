# ruff: noqa: E501  (the USAGE.md template holds Kotlin/Swift lines as they should read)
"""Writing the export bundle (docs/ARTIFACTS.md), atomically: temp dir next to --out, then rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


def threshold_text(thr: float) -> str:
    """The melanoma threshold for people: 4 significant digits (the card keeps the exact one)."""
    return f"{float(thr):.4g}"


def usage_md(card: dict) -> str:
    """USAGE.md: the input contract, then MediaPipe Tasks (Kotlin, Swift, Python, web), plain
    LiteRT and Android Studio ML Model Binding snippets, from the card's tensor details."""
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
    labels = ", ".join(card["heads"]["diagnosis"]["labels"])
    buf_kt = ("ByteBuffer.allocateDirect(1 * S * S * 3)" if in_dt != "float32"
              else "ByteBuffer.allocateDirect(4 * S * S * 3)")
    mq = ex["outputs"]["melanoma"]["quantization"]
    sc, zp = f"{mq['scale']:.8g}", mq["zero_point"]
    read_kt = {"float32": "melanoma.float",
               "uint8": f"{sc}f * ((melanoma.get().toInt() and 0xFF) - {zp})",
               "int8": f"{sc}f * (melanoma.get().toInt() - {zp})"}[ex["outputs"]["melanoma"]["dtype"]]
    read_sw = {"float32": "mel.data.withUnsafeBytes { $0.load(as: Float32.self) }",
               "uint8": f"Float({sc}) * (Float(mel.data[0]) - Float({zp}))",
               "int8": f"Float({sc}) * (Float(Int8(bitPattern: mel.data[0])) - Float({zp}))"
               }[ex["outputs"]["melanoma"]["dtype"]]
    patient = _patient_md(card.get("metadata_prior"))
    py_mp = (SNIPPETS / "mediapipe_classify.py").read_text().rstrip()
    metadata = (f"`TFLITE_METADATA` ({md.get('metadata_bytes', 0):,} bytes, written by "
                f"{md.get('writer', 'MediaPipe')}) and the label files "
                f"{', '.join(f'`{f}`' for f in md.get('associated_files', []))}, zipped after "
                "the flatbuffer" if md else "**no TFLite metadata** (exported before dermedge "
                "embedded it: re-export for MediaPipe Tasks and ML Model Binding)")
    return f"""# Using this model

`model.tflite` ({ex['mode']}, {ex['size_bytes']:,} bytes, sha256 `{ex['sha256'][:16]}…`) from run
`{card.get('name')}` ({card.get('backbone')}). Validation: **{
        'passed' if ex['validation'].get('passed') else 'FAILED' if ex['validation'].get('passed')
        is False else 'not run'}** (see `validation.md`).

The file carries TFLite Model Metadata: {metadata}. MediaPipe Tasks `ImageClassifier`
(Android, iOS, web, Python) and Android Studio's ML Model Binding read the heads, their labels
and the input normalisation from it; `python -m export inspect model.tflite` prints it all.

## Input contract

* Signature `{ex['signature']}`, one input named **`image`**, shape `[1, {s}, {s}, 3]`
  (`{img['dtype']}`): {feed}.
* Resize every photo like training did (`input.resize` = `{card['input'].get('resize')}`): apply
  EXIF orientation, convert to 8-bit RGB, crop the **centred square** of side min(width, height),
  resize to {s}×{s} with bilinear filtering. Normalisation happens **inside** the model.
  MediaPipe and ML Model Binding **stretch** the whole photo unless given that square: pass it
  as the region of interest (below), or crop the bitmap first.
* Outputs, **read them by name** (never by index: TFLite does not keep the Keras order); {deq}.
  The index is the subgraph's output order, MediaPipe's `headIndex`:

| index | output | dtype | shape | scale | zero point |
|---|---|---|---|---|---|
{outs}

* `melanoma[0]` = P(melanoma); call it positive when ≥ **{thr}** (`heads.melanoma.threshold`,
  also in the metadata's custom entry `dermedge`). MediaPipe applies one global score threshold
  to every head, so leave its `scoreThreshold` unset and compare in the app.
* `diagnosis[0]` = {k} probabilities in the order of `labels_diagnosis.txt`: {labels}.

## MediaPipe Tasks `ImageClassifier`

No pre- or post-processing code: heads come back by name (`melanoma`, `diagnosis`) with their
labels and dequantized scores. The only two lines the app adds are the centred-square region of
interest and the threshold. On pre-cropped {s}×{s} pixels MediaPipe's scores are LiteRT's; on a
larger photo they differ slightly, as MediaPipe resizes without antialiasing (dermedge's
benchmarks/tflite_metadata.md measures it; stretching the photo instead is further off).

### Kotlin (Android, `com.google.mediapipe:tasks-vision`)

```kotlin
val classifier = ImageClassifier.createFromOptions(context,
    ImageClassifier.ImageClassifierOptions.builder()
        .setBaseOptions(BaseOptions.builder().setModelAssetPath("model.tflite").build())
        .build())
// bitmap: upright RGB (ImageDecoder applies the EXIF orientation)
val w = bitmap.width; val h = bitmap.height; val side = minOf(w, h)
val left = (w - side) / 2; val top = (h - side) / 2
val roi = RectF(left / w.toFloat(), top / h.toFloat(), (left + side) / w.toFloat(), (top + side) / h.toFloat())
val result = classifier.classify(BitmapImageBuilder(bitmap).build(),
    ImageProcessingOptions.builder().setRegionOfInterest(roi).build())
val heads = result.classificationResult().classifications().associateBy {{ it.headName().get() }}
val pMelanoma = heads.getValue("melanoma").categories()[0].score()
val isMelanoma = pMelanoma >= {thr}f                      // the app applies the model's threshold
val diagnosis = heads.getValue("diagnosis").categories().maxBy {{ it.score() }}.categoryName()
```

### Swift (iOS, `MediaPipeTasksVision`)

```swift
let options = ImageClassifierOptions()
options.baseOptions.modelAssetPath = Bundle.main.path(forResource: "model", ofType: "tflite")!
let classifier = try ImageClassifier(options: options)
let image = try MPImage(uiImage: photo)               // keeps photo.imageOrientation
let w = Double(image.width), h = Double(image.height), side = min(w, h)
let roi = CGRect(x: floor((w - side) / 2) / w, y: floor((h - side) / 2) / h,
                 width: side / w, height: side / h)
let result = try classifier.classify(image: image, regionOfInterest: roi)
let heads = Dictionary(uniqueKeysWithValues:
    result.classificationResult.classifications.map {{ ($0.headName ?? "", $0.categories) }})
let pMelanoma = heads["melanoma"]![0].score
let isMelanoma = pMelanoma >= {thr}                      // the app applies the model's threshold
let diagnosis = heads["diagnosis"]!.max {{ $0.score < $1.score }}!.categoryName
```

### Python (`mediapipe`)

```python
{py_mp}
```

### Web (`@mediapipe/tasks-vision`)

```js
import {{ FilesetResolver, ImageClassifier }} from "@mediapipe/tasks-vision";
const vision = await FilesetResolver.forVisionTasks(
  "https://cdn.jsdelivr.net/npm/@mediapipe/tasks-vision@0.10.21/wasm");
const classifier = await ImageClassifier.createFromOptions(vision, {{
  baseOptions: {{ modelAssetPath: "model.tflite" }}, runningMode: "IMAGE" }});
const img = document.getElementById("photo");           // a loaded <img>
const w = img.naturalWidth, h = img.naturalHeight, side = Math.min(w, h);
const left = Math.floor((w - side) / 2), top = Math.floor((h - side) / 2);
const result = classifier.classify(img, {{ regionOfInterest:
  {{ left: left / w, top: top / h, right: (left + side) / w, bottom: (top + side) / h }} }});
const heads = Object.fromEntries(result.classifications.map(c => [c.headName, c.categories]));
const pMelanoma = heads.melanoma[0].score;
const isMelanoma = pMelanoma >= {thr};                   // the app applies the model's threshold
```

## Android Studio ML Model Binding

*File → New → Other → TensorFlow Lite Model* on `model.tflite` generates a class `Model` from
the metadata: `process(image: TensorImage)` (RGB, normalisation mean 0 / std 1 taken from the
metadata, the resize done for you) and one getter per head, named after the metadata:
`outputs.melanomaAsCategoryList` and `outputs.diagnosisAsCategoryList` (labels attached). Its
resize stretches the whole bitmap, so hand it the centred square:

```kotlin
val model = Model.newInstance(context)
val side = minOf(bitmap.width, bitmap.height)
val square = Bitmap.createBitmap(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side)
val outputs = model.process(TensorImage.fromBitmap(square))
val pMelanoma = outputs.melanomaAsCategoryList[0].score
val isMelanoma = pMelanoma >= {thr}f
val diagnosis = outputs.diagnosisAsCategoryList.maxBy {{ it.score }}.label
model.close()
```

## Plain LiteRT

For those who want the interpreter without MediaPipe: resize as the contract says, feed
`image`, read the outputs by name and dequantize them yourself.

### Kotlin (LiteRT `Interpreter`, signature runner)

```kotlin
val interpreter = Interpreter(FileUtil.loadMappedFile(context, "model.tflite"))
val S = {s}
val input = {buf_kt}.order(ByteOrder.nativeOrder())
// fill `input` with the centred-square, resized RGB pixels, row-major, R,G,B per pixel ({in_dt})
val melanoma = ByteBuffer.allocateDirect({1 if out_dt != 'float32' else 4}).order(ByteOrder.nativeOrder())
val diagnosis = ByteBuffer.allocateDirect({k if out_dt != 'float32' else 4 * k}).order(ByteOrder.nativeOrder())
interpreter.runSignature(mapOf("image" to input),
                         mapOf("melanoma" to melanoma, "diagnosis" to diagnosis), "{ex['signature']}")
melanoma.rewind()
val pMelanoma = {read_kt}{'' if out_dt == 'float32' else '   // real = scale * (q - zeroPoint)'}
val isMelanoma = pMelanoma >= {thr}f
```

### Swift (TensorFlowLite / LiteRT `SignatureRunner`)

```swift
let interpreter = try Interpreter(modelPath: Bundle.main.path(forResource: "model", ofType: "tflite")!)
let runner = try interpreter.signatureRunner(with: "{ex['signature']}")
try runner.allocateTensors()
try runner.invoke(with: ["image": pixels])   // Data: {s}x{s}x3 {in_dt} RGB, row-major
let mel = try runner.output(named: "melanoma")    // {ex['outputs']['melanoma']['dtype']}
let dx = try runner.output(named: "diagnosis")    // {out_dt}, {k} values
let pMelanoma = {read_sw}{'' if out_dt == 'float32' else '   // real = scale * (q - zeroPoint)'}
let isMelanoma = pMelanoma >= {thr}
```

### Python (ai-edge-litert, numpy, pillow only)

```bash
python run_bundle.py BUNDLE_DIR photo.jpg   # export/snippets/run_bundle.py in dermedge
```
{patient}"""


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
