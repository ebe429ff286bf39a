"""Quantization time per layer: RTN, NF4, GPTQ, MagR+GPTQ (lowbit) and GPTQ (GPTQModel), on LLaMA-2-7B shapes.

Calibration activations are realistic rather than white: ``X = (Z A) ⊙ c + 0.05·noise`` with ``Z A`` of rank
in/8 (correlated channels), log-normal channel scales ``c`` and 8 outlier channels ×25, over 4096 tokens;
``H = X^T X``. Every method quantizes to 4 bits with groups of 128 (NF4: blocks of 64), asymmetric, no act-order,
damping 0.01. GPTQModel 7.6's own ``GPTQ`` class is driven directly on an ``nn.Linear`` holding the same weight
(``add_batch(X)`` then ``quantize()``, ``act_group_aware`` off so that both run plain GPTQ), and the two GPTQs
alternate in the same process; the ratio lowbit/GPTQModel is the headline. Only ``quantize()`` is timed for
GPTQModel and only ``gptq_quantize(W, H)`` for lowbit; the Hessian accumulation of each is reported separately.
MagR (200 proximal iterations in the paper) costs one ``(out, in)·(in, in)`` matmul per iteration; on CPU it is
timed with ``--magr-iters`` iterations and 0 iterations and extrapolated linearly to 200 (marked in the table).
The relative output error ``‖X(W - Q)^T‖/‖X W^T‖`` of each result is reported too.

Usage: ``python benchmarks/bench_quantize.py [--quick] [--shapes 4096x4096,11008x4096] [--no-gptqmodel]``
(shapes are OUTxIN). Runtime on a 2-core CPU: a few minutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start on CPU without it

import statistics  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    base_parser,
    header_line,
    interleaved,
    machine_info,
    md_table,
    realistic_activations,
    setup,
    summary,
    timed_once,
    write_results,
)
from torch import nn  # noqa: E402

from lowbit.quant import gptq_quantize, magr, nf_quantize, output_error, rtn_quantize  # noqa: E402

BITS, GROUP, DAMP = 4, 128, 0.01
MAGR_ALPHA, MAGR_ITERS = 1e-4, 200  # the paper's per-group penalty and iteration count


def gptqmodel_quantizer():
    """A function (W, X) -> (prepare, run) driving GPTQModel's GPTQ on one layer, or an error string."""
    try:
        from gptqmodel.quantization.config import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ
        from gptqmodel.version import __version__
    except Exception as e:  # noqa: BLE001
        return None, f"GPTQModel unavailable: {type(e).__name__}: {e}"[:300]

    def make(W: torch.Tensor, X: torch.Tensor):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
        with torch.no_grad():
            lin.weight.copy_(W)
        cfg = QuantizeConfig(bits=BITS, group_size=GROUP, desc_act=False, act_group_aware=False, sym=False,
                             damp_percent=DAMP, offload_to_disk=False)
        task = GPTQ(lin, cfg)
        task.quantizer.configure(perchannel=True)
        return task

    def add_batch(task, X):
        task.add_batch(X[None], None)

    def run(task):
        Q = task.quantize()[0]  # (Q, scale, zero, g_idx, duration, avg_loss, damp, nsamples)
        return Q.float()

    return (make, add_batch, run), f"GPTQModel {__version__}"


