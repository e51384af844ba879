"""The one atomic writer (bgexp/atomic.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bgexp.atomic import atomic_path, atomic_write, json_safe, write_json_atomic


def test_writes_bytes_str_and_callables(tmp_path):
    assert atomic_write(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "b.txt", "caf\u00e9\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "caf\u00e9\n"
    atomic_write(tmp_path / "sub" / "c.npz", lambda f: np.savez(f, x=np.arange(3)))  # folder created
    assert np.load(tmp_path / "sub" / "c.npz")["x"].tolist() == [0, 1, 2]
    atomic_write(tmp_path / "a.bin", b"new")  # replaces
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "sub"]


def test_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def dies_half_way(f):
        f.write(b"half a fi")
        raise KeyboardInterrupt  # a kill is not an Exception either

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]

    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_path_for_writers_that_need_a_file_name(tmp_path):
    path = tmp_path / "state.xml"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".state.xml.") and tmp.suffix == ".tmp"
        assert not path.exists()
        tmp.write_text("<State/>")
    assert path.read_text() == "<State/>"
    assert [p.name for p in tmp_path.iterdir()] == ["state.xml"]


def test_wrong_content_type_is_a_named_error(tmp_path):
    with pytest.raises(TypeError, match="bytes, str or a callable"):
        atomic_write(tmp_path / "x", 3)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_floats_become_null_and_numpy_scalars_are_converted(tmp_path):
    obj = {"ess": math.nan, "delta_f": {"a->b": [1.5, math.inf, -math.inf]}, "n": np.int64(7),
           "x": np.float32(0.5), "y": np.float64(np.nan), "ok": np.bool_(True), "t": (1, 2.0),
           "arr": np.array([1.0, np.nan]), "s": "text", "none": None}
    path = write_json_atomic(tmp_path / "results.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ess": None, "delta_f": {"a->b": [1.5, None, None]}, "n": 7, "x": 0.5, "y": None,
                                "ok": True, "t": [1, 2.0], "arr": [1.0, None], "s": "text", "none": None}
    assert json_safe(obj)["n"] == 7 and type(json_safe(obj)["n"]) is int
    write_json_atomic(tmp_path / "sorted.json", {"b": 1, "a": 2}, sort_keys=True)
    assert (tmp_path / "sorted.json").read_text() == json.dumps({"a": 2, "b": 1}, indent=2)
