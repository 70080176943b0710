"""export/compact.py: identical vectors stored once, the model unchanged bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from export_fixtures import make_run_dir, smooth_images

from export.compact import BUFFER_ALIGNMENT, compact, same_outputs, share_vectors
from export.config import QuantizationConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:tensorflow.lite.*")


@pytest.fixture(scope="module")
def converted():
    import keras

    from export.convert import convert_model
    from trainer.model import build_model

    keras.utils.set_random_seed(5)
    model = build_model("tiny_cnn", input_size=32, weights=None)
    images = smooth_images(40)
    int8 = convert_model(model, QuantizationConfig.int8(24, compact=False), images[:24]).tflite
    f32 = convert_model(model, QuantizationConfig.float32()).tflite
    return int8, f32, images


def _root(tflite: bytes):
    from tensorflow.lite.python import schema_py_generated as fb

    return fb.Model.GetRootAs(tflite, 0)


def _zero_points(tflite: bytes) -> list[tuple[int, bytes]]:
    """(position in the file, content) of every tensor's zero-point vector."""
    out = []
    sg = _root(tflite).Subgraphs(0)
    for i in range(sg.TensorsLength()):
        q = sg.Tensors(i).Quantization()
        if q is None or q.ZeroPointLength() == 0:
            continue
        tab = q._tab  # noqa: SLF001 - the vector's position is what sharing changes
        pos = tab.Vector(tab.Offset(10))  # field 3 (zero_point): vtable slot 4 + 2 * 3
        out.append((pos, q.ZeroPointAsNumpy().tobytes()))
    return out


def _tables(tflite: bytes):
    """Every tensor's and buffer's content, read through the object API (sharing invisible)."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    m = fbu.read_model_from_bytearray(bytearray(tflite))
    tensors = []
    for t in m.subgraphs[0].tensors:
        q = t.quantization
        tensors.append((t.name, t.type, t.buffer, list(t.shape),
                        None if q is None or q.scale is None else
                        (list(q.scale), list(q.zeroPoint), q.quantizedDimension)))
    buffers = [b"" if b.data is None else bytes(bytearray(b.data)) for b in m.buffers]
    ops = [(o.opcodeIndex, list(o.inputs), list(o.outputs)) for o in m.subgraphs[0].operators]
    return tensors, buffers, ops


def test_int8_file_shrinks_and_reads_back_identically(converted):
    int8, _, images = converted
    small, report = share_vectors(int8)
    assert report["size_before"] == len(int8) and report["size_after"] == len(small)
    assert len(small) < len(int8) and report["bytes_saved"] == len(int8) - len(small)
    assert report["vectors_shared"] > 0
    # Every tensor, quantization parameter, buffer and operator reads back the same.
    assert _tables(small) == _tables(int8)
    ok, why = same_outputs(int8, small, images)
    assert ok, why
    from dermedge.litert import LiteModel

    a = LiteModel.load(int8).predict(images, batch_size=8)
    b = LiteModel.load(small).predict(images, batch_size=8)
    for head in ("melanoma", "diagnosis"):
        np.testing.assert_array_equal(a[head], b[head])


def test_each_distinct_zero_point_vector_is_stored_once(converted):
    int8 = converted[0]
    before, after = _zero_points(int8), _zero_points(share_vectors(int8)[0])
    contents = {c for _, c in before}
    assert len(before) == len(after) and len(contents) < len(before)  # there was repetition
    assert len({p for p, _ in before}) == len(before)  # the converter writes each separately
    assert len({p for p, _ in after}) == len(contents)  # compacted: one copy per content
    assert sorted(c for _, c in after) == sorted(c for _, c in before)


def test_constant_buffers_are_16_byte_aligned(converted):
    small = share_vectors(converted[0])[0]
    root = _root(small)
    checked = 0
    for i in range(root.BuffersLength()):
        b = root.Buffers(i)
        if b.DataLength() >= BUFFER_ALIGNMENT:
            tab = b._tab  # noqa: SLF001
            assert tab.Vector(tab.Offset(4)) % BUFFER_ALIGNMENT == 0, i
            checked += 1
    assert checked > 0


def test_compacting_twice_changes_nothing_and_is_reported(converted):
    int8, _, images = converted
    once, r1 = compact(int8, images[:4])
    assert r1["applied"] is True and r1["checked_images"] == 4
    assert r1["check"] == "bit-identical outputs"
    twice, r2 = compact(once, images[:4])
    assert twice == once
    assert r2["applied"] is False and r2["bytes_saved"] == 0 and r2["reason"] == "nothing to share"


def test_a_file_that_answers_differently_is_detected(converted):
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    int8, f32, images = converted
    m = fbu.read_model_from_bytearray(bytearray(int8))
    sg = m.subgraphs[0]
    bias = next(t for t in sg.tensors if t.type == 2 and t.quantization is not None
                and t.quantization.scale is not None)  # an int32 (quantized) bias
    data = np.frombuffer(bytes(bytearray(m.buffers[bias.buffer].data)), np.int32) + 10_000
    m.buffers[bias.buffer].data = np.frombuffer(data.astype(np.int32).tobytes(), np.uint8)
    changed = bytes(fbu.convert_object_to_bytearray(m))
    ok, why = same_outputs(int8, changed, images)
    assert not ok and "differs" in why
    ok, why = same_outputs(int8, f32, images)  # uint8 vs float32 signature
    assert not ok and "signature" in why
    ok, why = same_outputs(int8, b"not a model", images)
    assert not ok and "does not run" in why


def test_export_ships_the_compacted_file_and_no_compact_opts_out(tmp_path):
    from export.api import export_run
    from export.cli import main

    run = make_run_dir(tmp_path / "runs", size=32, train_per_class=4, val_per_class=2)
    res = export_run(run, QuantizationConfig.int8(20), tmp_path / "c")
    ex = res.card["export"]
    c = ex["compaction"]
    assert c["applied"] is True and c["checked_images"] == 8
    # The compacted flatbuffer is what the metadata goes into (export/tflite_metadata.py).
    assert ex["metadata"]["size_before"] == c["size_after"] and ex["metadata"]["recompacted"]
    assert ex["size_bytes"] == ex["metadata"]["size_after"] == (
        res.path / "model.tflite").stat().st_size
    assert c["size_after"] < c["size_before"]
    assert json.loads((res.path / "validation.json").read_text())["compaction"] == c
    rc = main(["tflite", str(run), "--int8", "--representative", "20", "--no-compact",
               "--out", str(tmp_path / "n")])
    assert rc == 0
    card = json.loads((tmp_path / "n" / "model_card.json").read_text())
    assert card["export"]["compaction"] is None
    report = json.loads((tmp_path / "n" / "validation.json").read_text())
    assert report["config"]["compact"] is False and "compaction" not in report
    # The converter's own bytes: exactly the size before compaction (the export is deterministic),
    # then the metadata.
    assert card["export"]["metadata"]["size_before"] == c["size_before"]
    assert card["export"]["metadata"]["recompacted"] is False
