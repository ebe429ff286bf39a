"""QWHA cost: forward+backward time and peak memory of QWHA vs LoRA at equal trainable parameters.

On a 4096→4096 projection (LLaMA-2-7B's q/k/v/o) a frozen fp32 ``nn.Linear`` base is wrapped by
``QWHALinear(base, r)`` (``N = r·(in + out)`` Walsh–Hadamard coefficients at random positions, non-zero) and by
``LoRALinear(base, r, 16)`` — the same parameter count exactly. One step is a forward pass on ``x`` (which requires
grad, as inside a network) and a backward pass of a fixed dense upstream gradient, over 2048 tokens. The base layer
alone is a candidate, and so is "QWHA dense ΔW": the released code's forward, which builds the dense
``ΔW = P·H/√in`` every step and multiplies by ``W + ΔW`` (lowbit's adapter never forms ``ΔW``). Candidates run in
paired rounds (order rotated per round, after a warm-up round); each ratio is the median of the per-round ratios with
its bootstrap 95% interval, rounds added until every interval is within ±5% or ``--time-cap`` seconds. Memory: the
peak RSS (CUDA: peak allocated) above the level before one step, and the bytes autograd saves for backward.

Usage: ``python benchmarks/bench_qwha.py [--quick] [--repeats 5] [--time-cap 90] [--threads N] [--rank 64]
[--tokens 2048] [--no-dense]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

from lowbit.adapters import LoRALinear, QWHALinear

SHAPE = (4096, 4096)  # (in, out)
QUICK_SHAPE = (256, 512)


class DenseQWHA(nn.Module):
    """The released code's forward: ``F.linear(x, W + ΔW)`` with the dense ``ΔW`` rebuilt from the coefficients."""

    def __init__(self, m: QWHALinear) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.m.base.weight + self.m.delta_weight(), self.m.base.bias)


TARGET = 1.2  # QWHA's layer may cost at most 1.2x LoRA's at equal parameters


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank; QWHA gets rank·(in + out) coefficients")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default 2048; 128 with --quick)")
    ap.add_argument("--time-cap", type=float, default=90.0, help="seconds of paired rounds")
    ap.add_argument("--no-dense", action="store_true", help="leave out the dense-ΔW reference forward")
    args = ap.parse_args()
    dev = setup(args)
    inp, out = QUICK_SHAPE if args.quick else SHAPE
    tokens = args.tokens or (128 if args.quick else 2048)
    rank = min(args.rank, 8) if args.quick else args.rank
    repeats = args.repeats or (2 if args.quick else 5)
    info = machine_info(dev)

    torch.manual_seed(0)
    base = nn.Linear(inp, out, bias=False, device=dev).requires_grad_(False)
    qwha = QWHALinear(base, rank)
    with torch.no_grad():
        qwha.coefficients.normal_(std=0.02)  # non-zero, as after the init or some training
    lora = LoRALinear(base, rank, alpha=16.0)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.02)
    cands = {"base only": base, "LoRA": lora, "QWHA": qwha}
    if not args.no_dense:
        cands["QWHA dense ΔW (released code's forward)"] = DenseQWHA(qwha)
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in cands.items()}
    params["QWHA dense ΔW (released code's forward)"] = params["QWHA"]
    x = torch.randn(tokens, inp, device=dev)
    gy = torch.randn(tokens, out, device=dev)

    def step(m):
        def run():
            xi = x.detach().requires_grad_(True)
            m(xi).backward(gy)
            for p in m.parameters():
                p.grad = None
        return run

    def fwd(m):
        return lambda: m(x.detach().requires_grad_(True))

    pr = paired_ratios({k: step(m) for k, m in cands.items()}, "LoRA", min_repeats=repeats, targets={"QWHA": TARGET},
                       max_repeats=3 if args.quick else 30, time_cap_s=args.time_cap, device=dev)
    times = {k: v["times_s"] for k, v in pr["times"].items()}
    rows = []
    for k, m in cands.items():
        mem = peak_memory_delta(step(m), dev)
        vs_lora = pr["ratios"].get(k)
        rows.append({"shape_in_out": [inp, out], "tokens": tokens, "candidate": k, "trainable_params": params[k],
                     "rank": rank, **pr["times"][k],
                     "vs_base": None if k == "base only" else ratio_stats(times[k], times["base only"]),
                     "vs_lora": vs_lora, "ratio_vs_lora": 1.0 if vs_lora is None else vs_lora["ratio"],
                     "peak_mem_delta_bytes": mem["peak_delta_bytes"], "peak_mem_how": mem["how"],
                     "saved_for_backward_bytes": saved_tensor_bytes(fwd(m), m)})
        print(f"{inp}->{out} {tokens} tokens {k}: {1e3 * pr['times'][k]['median_s']:.1f} ms"
              + ("" if vs_lora is None else f", x LoRA {ci_cell(vs_lora)}"), flush=True)

    q = next(r for r in rows if r["candidate"] == "QWHA")
    verdicts = [verdict_row("qwha", f"QWHA / LoRA r={rank} fwd+bwd at equal parameters, {inp}→{out}, {tokens} "
                            f"tokens, fp32", {**q["vs_lora"], "repeats": pr["repeats"]})]
    result = {"benchmark": "qwha", "machine": info, "device": str(dev), "min_repeats": repeats,
              "time_cap_s": args.time_cap, "rank": rank, "tokens": tokens, "quick": args.quick, "rows": rows,
              "verdicts": verdicts, "qwha_over_lora": q["ratio_vs_lora"]}
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    table = md_table(
        ["in→out", "tokens", "candidate", "params", "median ms", "IQR ms", "rounds", "× base [95% CI]",
         "× LoRA [95% CI]", "peak Δ MiB", "saved MiB"],
        [[f"{r['shape_in_out'][0]}→{r['shape_in_out'][1]}", r["tokens"],
          r["candidate"] + (f" r={rank}" if r["candidate"] in ("LoRA", "QWHA") else ""), f"{r['trainable_params']:,}",
          1e3 * r["median_s"], 1e3 * r["iqr_s"], r["repeats"], ci_cell(r["vs_base"]) if r["vs_base"] else 1.0,
          ci_cell(r["vs_lora"]) if r["vs_lora"] else 1.0, mib(r["peak_mem_delta_bytes"]),
          mib(r["saved_for_backward_bytes"])] for r in rows])
    md = (f"### QWHA cost: forward+backward of one frozen layer + adapter (QWHA vs LoRA at equal parameters)\n\n"
          f"{header_line(info)}; paired rounds (at least {repeats}, until the 95% intervals are within ±5% or "
          f"{args.time_cap:g} s); input requires grad; fp32 adapters; QWHA: fast Walsh–Hadamard transform of the "
          f"input + CSR product (the dense-ΔW row is the released code's forward).\n\n{table}\n")
    write_results(args.out_dir, "qwha", result, md)


if __name__ == "__main__":
    main()
