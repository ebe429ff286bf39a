"""Bit packing of integer codes into int32 words.

Layout (one for every bit width, and the one GPTQ checkpoints use): along the packed dimension, each run of
32 codes becomes ``bits`` int32 words holding the codes as a little-endian bitstream — code ``k`` of a run
occupies bits ``[k*bits, (k+1)*bits)`` of the run's ``32*bits``-bit string, word ``w`` holding string bits
``[32w, 32w+32)``. For 2, 4 and 8 bits this is the familiar "``32/bits`` codes per word, lowest code in the
lowest bits"; for 3 bits, codes 10 and 21 of each run straddle a word boundary, exactly as in the GPTQ
3-bit layout. The packed dimension is zero-padded to a multiple of 32 codes, so ``n`` codes take
``ceil(n/32)*bits`` words.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    return -(-n // 32) * bits


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    # Values in [0, 2^32) held in int64 -> the int32 with the same bit pattern.
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _layout(bits: int, device: torch.device):
    """For each code k of a 32-code run: (low word, shift, high word, spill) index tensors."""
    k = torch.arange(32, device=device)
    start = k * bits
    lo = start // 32
    shift = start % 32
    spill = (shift + bits) > 32  # code crosses into the next word
    hi = torch.where(spill, lo + 1, lo)
    return lo, shift, hi, spill


def pack(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer ``codes`` (values in ``[0, 2^bits)``) along ``dim`` into int32 words.

    codes: any integer tensor; returns int32 with ``dim`` of size ``packed_size(codes.shape[dim], bits)``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    codes = codes.movedim(dim, -1).to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
                         f"got range [{int(codes.min())}, {int(codes.max())}]")
    n = codes.shape[-1]
    pad = (-n) % 32
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    runs = codes.reshape(*codes.shape[:-1], -1, 32)  # (..., R, 32)
    lo, shift, hi, spill = _layout(bits, codes.device)
    words = torch.zeros(*runs.shape[:-1], bits, dtype=torch.int64, device=codes.device)
    # Each code contributes its low (32 - shift) bits to word `lo` and, if it spills, the rest to `hi`.
    low_part = (runs << shift) & 0xFFFFFFFF
    words.index_add_(-1, lo, low_part)  # bit ranges are disjoint, so add == or
    high_part = torch.where(spill, runs >> (32 - shift).clamp(max=31), torch.zeros_like(runs))
    words.index_add_(-1, hi, high_part)
    out = _to_int32(words).reshape(*runs.shape[:-2], -1)
    return out.movedim(-1, dim)


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> ``n`` codes (uint8) along ``dim``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    packed = packed.movedim(dim, -1)
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{packed.shape[-1]} words cannot hold {n} codes of {bits} bits "
                         f"(expected {packed_size(n, bits)})")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # Fast path: no code straddles a word.
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & mask  # (..., W, per)
        codes = codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    else:
        runs = packed.reshape(*packed.shape[:-1], -1, bits)  # (..., R, bits)
        lo, shift, hi, spill = _layout(bits, packed.device)
        # `>>` on int32 is arithmetic: mask the low part to the bits that belong to the code before
        # or-ing in the spilled high bits.
        low_bits = torch.where(spill, 32 - shift, torch.full_like(shift, bits))
        low = (runs[..., lo] >> shift.to(torch.int32)) & ((1 << low_bits) - 1).to(torch.int32)
        high = runs[..., hi] << (32 - shift).clamp(max=31).to(torch.int32)
        codes = torch.where(spill, low | high, low) & mask
        codes = codes.reshape(*packed.shape[:-1], -1)
    return codes[..., :n].to(torch.uint8).movedim(-1, dim)
