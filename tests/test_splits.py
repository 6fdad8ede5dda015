"""`split_range`, the launchers' cut of one dimension into ranges: every index covered once, ranges aligned."""

import pytest
from hypothesis import given, strategies as st

triton = pytest.importorskip("triton")

from gradnormlorp_kernels.triton.splits import split_range  # noqa: E402


@given(length=st.integers(0, 1 << 20), unit=st.sampled_from([1, 16, 64, 256]), other_blocks=st.integers(0, 5000),
       target=st.integers(1, 4096))
def test_ranges_cover_the_dimension_once_in_whole_units(length, unit, other_blocks, target):
    splits, per_split = split_range(length, unit, other_blocks, target)
    assert splits >= 1 and per_split >= unit and per_split % unit == 0
    # The kernels start range i at i * per_split: the ranges tile [0, length) and none starts past its end.
    assert splits * per_split >= length
    assert length == 0 and splits == 1 or (splits - 1) * per_split < length
    assert splits <= max(1, -(-length // unit))
    assert splits <= max(1, -(-target // max(1, other_blocks)))


@pytest.mark.parametrize("length,unit,other_blocks,expected", [
    (4096, 256, 172, (3, 1536)),  # 11008 rows in blocks of 64: three ranges, the last 1024 columns
    (4096, 256, 64, (8, 512)),
    (4096, 256, 1, (16, 256)),  # no more ranges than units
    (100, 256, 1, (1, 256)),
    (0, 64, 10, (1, 64)),
])
def test_known_cuts(length, unit, other_blocks, expected):
    assert split_range(length, unit, other_blocks) == expected