def bench_shape(out_f: int, in_f: int, tokens: int, dev: torch.device, reps_fast: int, reps_gptq: int,
                magr_timed: int, gq, gq_status: str, headline: dict) -> list[dict]:
    """All methods on one weight shape; returns the table rows and fills ``headline``."""
    rows: list[dict] = []
    torch.manual_seed(0)
    W = torch.randn(out_f, in_f, device=dev) * 0.02
    X = realistic_activations(tokens, in_f, dev)
    t_h, H = timed_once(lambda: X.T @ X, dev)
    shape = f"{out_f}x{in_f}"

    def add(method, ts, Q=None, note="", **extra):
        s = summary(ts) if isinstance(ts, list) else {"median_s": ts, "spread_s": 0.0, "repeats": 1}
        err = None if Q is None else output_error(W, Q, H)
        rows.append({"shape_out_in": [out_f, in_f], "method": method, **s, "rel_output_error": err,
                     "note": note, **extra})
        print(f"{shape} {method}: {s['median_s']:.2f} s  err {err}", flush=True)

    add("H = X^T X (lowbit, fp32)", [t_h])
    ts = interleaved({"rtn": lambda: rtn_quantize(W, BITS, GROUP), "nf": lambda: nf_quantize(W, 4, 64)},
                     reps_fast, warmup=1, device=dev)
    add(f"RTN {BITS}-bit g{GROUP}", ts["rtn"], rtn_quantize(W, BITS, GROUP).dequantize())
    add("NF4 (blocks of 64)", ts["nf"], nf_quantize(W, 4, 64).dequantize())

    # GPTQ: lowbit and GPTQModel alternate; GPTQModel's per-repeat state is built outside the timing.
    results: dict[str, torch.Tensor] = {}
    t_lb, t_gq, t_gq_add = [], [], []
    make, add_batch, run = gq if gq is not None else (None, None, None)
    for _ in range(reps_gptq):
        dt, qw = timed_once(lambda: gptq_quantize(W, H, BITS, GROUP, damp=DAMP), dev)
        t_lb.append(dt)
        results["lowbit"] = qw.dequantize()
        if gq is not None:
            task = make(W, X)
            t_gq_add.append(timed_once(lambda task=task: add_batch(task, X), dev)[0])
            dt, Q = timed_once(lambda task=task: run(task), dev)
            t_gq.append(dt)
            results["gptqmodel"] = Q
            del task
    add(f"GPTQ {BITS}-bit g{GROUP} (lowbit)", t_lb, results["lowbit"])
    if gq is not None:
        add(f"GPTQ {BITS}-bit g{GROUP} ({gq_status})", t_gq, results["gptqmodel"],
            note="quantize() only", hessian_add_batch_s=statistics.median(t_gq_add))
        headline[f"gptq_lowbit_over_gptqmodel {shape}"] = statistics.median(t_lb) / statistics.median(t_gq)

    # MagR: fixed cost (spectral norm) + per-iteration cost, then GPTQ on its output.
    magr(W[:8], H, alpha=MAGR_ALPHA, iters=1, group_size=GROUP)  # warm-up (first LAPACK call loads kernels)
    t0 = timed_once(lambda: magr(W, H, alpha=MAGR_ALPHA, iters=0, group_size=GROUP), dev)[0]
    tk, W_hat = timed_once(lambda: magr(W, H, alpha=MAGR_ALPHA, iters=magr_timed, group_size=GROUP), dev)
    per_iter = max(0.0, (tk - t0) / magr_timed)
    t_magr = t0 + MAGR_ITERS * per_iter if magr_timed != MAGR_ITERS else tk
    t_mg, qm = timed_once(lambda: gptq_quantize(W_hat, H, BITS, GROUP, damp=DAMP), dev)
    if magr_timed != MAGR_ITERS:
        note = (f"MagR timed at {magr_timed} iterations ({per_iter:.3f} s/iter + {t0:.2f} s setup) and "
                f"extrapolated to {MAGR_ITERS}; error after the timed iterations")
    else:
        note = f"{MAGR_ITERS} iterations timed"
    add(f"MagR ({MAGR_ITERS} it., α={MAGR_ALPHA:g}) + GPTQ", t_magr + t_mg, qm.dequantize(), note=note,
        magr_s=t_magr, gptq_s=t_mg, magr_per_iter_s=per_iter)
    return rows


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated OUTxIN weight shapes")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--magr-iters", type=int, default=None,
                    help="MagR iterations actually timed (default: 200 on CUDA, 10 on CPU, then extrapolated)")
    ap.add_argument("--no-gptqmodel", action="store_true")
    args = ap.parse_args()
    dev = setup(args)
    info = machine_info(dev)
    if args.quick:
        shapes, tokens = [(128, 256)], 512
    else:
        shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes.split(",")]
        tokens = args.tokens
    magr_timed = args.magr_iters or (2 if args.quick else MAGR_ITERS if dev.type == "cuda" else 10)
    gq, gq_status = (None, "skipped (--no-gptqmodel)") if args.no_gptqmodel else gptqmodel_quantizer()
    print(gq_status, flush=True)

    rows, headline = [], {}
    for out_f, in_f in shapes:
        reps_fast = args.repeats or (1 if args.quick else 3)
        reps_gptq = args.repeats or (1 if args.quick or out_f * in_f > 4096 * 4096 else 2)
        rows += bench_shape(out_f, in_f, tokens, dev, reps_fast, reps_gptq, magr_timed, gq, gq_status, headline)

    result = {"benchmark": "quantize", "machine": info, "device": str(dev), "tokens": tokens, "bits": BITS,
              "group_size": GROUP, "damp": DAMP, "quick": args.quick, "gptqmodel": gq_status, "rows": rows,
              "headline": headline}
    table = md_table(["weight (out×in)", "method", "median s", "spread s", "runs", "rel. output error", "note"],
                     [[f"{r['shape_out_in'][0]}×{r['shape_out_in'][1]}", r["method"], r["median_s"],
                       r["spread_s"], r["repeats"], r["rel_output_error"], r["note"]] for r in rows])
    hl = "; ".join(f"{k.split()[1]}: lowbit GPTQ / GPTQModel GPTQ = {v:.2f}" for k, v in headline.items())
    md = (f"### Quantization time per layer ({BITS}-bit, group {GROUP}, {tokens} calibration tokens)\n\n"
          f"{header_line(info)}.\n\n{table}\n\n{hl or gq_status}\n")
    write_results(args.out_dir, "quantize", result, md)


if __name__ == "__main__":
    main()
