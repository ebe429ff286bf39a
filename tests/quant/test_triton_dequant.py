"""The Triton dequantisation kernel against ``dequantize_packed`` under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set in a subprocess before triton is imported): every bit width, NF4, groups 32/64/128,
act-order ``g_idx``, a partial last group and odd row counts. fp32 output: bit-identical (the same single rounding);
bf16: within 1e-2 relative (the kernel rounds once from fp32, the reference computes in bf16)."""

import json

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton; optional, used on CUDA)")

CASES = [(bits, g, rows, cols, act) for bits in (2, 3, 4, 8) for g in (32, 64, 128) for rows, cols, act in
         [(7, 256, False), (5, 384, True)]] + [("nf4", g, 9, 256, False) for g in (32, 64, 128)] + \
        [(4, 64, 3, 96 + 40, False), (3, 64, 4, 200, False), ("nf4", 64, 3, 160, True)]


def _run_cases() -> list[dict]:
    import torch

    from lowbit.quant import QuantLinear, nf_quantize, rtn_quantize
    from lowbit.quant.qlinear import dequantize_packed
    from lowbit.quant.triton_dequant import triton_dequantize

    out = []
    for i, (bits, g, rows, cols, act) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        W = torch.randn(rows, cols, generator=gen)
        qw = nf_quantize(W, 4, g) if bits == "nf4" else rtn_quantize(W, bits, g)
        if act:  # act-order: a column permutation, groups through g_idx
            perm = torch.randperm(cols, generator=gen)
            qw.g_idx = (torch.arange(cols) // g)[perm].to(torch.int32) if qw.g_idx is None else qw.g_idx[perm]
        ql = QuantLinear.from_quantized(qw)
        args = (ql.qweight, ql.scales, getattr(ql, "zeros", None), getattr(ql, "codebook", None),
                getattr(ql, "g_idx", None), ql.bits, cols, ql.group_size)
        res = {"case": [bits, g, rows, cols, act]}
        for dt in (torch.float32, torch.bfloat16):
            ref = dequantize_packed(*args, dtype=dt)
            got = triton_dequantize(*args, dtype=dt)
            res[str(dt)] = {"equal": bool(torch.equal(got, ref)),
                            "max_rel": float((got.float() - ref.float()).abs().max() / ref.float().abs().max())}
        out.append(res)
    return out


@pytest.fixture(scope="module")
def results():
    from triton_interp import run_interpreted

    return run_interpreted(__file__)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[str(c) for c in CASES])
def test_kernel_equals_dequantize_packed(results, i):
    r = results[i]
    assert r["case"] == list(CASES[i])
    assert r["torch.float32"]["equal"], r
    assert r["torch.bfloat16"]["max_rel"] <= 1e-2, r


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
