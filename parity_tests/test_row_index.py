"""``qwenvl.data.row_index``: rows found by byte span and read back from disk equal the rows a plain parse of the
whole file gives (JSON and JSONL, non-ASCII text, blank lines, ``%N`` sampling); bad files keep their messages."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from qwenvl.data import DataFileError, RowRef, read_rows
from qwenvl.data.row_index import Ints, RowIndex

try:
    from hypothesis import example, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_ROWS = st.lists(
    st.fixed_dictionaries(
        {"conversations": st.lists(st.fixed_dictionaries({"from": _TEXT, "value": _TEXT}), max_size=2)}
    ),
    max_size=6,
)


def _parsed(path):
    """The plain reading of a data file: every row parsed (what read_rows kept before the index)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    return json.loads(text)


@settings(max_examples=40, deadline=None)
@given(
    rows=_ROWS,
    suffix=st.sampled_from([".json", ".jsonl"]),
    indent=st.sampled_from([None, 1]),
    ascii=st.booleans(),
    blank=st.booleans(),
)
@example(rows=[], suffix=".json", indent=None, ascii=False, blank=False)
@example(
    rows=[{"conversations": [{"from": "\u2028é", "value": "猫"}]}], suffix=".json", indent=1, ascii=False, blank=True
)
def test_rows_read_back_by_span_equal_the_parsed_file(tmp_path_factory, rows, suffix, indent, ascii, blank):
    path = tmp_path_factory.mktemp("rows") / f"data{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps(r, ensure_ascii=ascii) for r in rows]
        path.write_text(("\n\n" if blank else "\n").join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(
            (" \n" if blank else "") + json.dumps(rows, indent=indent, ensure_ascii=ascii), encoding="utf-8"
        )
    if not rows:
        with pytest.raises(DataFileError, match="no rows in"):
            read_rows(str(path))
        return
    index = read_rows(str(path))
    assert [raw for _, raw in index] == _parsed(path) == rows
    assert [ref for ref, _ in index] == [RowRef(path, i) for i in range(len(rows))]
    assert index[len(rows) - 1] == (RowRef(path, len(rows) - 1), rows[-1]) == index[-1]


def test_sampling_keeps_the_rows_sampling_the_parsed_rows_kept(tmp_path):
    """``%N`` draws by position with the same seeded generator as before: the same rows, in the same order."""
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(37)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    for ratio, seed in ((30, 0), (250, 4), (100, 1)):
        whole, part = divmod(ratio / 100, 1.0)
        refs = [(RowRef(path, i), r) for i, r in enumerate(rows)]
        expected = refs * int(whole) + random.Random(f"{seed}:{path}").sample(refs, round(part * len(refs)))
        assert list(read_rows(f"{path}%{ratio}", seed=seed)) == expected


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.json", '[{"conversations": []}, {"x": ]', r"a.json: not valid JSON \(Expecting value at line 1\)"),
        ("b.json", '{"conversations": []}', "b.json: a JSON data file must hold a list of rows, got dict"),
        ("c.json", '[{"x": 1}] [', r"c.json: not valid JSON \(Extra data at line 1\)"),
        ("d.jsonl", '{"x": 1}\n\n{"x": \n', r"d.jsonl line 3: not valid JSON \(Expecting value\)"),
        ("e.jsonl", "", "no rows in"),
    ],
)
def test_bad_files_keep_their_messages(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataFileError, match=message):
        read_rows(str(tmp_path / name))


def test_the_index_is_arrays_and_round_trips(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"i": i}) for i in range(5)))
    index = read_rows(f"{path},{path}%40")
    assert all(isinstance(values, np.ndarray) for values in index.arrays.values())
    again = RowIndex(index.files, {name: values.copy() for name, values in index.arrays.items()})
    assert list(again) == list(index) and len(again) == 7
    assert list(index.take(np.array([6, 0]))) == [index[6], index[0]]


def test_ints_is_a_sequence_of_ints():
    lengths = Ints(np.array([3, 1, 4], dtype=np.int32))
    assert lengths == [3, 1, 4] and lengths != [3, 1] and lengths != [3, 1, 5]
    assert list(lengths) == [3, 1, 4] and type(lengths[0]) is int and sum(lengths) == 8
    assert lengths[1:] == [1, 4] and np.asarray(lengths).dtype == np.int32
