"""The typed model card (dermedge.card): one builder, one reader, and docs/ARTIFACTS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dermedge import card as model_card
from dermedge.errors import BundleError, DermedgeError

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARTIFACTS.md"
LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _built(**kw) -> model_card.ModelCard:
    args = dict(name="r", created="2026-01-01T00:00:00+00:00", backbone="tiny_cnn",
                weights=None, input_size=32, preprocessing={"in_model": True},
                melanoma_threshold=0.3, diagnosis_labels=LABELS, data={"source": "/d"},
                config={"seed": 0}, training={"epochs_run": 1}, metrics_val={"accuracy": 1.0},
                versions={"dermedge": "0.1.0"})
    args.update(kw)
    return model_card.build_card(**args)


def doc_json_after(heading: str) -> dict:
    """The first ```json block after ``heading`` in docs/ARTIFACTS.md, parsed."""
    text = DOC.read_text()
    start = text.index(heading)
    block = re.search(r"```json\n(.*?)```", text[start:], re.S).group(1).strip()
    return json.loads(block if block.startswith("{") else "{" + block + "}")


def doc_table_names(heading: str) -> list[str]:
    """The backticked names in the first column of the table after ``heading``."""
    text = DOC.read_text()
    block = text[text.index(heading):]
    table = block.split("\n\n|", 1)[1].split("\n\n")[0]
    cells = [line.split("|")[1] for line in ("|" + table).splitlines()]
    return [name for cell in cells for name in re.findall(r"`([^`]+)`", cell)]


def test_builder_output_reads_back_the_same(tmp_path):
    card = _built(synthetic=True)
    path = tmp_path / "model_card.json"
    path.write_text(card.to_json())
    back = model_card.read_card(tmp_path)
    assert back == card
    assert back.to_dict() == json.loads(path.read_text())
    assert (back.input_size, back.melanoma_threshold, back.diagnosis_labels) == (32, 0.3, LABELS)
    assert back.synthetic is True and back.to_dict()["data"]["synthetic"] is True
    assert back.input.shape == (32, 32, 3) and back.input.resize == "center_crop_resize"
    assert list(back.to_dict())[:3] == ["schema_version", "name", "created"]
    assert "ensemble" not in back.to_dict() and "metadata_prior" not in back.to_dict()


def test_old_version_1_card_without_the_synthetic_flag_reads_as_not_synthetic():
    d = _built().to_dict()
    del d["data"]["synthetic"]
    d["future_section"] = {"kept": True}
    card = model_card.card_from_dict(d)
    assert card.synthetic is False
    assert card.to_dict()["future_section"] == {"kept": True}


def test_reader_names_every_problem_and_raises_the_callers_error(tmp_path):
    d = _built().to_dict()
    d["schema_version"] = 2
    d["input"]["shape"] = [32, 3]
    d["heads"]["melanoma"]["threshold"] = 1.5
    d["heads"]["diagnosis"]["labels"] = ["a", "a"]
    d["data"]["synthetic"] = "yes"
    (tmp_path / "model_card.json").write_text(json.dumps(d))
    with pytest.raises(BundleError) as e:
        model_card.read_card(tmp_path, error=BundleError)
    msg = str(e.value)
    for needle in ("schema_version is 2; this dermedge reads 1", "input.shape must be [S, S, 3]",
                   "heads.melanoma.threshold must be a number in (0, 1); received 1.5",
                   "distinct label names", "data.synthetic must be true or false",
                   str(tmp_path / "model_card.json")):
        assert needle in msg


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), ("{not json", "is not valid JSON"), ("[1]", "JSON object")])
def test_unreadable_card_files(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "model_card.json").write_text(content)
    with pytest.raises(model_card.CardError, match=re.escape(needle)):
        model_card.read_card(tmp_path)
    assert issubclass(model_card.CardError, DermedgeError)


