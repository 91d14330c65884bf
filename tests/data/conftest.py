"""The data sets the data tests read: the pen drawings mlpaint ships, parsed once."""

import gzip
import hashlib

import pytest

from mlpaint.data.pendigits import PenTable, packaged_pen_copy, parse_unipen
from mlpaint.data.pins import PEN_TRAJECTORIES_SHA256


@pytest.fixture(scope="session")
def pen_table() -> PenTable:
    text = gzip.decompress(packaged_pen_copy().read_bytes())
    assert hashlib.sha256(text).hexdigest() == PEN_TRAJECTORIES_SHA256
    return PenTable.from_digits(parse_unipen(text.decode("ascii").splitlines(), "packaged"),
                                origin="packaged", sha256=PEN_TRAJECTORIES_SHA256,
                                verified=True)
