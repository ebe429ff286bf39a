"""Adapter initialisation time per layer: CLoQ, LoftQ (1 and 5 iterations) and calibrated DiaBlo.

For a 4096×4096 weight (``--shapes`` adds e.g. 11008x4096) with realistic calibration activations (as in
``bench_quantize.py``: correlated channels, outliers; ``H = X^T X``) and ``Q`` = RTN 4-bit g128 dequantised:
``cloq_init(W, Q, H, r)`` and ``loftq_init(W, 4, r, iters)`` (NF4, blocks of 64) with ``r = 64``, and
``diablo_calibrated_init(W, Q, H, N)`` with ``N = 64`` (the paper settings). Each is timed once after a small
warm-up (they take seconds to minutes). The LoftQ iterations are identical (quantize, float64 SVD of the
``(out, in)`` residual, rank-r product); ``--extrapolate-loftq`` reports LoftQ-5 as 5 × the measured iteration
instead of timing it (the table marks which). Also reported: each method's objective — CLoQ / calibrated
DiaBlo: the relative calibrated error ``‖X(W - Q - Δ)^T‖ / ‖X(W - Q)^T‖``; LoftQ: ``‖W - Q - BA‖_F / ‖W‖_F``.

Usage: ``python benchmarks/bench_init.py [--quick] [--shapes 4096x4096,11008x4096] [--rank 64]
[--extrapolate-loftq]``. Runtime on a 2-core CPU: about 4 minutes per 4096×4096 layer.
"""

from __future__ import annotations

import torch
from _common import (
    base_parser,
    header_line,
    machine_info,
    md_table,
    realistic_activations,
    setup,
    timed_once,
    write_results,
)

from lowbit.adapters import cloq_init, diablo_calibrated_init, loftq_init
from lowbit.adapters.cloq import cloq_objective
from lowbit.adapters.diablo import blocks_to_dense
from lowbit.quant import rtn_quantize


def bench_shape(out_f: int, in_f: int, tokens: int, rank: int, n_blocks: int, full: bool,
                dev: torch.device) -> list[dict]:
    rows: list[dict] = []
    torch.manual_seed(0)
    W = torch.randn(out_f, in_f, device=dev) * 0.02
    X = realistic_activations(tokens, in_f, dev)
    H = X.T @ X
    Q = rtn_quantize(W, 4, 128).dequantize()
    E = W - Q
    base_err = cloq_objective(E, H, torch.zeros_like(E)) ** 0.5
    wn = float(W.norm())

    def add(method, seconds, err, err_kind, note=""):
        rows.append({"shape_out_in": [out_f, in_f], "method": method, "seconds": seconds,
                     "objective": err, "objective_kind": err_kind, "note": note})
        print(f"{out_f}x{in_f} {method}: {seconds:.2f} s  {err_kind} {err:.4f}", flush=True)

    t, (A, B) = timed_once(lambda: cloq_init(W, Q, H, rank), dev)
    add(f"CLoQ (r={rank})", t, cloq_objective(E, H, B @ A) ** 0.5 / base_err, "calibrated error / RTN's")
    t, blocks = timed_once(lambda: diablo_calibrated_init(W, Q, H, n_blocks), dev)
    D = blocks_to_dense(blocks, in_f, out_f).T
    add(f"calibrated DiaBlo (N={n_blocks})", t, cloq_objective(E, H, D) ** 0.5 / base_err,
        "calibrated error / RTN's")
    hist: list[float] = []
    t1, _ = timed_once(lambda: loftq_init(W, 4, rank, iters=1, history=hist), dev)
    add(f"LoftQ 1 iteration (r={rank}, NF4)", t1, hist[-1] / wn, "‖W - Q - BA‖ / ‖W‖")
    if full:
        hist5: list[float] = []
        t5, _ = timed_once(lambda: loftq_init(W, 4, rank, iters=5, history=hist5), dev)
        add(f"LoftQ 5 iterations (r={rank}, NF4)", t5, hist5[-1] / wn, "‖W - Q - BA‖ / ‖W‖")
    else:
        add(f"LoftQ 5 iterations (r={rank}, NF4)", 5 * t1, float("nan"), "‖W - Q - BA‖ / ‖W‖",
            note="5 × the measured iteration (--extrapolate-loftq)")
    return rows


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096", help="comma-separated OUTxIN weight shapes")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank of CLoQ/LoftQ")
    ap.add_argument("--blocks", type=int, default=64, help="DiaBlo N")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--extrapolate-loftq", action="store_true",
                    help="report LoftQ-5 as 5 × one measured iteration instead of timing it")
    args = ap.parse_args()
    dev = setup(args)
    info = machine_info(dev)
    if args.quick:
        shapes, tokens, rank, n_blocks = [(128, 256)], 512, 8, 16
    else:
        shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes.split(",")]
        tokens, rank, n_blocks = args.tokens, args.rank, args.blocks
    full = not args.extrapolate_loftq

    # Warm-up on a small problem: the first LAPACK/SVD calls load kernels.
    w = torch.randn(64, 128, device=dev)
    xw = torch.randn(256, 128, device=dev)
    qw = rtn_quantize(w, 4, 64).dequantize()
    cloq_init(w, qw, xw.T @ xw, 4), loftq_init(w, 4, 4, 1), diablo_calibrated_init(w, qw, xw.T @ xw, 4)

    rows = []
    for out_f, in_f in shapes:
        rows += bench_shape(out_f, in_f, tokens, rank, n_blocks, full, dev)

    result = {"benchmark": "init", "machine": info, "device": str(dev), "tokens": tokens, "rank": rank,
              "num_blocks": n_blocks, "quick": args.quick, "rows": rows}
    table = md_table(["weight (out×in)", "method", "seconds", "objective", "objective kind", "note"],
                     [[f"{r['shape_out_in'][0]}×{r['shape_out_in'][1]}", r["method"], r["seconds"],
                       None if r["objective"] != r["objective"] else r["objective"], r["objective_kind"], r["note"]]
                      for r in rows])
    md = (f"### Adapter initialisation time per layer (Q = RTN 4-bit g128; {tokens} calibration tokens)\n\n"
          f"{header_line(info)}; one timed run each.\n\n{table}\n")
    write_results(args.out_dir, "init", result, md)


if __name__ == "__main__":
    main()
