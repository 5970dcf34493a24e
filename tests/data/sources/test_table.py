"""data/sources/table.py, PairTable read directly: the CSV separator from the header, quoting
as each form has it, a UTF-8 byte-order mark, keys (given, or a row's position), bad rows
that keep their row number, JSONL's caption keys, and the epoch order (through open_pairs
and the loader: test_pairs.py, test_bad_samples.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.bad_data import encoded, rgb
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.table import PairTable


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encoded(rgb(i)))
    return tmp_path


def bad_reason(table: PairTable, row: int) -> str:
    with pytest.raises(BadSample) as caught:
        table[row]
    return caught.value.reason


def test_a_tab_in_the_header_makes_a_csv_tab_separated_whatever_its_suffix(folder):
    path = folder / "openclip.csv"
    path.write_text('filepath\ttitle\n0.png\ta cube, red\n1.png\t"quoted" words\n')
    table = PairTable.from_csv(path, Fields("filepath", "title"))
    assert table.captions == [["a cube, red"], ['"quoted" words']]  # no CSV quoting in TSV
    assert table.images == [folder / "0.png", folder / "1.png"]


def test_a_comma_csv_unquotes_fields_and_reads_through_a_byte_order_mark(folder):
    path = folder / "pairs.csv"
    rows = [["image", "caption"], ["0.png", 'a "red", round cube'], ["2.png", "two\nlines"]]
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        csv.writer(handle).writerows(rows)
    table = PairTable.from_csv(path)
    assert table.captions == [['a "red", round cube'], ["two\nlines"]]
    pair = table[1]
    assert pair.captions == ["two\nlines"] and pair.image.getpixel((0, 0))[0] == 2


def test_rows_without_a_key_are_named_by_their_position_bad_rows_included(folder):
    path = folder / "pairs.csv"
    path.write_text("image,caption\n0.png,zero\n,no image\n1.png,one\n")
    table = PairTable.from_csv(path)
    assert table.keys == table.ids == ["000000000", "000000001", "000000002"]
    assert len(table) == 3 and set(table.bad) == {1}
    assert bad_reason(table, 1) == "malformed_row"
    pair = table[2]  # row numbers keep their meaning past a bad row
    assert (pair.key, pair.id, pair.row, pair.captions) == ("000000002", "000000002", 2, ["one"])


def test_a_repeated_key_is_a_bad_row_naming_the_first(folder):
    path = folder / "pairs.csv"
    path.write_text("image,caption,key\n0.png,first,k\n1.png,other,m\n2.png,again,k\n")
    table = PairTable.from_csv(path)
    assert table.keys == ["k", "m", "k"] and set(table.bad) == {2}
    assert table[0].captions == ["first"]
    assert table.bad[2].detail == f"{path}:4: duplicate key 'k' (first on line 2)"


def test_a_row_too_large_for_the_csv_module_is_one_bad_row(folder):
    path = folder / "pairs.csv"
    huge = "x" * (csv.field_size_limit() + 10)
    path.write_text(f'image,caption\n0.png,fine\n1.png,"{huge}"\n2.png,after\n')
    table = PairTable.from_csv(path)
    assert [c for i, c in enumerate(table.captions) if i not in table.bad] == [["fine"], ["after"]]
    assert len(table.bad) == 1 and "unreadable row" in next(iter(table.bad.values())).detail


def test_a_missing_column_names_the_setting_that_picks_it(folder):
    path = folder / "pairs.csv"
    path.write_text("image,text\n0.png,zero\n")
    with pytest.raises(ValueError, match=r"no column 'caption'.*data.caption_key=COLUMN"):
        PairTable.from_csv(path)
    assert PairTable.from_csv(path, Fields(caption="text")).captions == [["zero"]]
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        PairTable.from_csv(folder / "nowhere.csv")


def test_jsonl_prefers_a_captions_list_then_a_caption_and_skips_blank_lines(folder):
    path = folder / "pairs.jsonl"
    lines = [
        {"image": "0.png", "caption": "one", "captions": ["a", "b"]},
        "",
        {"image": "1.png", "caption": "only"},
        {"image": "2.png", "text": "named", "caption": "ignored", "key": 5},
    ]
    path.write_text("\n".join(json.dumps(x) if x else x for x in lines) + "\n")
    table = PairTable.from_jsonl(path)
    assert table.captions == [["a", "b"], ["only"], ["ignored"]]
    assert table.keys == ["000000000", "000000001", "5"]  # a key is read as text
    named = PairTable.from_jsonl(path, Fields(caption="text"))
    assert set(named.bad) == {0, 1} and named.captions[2] == ["named"]
    assert named.bad[1].detail.startswith(f"{path}:3: needs 'text'")  # its line in the file


def test_the_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(folder):
    keys = [f"k{i}" for i in range(50)]
    table = PairTable([folder / "0.png"] * 50, [["c"]] * 50, keys, "t")
    order = table.order(3, 1)
    assert sorted(order.tolist()) == list(range(50))
    assert np.array_equal(order, PairTable(table.images, table.captions, keys, "t").order(3, 1))
    assert not np.array_equal(order, table.order(3, 2))
    assert not np.array_equal(order, table.order(4, 1))


def test_the_constructor_checks_lengths_and_keys_of_good_rows_only(folder):
    with pytest.raises(ValueError, match="same length"):
        PairTable([folder / "0.png"], [["a"], ["b"]], ["x"], "t")
    with pytest.raises(ValueError, match=r"t: duplicate keys, e.g. \['x'\]"):
        PairTable([folder / "0.png"] * 2, [["a"], ["b"]], ["x", "x"], "t")
    bad = {1: BadSample("malformed_row", "t:3: broken")}
    table = PairTable([folder / "0.png"] * 2, [["a"], []], ["x", "x"], "t", bad)
    assert table[0].captions == ["a"] and bad_reason(table, 1) == "malformed_row"
    assert repr(table) == "PairTable('t', 2 pairs)"
