"""Packed `QuantLinear` vs dense `nn.Linear`: forward+backward time (frozen weight, input gradient) and bytes/weight.

Ratios are against an fp32 `nn.Linear` run in the same process. Writes `benchmarks/results/quantlinear.json` and
prints a markdown table. Usage: `python benchmarks/bench_quantlinear.py [--shape 4096x4096] [--tokens 2048]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lowbit._io import atomic_write_json
from lowbit.quant import QuantLinear, rtn_quantize


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _fwd_bwd(layer: nn.Module, x: torch.Tensor):
    def run():
        xi = x.detach().requires_grad_(True)
        layer(xi).sum().backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2048x2048", help="OUTxIN (LLaMA-2-7B: 4096x4096, 11008x4096, 4096x11008)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantlinear.json"))
    args = ap.parse_args()
    out_f, in_f = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    W = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(args.tokens, in_f)
    dense = nn.Linear(in_f, out_f, bias=False)
    dense.weight.data.copy_(W)
    dense.weight.requires_grad_(False)
    base = _time(_fwd_bwd(dense, x), args.repeats)
    rows = [{"layer": "nn.Linear fp32", "bits_per_weight": 32.0, "median_s": statistics.median(base),
             "spread_s": max(base) - min(base), "ratio_vs_fp32": 1.0}]
    for bits in (8, 4, 3, 2):
        for g in (128, 64):
            q = QuantLinear.from_quantized(rtn_quantize(W, bits, g))
            ts = _time(_fwd_bwd(q, x), args.repeats)
            nbytes = sum(b.numel() * b.element_size() for b in q.buffers())
            rows.append({"layer": f"QuantLinear {bits}-bit g{g}", "bits_per_weight": 8 * nbytes / W.numel(),
                         "median_s": statistics.median(ts), "spread_s": max(ts) - min(ts),
                         "ratio_vs_fp32": statistics.median(ts) / statistics.median(base)})
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "shape": [out_f, in_f], "tokens": args.tokens,
              "repeats": args.repeats, "rows": rows}
    atomic_write_json(args.out, result)
    print(f"forward+backward, {out_f}x{in_f}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print("| layer | bits/weight | median ms | ratio vs fp32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['bits_per_weight']:.3f} | {1e3 * r['median_s']:.1f} | {r['ratio_vs_fp32']:.2f} |")


if __name__ == "__main__":
    main()
