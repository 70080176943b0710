"""TFLite Model Metadata in every exported file (export/tflite_metadata.py).

The metadata is read back with MediaPipe's own ``MetadataDisplayer`` (in the pinned MediaPipe
venv); the rest with TensorFlow's flatbuffer schema, zipfile and LiteRT.
"""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from export_fixtures import make_run_dir, smooth_images
from mediapipe_fixtures import mediapipe_env

from dermedge.litert import run_tflite
from export.api import QuantizationConfig, export_run
from export.tflite_metadata import (
    LABEL_FILES,
    ZIP_DATE,
    MetadataError,
    append_zip,
    centred_square_roi,
    metadata_spec,
    split_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    mediapipe_env()
    tmp = tmp_path_factory.mktemp("md")
    run = make_run_dir(tmp, size=32, train_per_class=3, val_per_class=1, threshold=0.37)
    first = export_run(run, QuantizationConfig.int8(14), tmp / "a")
    second = export_run(run, QuantizationConfig.int8(14), tmp / "b")
    return run, first, second


def test_every_int8_export_carries_metadata_and_is_byte_reproducible(exported):
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    _, first, second = exported
    data = (first.path / "model.tflite").read_bytes()
    assert data == (second.path / "model.tflite").read_bytes()
    ex = first.card["export"]
    # The card and the validation are of the file that ships: metadata came before them.
    import hashlib

    assert ex["size_bytes"] == len(data) and ex["sha256"] == hashlib.sha256(data).hexdigest()
    assert ex["metadata"]["size_after"] == len(data) > ex["metadata"]["size_before"]
    assert first.passed is True
    model = fbu.read_model_from_bytearray(bytearray(split_file(data)[0]))
    names = [m.name.decode() for m in model.metadata]
    assert "TFLITE_METADATA" in names and "min_runtime_version" in names
    assert len(model.subgraphs[0].inputs) == 1
    sig_batch = model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]].shapeSignature
    assert sig_batch is None or int(sig_batch[0]) == 1  # batch fixed to 1 (export/batch.py)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # the label files, timestamps fixed
        infos = zf.infolist()
        assert {i.filename for i in infos} == set(LABEL_FILES.values())
        assert all(i.date_time == ZIP_DATE and i.external_attr >> 16 == 0o644 for i in infos)
        dx = zf.read("labels_diagnosis.txt").decode().splitlines()
    assert dx == first.card["heads"]["diagnosis"]["labels"]
    # LiteRT still reads the signature by name and answers as validation measured.
    out = run_tflite(first.path, smooth_images(2, 32))
    assert out["diagnosis"].shape == (2, 7) and out["melanoma"].shape == (2, 1)