def test_bundle_card_needs_its_export_section():
    with pytest.raises(model_card.CardError, match="export.mode is missing.*export.outputs"):
        model_card.with_export(_built(), {"signature": "serving_default"})
    section = {"mode": "int8", "signature": "serving_default", "inputs": {"image": {}},
               "outputs": {"melanoma": {}, "diagnosis": {}}}
    bundle = model_card.with_export(_built(), section)
    assert list(bundle.to_dict())[-1] == "export" and bundle.export["mode"] == "int8"


def test_recalibrated_changes_only_calibration_threshold_and_metrics():
    card = _built(metadata_prior={"weight": 0.5, "val": {"images": 3}})
    new = model_card.recalibrated(card, calibration={"method": "temperature"},
                                  melanoma_threshold=0.42, metrics_val={"accuracy": 0.5},
                                  metadata_scores={"val": {"images": 4}})
    before, after = card.to_dict(), new.to_dict()
    assert after["calibration"] == {"method": "temperature"}
    assert new.melanoma_threshold == 0.42 and after["metrics"]["val"] == {"accuracy": 0.5}
    assert after["metadata_prior"] == {"weight": 0.5, "val": {"images": 4}}
    for key in ("calibration", "heads", "metrics", "metadata_prior"):
        before.pop(key), after.pop(key)
    assert before == after


# ---------------------------------------------------------------- docs/ARTIFACTS.md agrees
def test_documented_card_has_the_builders_keys_and_passes_the_reader():
    doc = doc_json_after("`model_card.json` (schema version 1)")
    built = _built().to_dict()
    assert list(doc) == list(built)  # same sections, same order
    for section in ("input", "heads"):
        assert set(doc[section]) == set(built[section]), section
    assert set(doc["data"]) == {"source", "layout", "n_images", "n_lesions", "splits",
                                "class_counts", "synthetic"}
    assert model_card.card_from_dict(doc).input_size == 224


def test_documented_reader_checks_are_the_readers():
    text = DOC.read_text()
    checked = doc_table_names("### Reading a card")
    for field in model_card.REQUIRED_FIELDS:
        assert field in checked, field
    assert "data.synthetic" in checked
    reading = text[text.index("### Reading a card"):text.index("### Ensembles")]
    for field in model_card.EXPORT_FIELDS:
        assert f"`{field}`" in reading, field
    assert str(model_card.READABLE_VERSIONS[0]) in reading


def test_documented_files_are_the_ones_written():
    from export.bundle import BUNDLE_FILES
    from export.refused import REFUSED_NOTICE
    from trainer.run import RUN_FILES

    run_files = doc_table_names("## The run directory")
    assert set(RUN_FILES) <= set(run_files)
    assert doc_table_names("## The export bundle") == [*BUNDLE_FILES, REFUSED_NOTICE]


def test_backbone_layer_comes_from_the_card_with_the_v1_default():
    assert _built(backbone_layer="features").backbone_layer == "features"
    assert _built(backbone="ensemble").backbone_layer is None
    old = _built().to_dict()
    del old["backbone_layer"]  # a card written before the key existed
    assert model_card.card_from_dict(old).backbone_layer == model_card.V1_BACKBONE_LAYER
    old["backbone"] = "ensemble"
    assert model_card.card_from_dict(old).backbone_layer is None


def test_toy_data_leaves_the_marker_the_card_reads(tmp_path):
    from trainer.toy import SYNTHETIC_MARKER, is_synthetic, make_toy_dataset

    toy = make_toy_dataset(tmp_path / "toy", n_lesions=140, size=16, seed=0)
    assert (toy / SYNTHETIC_MARKER).is_file()
    assert is_synthetic(toy) and is_synthetic(toy / "HAM10000_metadata.csv")
    real = tmp_path / "real"
    real.mkdir()
    (real / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    assert not is_synthetic(real) and not is_synthetic(real / "HAM10000_metadata.csv")
    assert not is_synthetic(None)
