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

import sys

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# Codes per "unit" of whole bytes: a unit is lcm(bits, 8) bits (1 byte for 2/4/8 bits, 3 bytes for 3 bits).
CODES_PER_UNIT = {2: 4, 3: 8, 4: 2, 8: 1}
# In memory, little-endian int32 words of a run are exactly the run's little-endian bitstream, byte by byte:
# byte j holds stream bits [8j, 8j + 8). The byte-level unpacking below relies on that.
_LITTLE_ENDIAN = sys.byteorder == "little"


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


def code_planes(stream: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Split a packed bitstream, viewed as bytes, into the codes at each position of its byte units.

    ``stream`` is uint8 ``(..., nbytes)`` (``packed.view(torch.uint8)`` of whole 32-code runs, or a run-aligned
    slice of it). With ``k = CODES_PER_UNIT[bits]``, plane ``j`` ``(..., nbytes·8 / (bits·k))`` holds codes
    ``j, k + j, 2k + j, …``, as uint8 (2/4/8 bits) or int32 (3 bits). Only byte-sized integer ops over
    ``1/k`` of the codes each: no int32 tensor the size of the weight is ever made.
    """
    k = CODES_PER_UNIT[bits]
    mask = (1 << bits) - 1
    if bits == 8:
        return [stream]
    if bits == 3:  # 3 bytes = 8 codes: assemble each unit into the low 24 bits of an int32
        b = stream.unflatten(-1, (-1, 3)).to(torch.int32)
        v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    else:
        v = stream
    top = 8 // bits - 1 if bits != 3 else -1  # the highest code of a byte needs no mask after the shift
    return [v & mask if j == 0 else v >> (j * bits) if j == top else (v >> (j * bits)) & mask for j in range(k)]


def packed_bytes(packed: torch.Tensor) -> torch.Tensor | None:
    """int32 words ``(..., W)`` -> their little-endian bitstream as uint8 ``(..., 4W)`` (a view when the last
    dimension is contiguous), or ``None`` on a big-endian host (callers then use :func:`unpack`)."""
    if not _LITTLE_ENDIAN:
        return None
    if packed.stride(-1) != 1:
        packed = packed.contiguous()
    return packed.view(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> ``n`` codes (uint8) along ``dim``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    packed = packed.movedim(dim, -1)
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{packed.shape[-1]} words cannot hold {n} codes of {bits} bits "
                         f"(expected {packed_size(n, bits)})")
    mask = (1 << bits) - 1
    stream = packed_bytes(packed) if packed.dtype == torch.int32 else None
    if stream is not None:
        planes = code_planes(stream, bits)
        if len(planes) == 1:  # 8 bits: the bytes are the codes; copy, never alias the packed storage
            return stream[..., :n].clone().movedim(-1, dim)
        codes = torch.stack(planes, dim=-1).reshape(*packed.shape[:-1], -1)
    elif 32 % bits == 0:
        # No code straddles a word.
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
