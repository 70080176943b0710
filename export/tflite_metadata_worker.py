"""Runs in the pinned MediaPipe environment (export/tflite_metadata.py), never in the core venv.

``python tflite_metadata_worker.py write SPEC.json``: MediaPipe's generic
``metadata_writer.MetadataWriter`` writes TFLite Model Metadata into SPEC's model (one image
input, one classification output per head in subgraph output order, each head with its own
label file, and a custom ``dermedge`` entry); writes the populated file and its metadata JSON.

``python tflite_metadata_worker.py read SPEC.json``: MediaPipe's ``MetadataDisplayer`` reads the
metadata back as JSON, with the packed file names.

``python tflite_metadata_worker.py classify SPEC.json``: MediaPipe Tasks ``ImageClassifier``
(Python API) classifies SPEC's images, optionally with a region of interest, and writes every
head's categories; the consumer check of ``python -m export inspect`` and of the tests.

Only the standard library and mediapipe (numpy 1.x) are imported: not dermedge.
"""

from __future__ import annotations

import json
import os
import sys


class _Custom:
    """A ``CustomMetadata`` entry holding UTF-8 JSON bytes (MediaPipe keeps it, unread)."""

    def __init__(self, name: str, payload: dict):
        self.name, self.payload = name, payload

    def create_metadata(self):
        from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

        md = fb.CustomMetadataT()
        md.name = self.name
        md.data = list(json.dumps(self.payload, sort_keys=True).encode())
        return md


def write(spec: dict) -> None:
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer as mw

    with open(spec["model"], "rb") as f:
        writer = mw.MetadataWriter.create(bytearray(f.read()))
    g = spec["general"]
    # add_general_info() takes name and description only; GeneralMd also carries the version,
    # author and licence fields of the schema.
    writer._general_md = metadata_info.GeneralMd(  # noqa: SLF001
        name=g["name"], version=g["version"], description=g["description"],
        author=g["author"], licenses=g["license"])
    inp = spec["input"]
    writer.add_image_input(norm_mean=inp["norm_mean"], norm_std=inp["norm_std"],
                           color_space_type=mw.metadata_fb.ColorSpaceType.RGB,
                           name=inp["name"], description=inp["description"])
    for head in spec["outputs"]:  # already in the subgraph's output order
        writer.add_classification_output(
            mw.Labels().add(head["labels"], exported_filename=head["label_file"]),
            name=head["name"], description=head["description"])
    writer.add_custom_metadata(_Custom(spec["custom"]["name"], spec["custom"]["data"]))
    model, meta_json = writer.populate()
    with open(spec["out"], "wb") as f:
        f.write(model)
    with open(spec["out_json"], "w") as f:
        f.write(meta_json)


def classify(spec: dict) -> None:
    import mediapipe as mp
    import numpy as np
    from mediapipe.tasks import python as mp_tasks
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.components.containers import rect

    opts = vision.ImageClassifierOptions(
        base_options=mp_tasks.BaseOptions(model_asset_path=spec["model"]),
        max_results=-1, score_threshold=0.0)
    rows = []
    with vision.ImageClassifier.create_from_options(opts) as classifier:
        for item in spec["images"]:
            if "npy" in item:
                data = np.ascontiguousarray(np.load(item["npy"]).astype(np.uint8))
                image = mp.Image(image_format=mp.ImageFormat.SRGB, data=data)
            else:
                image = mp.Image.create_from_file(item["path"])
            roi = item.get("roi")
            ctx = (None if roi is None else vision.ImageProcessingOptions(
                region_of_interest=rect.Rect(left=roi[0], top=roi[1], right=roi[2],
                                              bottom=roi[3])))
            res = classifier.classify(image, ctx) if ctx else classifier.classify(image)
            rows.append([{"index": c.head_index, "name": c.head_name,
                          "categories": sorted(
                              ([cat.index, cat.category_name, float(cat.score)]
                               for cat in c.categories), key=lambda x: x[0])}
                         for c in res.classifications])
    with open(spec["out"], "w") as f:
        json.dump(rows, f)


def read(spec: dict) -> None:
    from mediapipe.tasks.python.metadata import metadata

    with open(spec["model"], "rb") as f:
        displayer = metadata.MetadataDisplayer.with_model_buffer(f.read())
    out = {"metadata": json.loads(displayer.get_metadata_json()),
           "associated_files": displayer.get_packed_associated_file_list()}
    with open(spec["out"], "w") as f:
        json.dump(out, f)


def main(argv: list[str]) -> int:
    mode, path = argv
    with open(path) as f:
        spec = json.load(f)
    {"write": write, "classify": classify, "read": read}[mode](spec)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    sys.exit(main(sys.argv[1:]))
