"""Adapter cost: forward+backward time and peak memory of DiaBlo vs LoRA at equal trainable parameters.

On each LLaMA-2-7B projection shape (in→out: 4096→4096 q/k/v/o, 4096→11008 gate/up, 11008→4096 down) a frozen fp32
``nn.Linear`` base is wrapped by ``DiaBloLinear(base, N)`` (N = 64, ``in·out/N`` parameters) and by
``LoRALinear(base, r, 16)`` with ``r = round(in·out / (N·(in + out)))`` (the same count, to < 1 %). One step is a
forward pass on ``x`` (which requires grad, as inside a network) and a backward pass of a fixed dense upstream
gradient; the base layer alone is the third candidate, and "DiaBlo einsum" is the block-diagonal formula through
plain autograd (the reference the library's implementation is measured against). Candidates run in paired
rounds (order rotated per round, after a warm-up round); each ratio is the median of the per-round ratios with its
bootstrap 95% interval, rounds added until every interval is within ±5% or ``--time-cap`` seconds per shape and
token layout; the verdict (DiaBlo / LoRA ≤ 1.05) comes from the interval. Memory: the peak RSS (CUDA: peak
allocated) above the level before one step, and the bytes autograd saves for backward (activations; the
module's own weights not counted).

Usage: ``python benchmarks/bench_adapters.py [--quick] [--repeats 5] [--time-cap 90] [--threads N] [--blocks 64]``.
"""

from __future__ import annotations

import torch
from _common import (
    base_parser,
    ci_cell,
    header_line,
    machine_info,
    md_table,
    paired_ratios,
    peak_memory_delta,
    ratio_stats,
    saved_tensor_bytes,
    setup,
    verdict_row,
    write_results,
)
from torch import nn

from lowbit.adapters import DiaBloLinear, LoRALinear

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
LAYOUTS = [(1, 2048), (4, 512)]  # (batch, seq)
QUICK_SHAPES = [(256, 512)]
QUICK_LAYOUTS = [(2, 64)]
TARGET = 1.05  # DiaBlo / LoRA at equal trainable parameters


class EinsumDiaBlo(nn.Module):
    """The docs/METHODS.md, Adapters formula through autograd: the reference implementation."""

    def __init__(self, m: DiaBloLinear) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, bi, bo = self.m.blocks.shape
        y = self.m.base(x)
        z = torch.einsum("...ni,nio->...no", x.float().unflatten(-1, (N, bi)), self.m.blocks).flatten(-2)
        return y + z.to(y.dtype)


