"""Bit packing (lowbit.quant.packing): round trips, sizes, and the documented bitstream layout.

The layout is checked against a pure-Python big-integer model: a run of 32 codes is the integer
``S = sum(code_k << (k*bits))`` and word ``w`` of the run is ``(S >> 32w) & 0xFFFFFFFF`` read as a signed
int32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import pack, unpack

BITS = (2, 3, 4, 8)
SETTINGS = settings(max_examples=60, deadline=None)


def _codes(rows: int, cols: int, bits: int, seed: int, mode: str) -> torch.Tensor:
    maxq = 2**bits - 1
    if mode == "zeros":
        return torch.zeros(rows, cols, dtype=torch.int64)
    if mode == "max":  # every bit set: catches sign-extension and straddling bugs
        return torch.full((rows, cols), maxq, dtype=torch.int64)
    if mode == "alternate":
        return (torch.arange(rows * cols).reshape(rows, cols) % 2) * maxq
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, maxq + 1, (rows, cols), generator=g)


code_cases = st.tuples(
    st.integers(1, 7),  # rows
    st.integers(1, 100),  # cols
    st.sampled_from(BITS),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["random", "random", "zeros", "max", "alternate"]),
)


def _to_signed32(x: int) -> int:
    return x - 2**32 if x >= 2**31 else x


def _expected_words(codes_1d: list[int], bits: int) -> list[int]:
    """Pure-Python packing of one line of codes: little-endian bitstream per run of 32, zero padded."""
    n = len(codes_1d)
    padded = codes_1d + [0] * ((-n) % 32)
    words = []
    for r in range(0, len(padded), 32):
        s = 0
        for k, c in enumerate(padded[r:r + 32]):
            s |= c << (k * bits)
        words += [_to_signed32((s >> (32 * w)) & 0xFFFFFFFF) for w in range(bits)]
    return words


@SETTINGS
@given(code_cases)
def test_roundtrip_last_dim(case):
    rows, cols, bits, seed, mode = case
    codes = _codes(rows, cols, bits, seed, mode)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, -(-cols // 32) * bits)
    back = unpack(packed, bits, cols)
    assert back.shape == codes.shape
    assert torch.equal(back.long(), codes)


@SETTINGS
@given(code_cases)
def test_roundtrip_dim0(case):
    # Pack along the first dimension: here `cols` plays the role of the packed length.
    rows, cols, bits, seed, mode = case
    codes = _codes(cols, rows, bits, seed, mode)  # (cols, rows): pack the length-`cols` dimension
    packed = pack(codes, bits, dim=0)
    assert packed.shape == (-(-cols // 32) * bits, rows)
    back = unpack(packed, bits, cols, dim=0)
    assert torch.equal(back.long(), codes)
    # Packing along dim 0 is packing the transpose along dim -1.
    assert torch.equal(packed, pack(codes.t().contiguous(), bits).t())


@SETTINGS
@given(code_cases)
def test_bitstream_layout_matches_python_ints(case):
    rows, cols, bits, seed, mode = case
    codes = _codes(rows, cols, bits, seed, mode)
    packed = pack(codes, bits)
    for r in range(rows):
        assert packed[r].tolist() == _expected_words(codes[r].tolist(), bits)


@pytest.mark.parametrize("bits", BITS)
def test_single_code_position(bits):
    # Code k alone (all others 0) must set exactly the bits [k*bits, (k+1)*bits) of the run's bitstream.
    maxq = 2**bits - 1
    for k in range(32):
        codes = torch.zeros(1, 32, dtype=torch.int64)
        codes[0, k] = maxq
        words = pack(codes, bits)[0].tolist()
        s = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
        assert s == maxq << (k * bits), (bits, k)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bad", [-1, "max+1"])
def test_out_of_range_codes_raise(bits, bad):
    value = 2**bits if bad == "max+1" else bad
    codes = torch.zeros(2, 40, dtype=torch.int64)
    codes[1, 17] = value
    with pytest.raises(ValueError, match=str(value)):
        pack(codes, bits)


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, 32])
def test_unsupported_bits_raise(bits):
    codes = torch.zeros(2, 32, dtype=torch.int64)
    with pytest.raises(ValueError, match=str(bits)):
        pack(codes, bits)
    with pytest.raises(ValueError, match=str(bits)):
        unpack(torch.zeros(2, 4, dtype=torch.int32), bits, 32)


def test_unpack_wrong_word_count_raises():
    packed = pack(torch.zeros(3, 40, dtype=torch.int64), 4)  # 2 runs -> 8 words
    with pytest.raises(ValueError, match="8"):
        unpack(packed[:, :4], 4, 40)
