"""The fused Triton matmuls (``x @ W^T`` and ``g @ W`` with ``W`` dequantised tile by tile) against a float64
product of the dequantised weight, under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in a subprocess
before triton is imported): every bit width, NF4, groups 32/64/128, act-order ``g_idx``, a partial last group,
row and token counts that are not multiples of the tiles, a 3-D input. fp32: within 1e-5 of the float64 product
(relative to its largest entry); fp16: within 2e-3 of the float64 product of the operands rounded to fp16 (the
output's own rounding); bf16: within 2e-2, as the interpreter (Triton 3.6) rounds fp32 -> bf16 toward zero where a
GPU rounds to nearest (measured: half of all values differ by one ulp, biased), and its bf16 ``tl.dot`` is broken,
so bf16 tiles are multiplied as exact fp32 values there (``UPCAST``); fp16 runs the half-precision ``tl.dot``."""

import json

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton; optional, used on CUDA)")

CASES = [(bits, g, rows, cols, act) for bits in (2, 3, 4, 8) for g, rows, cols, act in
         [(32, 70, 96, False), (64, 33, 200, True), (128, 65, 256, False)]] + \
        [("nf4", g, 17, 192, act) for g, act in ((32, True), (64, False), (128, False))]


def _run_cases() -> list[dict]:
    import torch

    from lowbit.quant import QuantLinear, nf_quantize, rtn_quantize
    from lowbit.quant.qlinear import dequantize_packed
    from lowbit.quant.triton_matmul import triton_matmul_w, triton_matmul_wt

    out = []
    for i, (bits, g, rows, cols, act) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        W = torch.randn(rows, cols, generator=gen)
        qw = nf_quantize(W, 4, g) if bits == "nf4" else rtn_quantize(W, bits, g)
        if act:  # act-order: a column permutation, groups through g_idx
            perm = torch.randperm(cols, generator=gen)
            qw.g_idx = (torch.arange(cols) // g)[perm].to(torch.int32) if qw.g_idx is None else qw.g_idx[perm]
        ql = QuantLinear.from_quantized(qw)
        args = ql.packed_args()
        Wd = dequantize_packed(*args, dtype=torch.float64)
        x = torch.randn(2, 19, cols, generator=gen)
        gy = torch.randn(2, 19, rows, generator=gen)
        res = {"case": [bits, g, rows, cols, act]}
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            xd, gd = x.to(dt), gy.to(dt)
            Wr = Wd.to(dt).double()  # the weight as the kernel rounds it (once, from fp32) before the products
            y, gx = triton_matmul_wt(xd, *args), triton_matmul_w(gd, *args)
            y_ref, gx_ref = xd.double() @ Wr.t(), gd.double() @ Wr
            res[str(dt)] = {
                "dtype_ok": y.dtype == dt and gx.dtype == dt,
                "shapes_ok": tuple(y.shape) == (2, 19, rows) and tuple(gx.shape) == (2, 19, cols),
                "fwd_rel": float((y.double() - y_ref).abs().max() / y_ref.abs().max()),
                "bwd_rel": float((gx.double() - gx_ref).abs().max() / gx_ref.abs().max())}
        out.append(res)
    return out


@pytest.fixture(scope="module")
def results():
    from triton_interp import run_interpreted

    return run_interpreted(__file__)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[str(c) for c in CASES])
def test_fused_matmuls_equal_the_float64_product(results, i):
    r = results[i]
    assert r["case"] == list(CASES[i])
    tolerance = {"torch.float32": 1e-5, "torch.bfloat16": 2e-2, "torch.float16": 2e-3}
    for dt, tol in tolerance.items():
        x = r[dt]
        assert x["dtype_ok"] and x["shapes_ok"], r
        assert x["fwd_rel"] <= tol and x["bwd_rel"] <= tol, (dt, r)


def test_bad_arguments_are_refused():
    import torch

    from lowbit.quant.triton_matmul import triton_matmul_w, triton_matmul_wt

    q, s = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        triton_matmul_wt(torch.zeros(1, 64), q, s, s, None, None, 5, 64, 32)
    with pytest.raises(ValueError, match="exactly one of zeros"):
        triton_matmul_wt(torch.zeros(1, 64), q, s, None, None, None, 4, 64, 32)
    with pytest.raises(ValueError, match="x has 63 features"):
        triton_matmul_wt(torch.zeros(1, 63), q, s, s, None, None, 4, 64, 32)
    with pytest.raises(ValueError, match="g has 5 features"):
        triton_matmul_w(torch.zeros(1, 5), q, s, s, None, None, 4, 64, 32)


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
