"""The UNIPEN reader on tiny texts: what it keeps (strokes, writers, samples, y as drawn) and
how it names a malformed line."""

import gzip
import re

import numpy as np
import pytest

from mlpaint.data.fetch import FetchContext
from mlpaint.data.integrity import BlobCache, Pins
from mlpaint.data.pendigits import (
    PenSourcesExhaustedError,
    PenTable,
    UnipenFormatError,
    drawn_test_writers,
    fetch_pen_trajectories,
    load_pen_table,
    parse_unipen,
    save_pen_table,
)
from mlpaint.data.pins import PEN_TRAJECTORIES_NAME

TWO_DIGITS = """.INCLUDE        dene.doc

.LEXICON "0" "1" "2" "3" "4" "5" "6" "7" "8" "9"
.HIERARCHY      DIGIT

.SEGMENT DIGIT    0 ? "7"
.COMMENT 7 12  224
.PEN_DOWN
 100  400
 300  400
 200  100
.PEN_UP
.DT 100

.SEGMENT DIGIT    1 ? "4"
.COMMENT 4 3   1
.PEN_DOWN
 10  20
 10  10
 30  10
.PEN_UP
.DT 100
.PEN_DOWN
 25  30
.PEN_UP
.DT 100
"""


def test_two_digits_keep_their_labels_writers_samples_and_strokes():
    first, second = parse_unipen(TWO_DIGITS.splitlines(), "tiny.tra")
    assert (first.label, first.writer, first.sample) == (7, 12, 224)
    assert (second.label, second.writer, second.sample) == (4, 3, 1)
    assert len(first.strokes) == 1 and len(second.strokes) == 2
    np.testing.assert_array_equal(first.strokes[0], [[100, 400], [300, 400], [200, 100]])
    np.testing.assert_array_equal(second.strokes[1], [[25, 30]])  # a one-point stroke: a dot


def test_a_table_round_trips_through_its_folder(tmp_path):
    digits = parse_unipen(TWO_DIGITS.splitlines(), "tiny.tra")
    table = PenTable.from_digits(digits, origin="tiny.tra", sha256="0" * 64, verified=False)
    loaded = load_pen_table(save_pen_table(table, tmp_path / "pen"))
    assert loaded.row_keys == ["pen-w012-s0224", "pen-w003-s0001"]
    assert loaded.labels.tolist() == [7, 4] and loaded.writers.tolist() == [12, 3]
    for row, digit in enumerate(digits):
        for got, want in zip(loaded.strokes(row), digit.strokes, strict=True):
            np.testing.assert_array_equal(got, want)
    # The row hash is the writer's: a fold rule on it keeps a writer on one side.
    assert len(set(loaded.row_hash.tolist())) == 2


@pytest.mark.parametrize(("broken", "line", "expected"), [
    (TWO_DIGITS.replace(' 300  400', ' 300  4o0'), 10, "an `x y` point of integers or .PEN_UP"),
    (TWO_DIGITS.replace('.COMMENT 7 12  224', '.COMMENT 1 12  224'), 7,
     "the .SEGMENT's label 7 in its .COMMENT"),
    (TWO_DIGITS.replace('.COMMENT 4 3   1\n', ''), 16, ".COMMENT <label> <writer> <sample> "
                                                       "before .PEN_DOWN"),
    (TWO_DIGITS.replace('? "7"', '? "seven"'), 6, '.SEGMENT DIGIT <id> ? "<digit 0-9>"'),
    (TWO_DIGITS.replace(' 10  20\n 10  10\n 30  10\n', ''), 18,
     "at least one `x y` point before .PEN_UP"),
    (TWO_DIGITS.rsplit(".PEN_UP", 1)[0], 25, ".PEN_UP closing the last stroke"),
    (TWO_DIGITS.replace(".DT 100\n\n.SEGMENT DIGIT    1", "hello\n.SEGMENT DIGIT    1", 1),
     13, ".SEGMENT, .COMMENT, .PEN_DOWN or .DT"),
])
def test_a_malformed_line_is_named_with_what_was_expected(broken, line, expected):
    with pytest.raises(UnipenFormatError, match=re.escape(f"tiny.tra: line {line}: expected "
                                                          f"{expected}, found")) as raised:
        parse_unipen(broken.splitlines(), "tiny.tra")
    assert raised.value.line_number == line


def test_a_repeated_writer_sample_is_refused():
    doubled = TWO_DIGITS + TWO_DIGITS.split("\n\n", 2)[2]
    digits = parse_unipen(doubled.splitlines(), "doubled.tra")
    with pytest.raises(Exception, match="writer 3 has sample 1 more than once"):
        PenTable.from_digits(digits, origin="doubled.tra", sha256="0" * 64, verified=False)


def test_the_drawn_test_writers_are_a_fixed_share_chosen_by_hash():
    writers = list(range(1, 31))
    held_out = drawn_test_writers(writers, 0.2)
    assert len(held_out) == 6
    assert drawn_test_writers(reversed(writers * 3), 0.2) == held_out  # order, repeats
    assert drawn_test_writers(writers, 0.0) == frozenset()
    assert len(drawn_test_writers([5], 0.2)) == 1  # a share of one writer is that writer


def _context(tmp_path, pins=None):
    return FetchContext(Pins(pins or {}), BlobCache(tmp_path / "cache"))


def test_a_zip_member_compressed_with_unix_compress_is_read_and_verified(tmp_path):
    """UCI's layout: the trajectories as `pendigits-orig.tra.Z` inside a zip. The pin is on
    the decompressed text, so it holds whatever the container."""
    import hashlib
    import zipfile

    import ncompress

    text = TWO_DIGITS.encode()
    archive = tmp_path / "uci.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        opened.writestr("pendigits-orig.tra.Z", ncompress.compress(text))
        opened.writestr("other.txt", b"not read")
    pins = {"tiny.tra": hashlib.sha256(text).hexdigest()}
    with zipfile.ZipFile(tmp_path / "renamed.zip", "w") as opened:
        opened.writestr("tiny.tra.Z", ncompress.compress(text))
    fetched, _ = fetch_pen_trajectories([f"{tmp_path}/renamed.zip#tiny.tra.Z"],
                                        _context(tmp_path, pins))
    assert fetched.verified and fetched.path.read_bytes() == text
    # The real name is pinned to UCI's bytes: these are not they, and the chain says so.
    with pytest.raises(PenSourcesExhaustedError, match="does not match the pinned"):
        fetch_pen_trajectories([f"{archive}#pendigits-orig.tra.Z"], _context(tmp_path))
    with pytest.raises(PenSourcesExhaustedError, match=re.escape("no member 'missing.tra.Z'")):
        fetch_pen_trajectories([f"{archive}#missing.tra.Z"], _context(tmp_path))


def test_the_chain_moves_past_a_dead_source_to_a_good_one(tmp_path):
    good = tmp_path / f"{PEN_TRAJECTORIES_NAME}.gz"
    good.write_bytes(gzip.compress(TWO_DIGITS.encode()))
    with pytest.raises(PenSourcesExhaustedError, match="pinned"):
        fetch_pen_trajectories([str(tmp_path / "absent.tra"), str(good)], _context(tmp_path))
    own = tmp_path / "mine.tra.gz"
    own.write_bytes(gzip.compress(TWO_DIGITS.encode()))
    fetched, uri = fetch_pen_trajectories([str(tmp_path / "absent.tra"), str(own)],
                                          _context(tmp_path))
    assert uri == str(own) and not fetched.verified  # no pin for it: UNVERIFIED, but read