def test_metadata_fields_read_back_with_mediapipe(exported):
    from export.tflite_metadata import read_metadata

    _, first, _ = exported
    card = first.card
    got = read_metadata(first.path / "model.tflite")
    md = got["metadata"]
    assert md["name"] == card["name"] == "tiny"
    assert card["created"] in md["version"] and "int8" in md["version"]
    assert md["author"] and md["license"] and "tiny_cnn" in md["description"]
    sub = md["subgraph_metadata"][0]
    image = sub["input_tensor_metadata"][0]
    assert image["name"] == "image"
    props = image["content"]["content_properties"]
    assert props["color_space"] == "RGB"
    norm = image["process_units"][0]["options"]
    assert norm["mean"] == [0.0] and norm["std"] == [1.0]
    order = card["export"]["metadata"]["output_order"]
    outs = sub["output_tensor_metadata"]
    assert [o["name"] for o in outs] == order
    assert [o["associated_files"][0]["name"] for o in outs] == [LABEL_FILES[n] for n in order]
    assert all(o["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS" for o in outs)
    assert sorted(got["associated_files"]) == sorted(LABEL_FILES.values())
    custom = sub["custom_metadata"][0]
    assert custom["name"] == "dermedge"
    payload = json.loads(bytes(custom["data"]).decode())
    assert payload["melanoma_threshold"] == pytest.approx(card["heads"]["melanoma"]["threshold"])
    assert payload["heads"] == order and "centred square" in payload["preprocessing"]["crop"]
    # the input gate: its thresholds as the card has them, and the ood output described
    assert payload["gate"]["thresholds"] == card["gate"]["thresholds"]
    assert payload["gate"]["params"]["side_cap"] == 448 and payload["gate"]["output"] == "ood"
    ood = outs[order.index("ood")]
    assert "atypicality" in ood["description"] and "retake" in ood["description"]


def test_metadata_spec_rounds_the_threshold_for_people():
    card = {"name": "r", "created": "2026-01-01", "backbone": "tiny_cnn",
            "input": {"shape": [224, 224, 3]}, "data": {"layout": "ham10000"},
            "heads": {"melanoma": {"labels": ["melanoma"], "threshold": 0.5000000000000091},
                      "diagnosis": {"labels": ["a", "b"]}}}
    spec = metadata_spec(card, "int8", ["diagnosis", "melanoma"])
    assert [o["name"] for o in spec["outputs"]] == ["diagnosis", "melanoma"]
    assert [o["label_file"] for o in spec["outputs"]] == ["labels_diagnosis.txt",
                                                          "labels_melanoma.txt"]
    mel = spec["outputs"][1]["description"]
    assert "score >= 0.5 " in mel and "0000091" not in mel
    assert "CC BY-NC 4.0" in spec["general"]["license"]


def test_zip_is_reproducible_and_splits_back():
    files = [("labels_melanoma.txt", b"melanoma"), ("labels_diagnosis.txt", b"a\nb")]
    a, b = append_zip(b"FLATBUFFER", files), append_zip(b"FLATBUFFER", files)
    assert a == b and a.startswith(b"FLATBUFFER")
    assert split_file(a) == (b"FLATBUFFER", files)
    assert split_file(b"no zip") == (b"no zip", [])


def test_centred_square_roi_is_the_image_contract_crop():
    assert centred_square_roi(600, 450) == (75 / 600, 0.0, 525 / 600, 1.0)
    assert centred_square_roi(450, 601) == (0.0, 75 / 601, 1.0, 525 / 601)


def test_a_bad_mediapipe_python_is_a_clear_error_before_converting(tmp_path, monkeypatch):
    from export.cli import main

    run = make_run_dir(tmp_path, size=32, train_per_class=2, val_per_class=1)
    monkeypatch.setenv("DERMEDGE_MEDIAPIPE_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(MetadataError, match="DERMEDGE_MEDIAPIPE_PYTHON names .*nope"):
        export_run(run, QuantizationConfig.float32(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    rc = main(["tflite", str(run), "--out", str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out").exists()



def test_inspect_prints_what_a_mobile_developer_needs(exported, capsys, tmp_path):
    from export.cli import main

    _, first, _ = exported
    order = first.card["export"]["metadata"]["output_order"]
    assert main(["inspect", str(first.path)]) == 0
    text = capsys.readouterr().out
    assert "image: uint8 [1, 32, 32, 3], quantization scale 1, zero point 0" in text
    labels = ", ".join(first.card["heads"]["diagnosis"]["labels"])
    i = order.index("diagnosis")
    assert f"{i} diagnosis: uint8 [1, 7]" in text and f"labels_diagnosis.txt: {labels}" in text
    assert "TFLITE_METADATA" in text and "'dermedge'" in text and "0.37" in text
    assert "loads: yes; heads " + ", ".join(
        f"{n} ({7 if n == 'diagnosis' else 1} labels)" for n in order) in text
    assert main(["inspect", str(first.path / "model.tflite"), "--json", "--no-mediapipe"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in info["outputs"]] == order
    assert info["outputs"][order.index("melanoma")]["labels"] == ["melanoma"]
    assert info["mediapipe"]["static_problems"] == []
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # one paragraph, wrapped
    assert "error:" in err and "does not exist" in err and "Traceback" not in err