def lora_rank(inp: int, out: int, n_blocks: int) -> int:
    return max(1, round(inp * out / (n_blocks * (inp + out))))


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64, help="DiaBlo N (LoRA rank follows for equal parameters)")
    ap.add_argument("--time-cap", type=float, default=90.0, help="seconds of paired rounds per shape and layout")
    ap.add_argument("--bf16", action="store_true", help="also a bf16 base (default on CUDA; slow on CPUs "
                                                         "without avx512_bf16)")
    args = ap.parse_args()
    dev = setup(args)
    shapes, layouts = (QUICK_SHAPES, QUICK_LAYOUTS) if args.quick else (SHAPES, LAYOUTS)
    repeats = args.repeats or (2 if args.quick else 5)
    n_blocks = min(args.blocks, 16) if args.quick else args.blocks
    base_dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 or dev.type == "cuda" else [])
    info = machine_info(dev)

    rows = []
    for inp, out in shapes:
        r = lora_rank(inp, out, n_blocks)
        for dtype in base_dtypes:
            torch.manual_seed(0)
            base = nn.Linear(inp, out, bias=False, device=dev, dtype=dtype).requires_grad_(False)
            dia = DiaBloLinear(base, n_blocks)
            with torch.no_grad():
                dia.blocks.normal_(std=0.02)  # non-zero, as after some training (zero blocks cost the same)
            lora = LoRALinear(base, r, alpha=16.0)
            with torch.no_grad():
                lora.lora_B.normal_(std=0.02)
            cands = {"base only": base, "LoRA": lora, "DiaBlo": dia, "DiaBlo einsum (reference)": EinsumDiaBlo(dia)}
            params = {"base only": 0, "LoRA": lora.lora_A.numel() + lora.lora_B.numel(),
                      "DiaBlo": dia.blocks.numel(), "DiaBlo einsum (reference)": dia.blocks.numel()}
            for batch, seq in layouts:
                x = torch.randn(batch, seq, inp, device=dev, dtype=dtype)
                gy = torch.randn(batch, seq, out, device=dev, dtype=dtype)

                def step(m, x=x, gy=gy):
                    def run():
                        xi = x.detach().requires_grad_(True)
                        m(xi).backward(gy)
                        for p in m.parameters():
                            p.grad = None
                    return run

                def fwd(m, x=x):
                    return lambda: m(x.detach().requires_grad_(True))

                pr = paired_ratios({k: step(m) for k, m in cands.items()}, "LoRA", min_repeats=repeats,
                                   max_repeats=3 if args.quick else 30, time_cap_s=args.time_cap,
                                   targets={"DiaBlo": TARGET}, device=dev)
                times = {k: v["times_s"] for k, v in pr["times"].items()}
                for k, m in cands.items():
                    mem = peak_memory_delta(step(m), dev)
                    vs_lora = pr["ratios"].get(k)
                    rows.append({
                        "shape_in_out": [inp, out], "tokens": [batch, seq], "base_dtype": str(dtype)[6:],
                        "candidate": k, "trainable_params": params[k], "lora_rank": r, "num_blocks": n_blocks,
                        **pr["times"][k],
                        "vs_base": None if k == "base only" else ratio_stats(times[k], times["base only"]),
                        "vs_lora": vs_lora,
                        "ratio_vs_base": pr["times"][k]["median_s"] / pr["times"]["base only"]["median_s"],
                        "ratio_vs_lora": 1.0 if vs_lora is None else vs_lora["ratio"],
                        "peak_mem_delta_bytes": mem["peak_delta_bytes"], "peak_mem_how": mem["how"],
                        "saved_for_backward_bytes": saved_tensor_bytes(fwd(m), m),
                    })
                    print(f"{inp}->{out} {batch}x{seq} {str(dtype)[6:]} {k}: "
                          f"{1e3 * pr['times'][k]['median_s']:.1f} ms"
                          + ("" if vs_lora is None else f", x LoRA {ci_cell(vs_lora)} {vs_lora['verdict']}"),
                          flush=True)
            del base, dia, lora, cands

    headline = [r for r in rows if r["candidate"] == "DiaBlo"]
    verdicts = [verdict_row("adapters", f"DiaBlo N={r['num_blocks']} / LoRA r={r['lora_rank']} fwd+bwd, "
                            f"{r['shape_in_out'][0]}→{r['shape_in_out'][1]}, {r['tokens'][0]}×{r['tokens'][1]} "
                            f"tokens, {r['base_dtype']}", {**r["vs_lora"], "repeats": r["repeats"]})
                for r in headline]
    result = {"benchmark": "adapters", "machine": info, "device": str(dev), "min_repeats": repeats,
              "time_cap_s": args.time_cap, "num_blocks": n_blocks, "quick": args.quick, "rows": rows,
              "verdicts": verdicts,
              "diablo_over_lora": {f"{r['shape_in_out'][0]}->{r['shape_in_out'][1]} {r['tokens'][0]}x"
                                   f"{r['tokens'][1]} {r['base_dtype']}": r["ratio_vs_lora"] for r in headline}}
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    table = md_table(
        ["in→out", "tokens", "base", "candidate", "params", "median ms", "IQR ms", "rounds", "× base [95% CI]",
         "× LoRA [95% CI]", "verdict (≤ 1.05)", "peak Δ MiB", "saved MiB"],
        [[f"{r['shape_in_out'][0]}→{r['shape_in_out'][1]}", f"{r['tokens'][0]}×{r['tokens'][1]}", r["base_dtype"],
          r["candidate"] + (f" r={r['lora_rank']}" if r["candidate"] == "LoRA" else
                            f" N={r['num_blocks']}" if r["candidate"].startswith("DiaBlo") else ""),
          f"{r['trainable_params']:,}", 1e3 * r["median_s"], 1e3 * r["iqr_s"], r["repeats"],
          ci_cell(r["vs_base"]) if r["vs_base"] else 1.0, ci_cell(r["vs_lora"]) if r["vs_lora"] else 1.0,
          r["vs_lora"]["verdict"] if r["vs_lora"] and r["vs_lora"]["target"] else None,
          mib(r["peak_mem_delta_bytes"]), mib(r["saved_for_backward_bytes"])] for r in rows])
    md = (f"### Adapter cost: forward+backward of one frozen layer + adapter (DiaBlo vs LoRA at equal parameters)\n\n"
          f"{header_line(info)}; paired rounds (at least {repeats}, until the 95% intervals are within ±5% or "
          f"{args.time_cap:g} s per row group); input requires grad; fp32 adapters.\n\n"
          f"{table}\n")
    write_results(args.out_dir, "adapters", result, md)


if __name__ == "__main__":
    main()
