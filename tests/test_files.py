"""dermedge.files: the one atomic writer: a failed write leaves the target as it was."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dermedge.files import atomic_path, cache_dir, replace_dir, write_bytes, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "sub" / "card.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["card.json"]


def test_writers_that_need_an_extension_get_it(tmp_path):
    with atomic_path(tmp_path / "w.npz", suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz") and tmp.name.startswith(".w.npz.")
        np.savez(tmp, x=np.arange(3))  # np.savez would add ".npz" to any other name
    with np.load(tmp_path / "w.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


def test_text_bytes_and_strict_json(tmp_path):
    write_text(tmp_path / "t.txt", "ü\n")
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ü\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="JSON compliant"):
        write_json(tmp_path / "nan.json", {"x": math.nan})
    assert not list(tmp_path.glob("*nan*")) and not list(tmp_path.glob(".*"))
    write_json(tmp_path / "nan.json", {"x": math.nan}, allow_nan=True)
    assert (tmp_path / "nan.json").read_text() == '{\n  "x": NaN\n}\n'


def test_replace_dir_refuses_or_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    work = tmp_path / "run.partial"
    work.mkdir()
    (work / "new.txt").write_text("new")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        replace_dir(work, out, overwrite=False,
                    exists_message=f"{out} already exists; pass --overwrite")
    assert (out / "old.txt").is_file() and work.is_dir()
    replace_dir(work, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .old-* left


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DERMEDGE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("DERMEDGE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "dermedge")
