"""Quantization time per layer: RTN, NF4, GPTQ, MagR+GPTQ (lowbit) and GPTQ (GPTQModel), on LLaMA-2-7B shapes.

Calibration activations are realistic rather than white: ``X = (Z A) ⊙ c + 0.05·noise`` with ``Z A`` of rank
in/8 (correlated channels), log-normal channel scales ``c`` and 8 outlier channels ×25, over 4096 tokens;
``H = X^T X``. Every method quantizes to 4 bits with groups of 128 (NF4: blocks of 64), asymmetric, no act-order,
damping 0.01. GPTQModel 7.6's own ``GPTQ`` class is driven directly on an ``nn.Linear`` holding the same weight
(``add_batch(X)`` then ``quantize()``, ``act_group_aware`` off so that both run plain GPTQ), and, with
``--ist-gptq``, the original implementation's ``fasterquant`` on the same ``H``; the GPTQs run in paired rounds
(at least 5, order rotated) and each ratio lowbit / peer is the median of the per-round ratios with its bootstrap
95% interval and a verdict (≤ 1) from it. Only ``quantize()`` is timed for
GPTQModel and only ``gptq_quantize(W, H)`` for lowbit; the Hessian accumulation of each is reported separately.
MagR (200 proximal iterations in the paper) costs one ``(out, in)·(in, in)`` matmul per iteration; on CPU it is
timed with ``--magr-iters`` iterations and 0 iterations and extrapolated linearly to 200 (marked in the table).
The relative output error ``‖X(W - Q)^T‖/‖X W^T‖`` of each result is reported too.

Usage: ``python benchmarks/bench_quantize.py [--quick] [--shapes 4096x4096,11008x4096] [--no-gptqmodel]
[--ist-gptq DIR] [--time-cap 300]`` (``DIR``: a checkout of IST-DASLab/gptq, fetched at benchmark time)
(shapes are OUTxIN). Runtime on a 2-core CPU: a few minutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start on CPU without it

import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    base_parser,
    ci_cell,
    header_line,
    interleaved,
    machine_info,
    md_table,
    paired_ratios,
    ratio_stats,
    realistic_activations,
    setup,
    summary,
    timed_once,
    verdict_row,
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


class ISTReference:
    """The original GPTQ code (IST-DASLab/gptq: ``gptq.py`` + ``quant.py``), read from a directory the user fetched
    (``--ist-gptq DIR``; never vendored): ``GPTQ(layer)`` with ``H`` set to the same matrix, ``Quantizer`` configured
    asymmetric per channel, ``fasterquant(blocksize=128, percdamp, groupsize)``. Its ``torch.cuda.synchronize()``
    and prints are silenced on a machine without CUDA."""

    def __init__(self, directory: str) -> None:
        import hashlib
        import importlib
        import sys

        d = Path(directory).resolve()
        missing = [f for f in ("gptq.py", "quant.py") if not (d / f).is_file()]
        if missing:
            raise SystemExit(f"--ist-gptq {directory}: {', '.join(missing)} not found there; pass a checkout of "
                             "https://github.com/IST-DASLab/gptq")
        sys.path.insert(0, str(d))
        self.gptq = importlib.import_module("gptq")
        self.quant = importlib.import_module("quant")
        digest = hashlib.sha256((d / "gptq.py").read_bytes() + (d / "quant.py").read_bytes()).hexdigest()[:12]
        self.status = f"IST-DASLab/gptq reference (sha256 {digest})"

    def make(self, W: torch.Tensor, H: torch.Tensor):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
        with torch.no_grad():
            lin.weight.copy_(W)
        task = self.gptq.GPTQ(lin)
        task.H = H.clone()  # damping is relative to mean(diag H): the scale of H does not matter
        task.quantizer = self.quant.Quantizer()
        task.quantizer.configure(BITS, perchannel=True, sym=False, mse=False)
        return task

    def run(self, task) -> torch.Tensor:
        import contextlib
        import io
        from unittest import mock

        sync = mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None)
        with sync if not torch.cuda.is_available() else contextlib.nullcontext(), \
                contextlib.redirect_stdout(io.StringIO()):
            task.fasterquant(blocksize=128, percdamp=DAMP, groupsize=GROUP)
        return task.layer.weight.data.float()


def gptq_rounds(fns, prepare, baseline, results, t_gq_add, reps, time_cap, dev, add, headline, verdicts,
                status, shape, out_f, in_f) -> None:
    """lowbit's GPTQ against each peer in paired rounds; a row per implementation and a ratio lowbit / peer."""
    pr = paired_ratios(fns, baseline, min_repeats=reps, max_repeats=3 if reps < 5 else 30, time_cap_s=time_cap,
                       targets={"lowbit": 1.0}, device=dev, prepare=prepare)
    times = {k: v["times_s"] for k, v in pr["times"].items()}
    add(f"GPTQ {BITS}-bit g{GROUP} (lowbit)", times["lowbit"], results["lowbit"])
    notes = {"GPTQModel": "quantize() only", "reference": "fasterquant()"}
    for k in fns:
        if k == "lowbit":
            continue
        vs = ratio_stats(times["lowbit"], times[k], 1.0)
        extra = {"hessian_add_batch_s": statistics.median(t_gq_add)} if k == "GPTQModel" else {}
        add(f"GPTQ {BITS}-bit g{GROUP} ({status[k]})", times[k], results[k], note=notes[k], lowbit_over_this=vs,
            **extra)
        headline[f"gptq_lowbit_over_{k} {shape}"] = vs["ratio"]
        verdicts.append(verdict_row("quantize", f"GPTQ 4-bit g128 time per layer, lowbit / {status[k]}, "
                                    f"{out_f}×{in_f}", {**vs, "repeats": pr["repeats"]}))


def bench_shape(out_f: int, in_f: int, tokens: int, dev: torch.device, reps_fast: int, reps_gptq: int,
                magr_timed: int, gq, gq_status: str, ist, time_cap: float, headline: dict,
                verdicts: list[dict]) -> list[dict]:
    """All methods on one weight shape; returns the table rows and fills ``headline`` and ``verdicts``."""
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

    # GPTQ: lowbit, GPTQModel and the reference in paired rounds on the same W and H; each peer's per-call state
    # (a fresh task holding H) is built untimed before its timed call.
    results: dict[str, torch.Tensor] = {}
    fns = {"lowbit": lambda: results.__setitem__("lowbit",
                                                 gptq_quantize(W, H, BITS, GROUP, damp=DAMP).dequantize())}
    prepare, state, t_gq_add = {}, {}, []
    if gq is not None:
        make, add_batch, run = gq

        def prep_gq():
            state["gq"] = make(W, X)
            t_gq_add.append(timed_once(lambda: add_batch(state["gq"], X), dev)[0])

        prepare["GPTQModel"] = prep_gq
        fns["GPTQModel"] = lambda: results.__setitem__("GPTQModel", run(state.pop("gq")))
    if ist is not None:
        prepare["reference"] = lambda: state.__setitem__("ist", ist.make(W, H))
        fns["reference"] = lambda: results.__setitem__("reference", ist.run(state.pop("ist")))
    baseline = "GPTQModel" if gq is not None else "reference" if ist is not None else None
    if baseline is None:  # nothing to compare with: lowbit alone
        ts = interleaved(fns, reps_gptq, warmup=1, device=dev)
        add(f"GPTQ {BITS}-bit g{GROUP} (lowbit)", ts["lowbit"], results["lowbit"])
    else:
        gptq_rounds(fns, prepare, baseline, results, t_gq_add, reps_gptq, time_cap, dev, add, headline, verdicts,
                    {"GPTQModel": gq_status, "reference": ist.status if ist else ""}, shape, out_f, in_f)

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
    ap.add_argument("--ist-gptq", default=None, metavar="DIR",
                    help="a checkout of github.com/IST-DASLab/gptq (gptq.py, quant.py): also time the reference")
    ap.add_argument("--time-cap", type=float, default=300.0, help="seconds of paired GPTQ rounds per shape at most")
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
    ist = ISTReference(args.ist_gptq) if args.ist_gptq else None
    ist_status = ist.status if ist else "not run (pass --ist-gptq DIR, a checkout of github.com/IST-DASLab/gptq)"

    rows, headline, verdicts = [], {}, []
    for out_f, in_f in shapes:
        reps_fast = args.repeats or (1 if args.quick else 3)
        reps_gptq = args.repeats or (2 if args.quick else 5)
        rows += bench_shape(out_f, in_f, tokens, dev, reps_fast, reps_gptq, magr_timed, gq, gq_status, ist,
                            args.time_cap, headline, verdicts)

    result = {"benchmark": "quantize", "machine": info, "device": str(dev), "tokens": tokens, "bits": BITS,
              "group_size": GROUP, "damp": DAMP, "quick": args.quick, "gptqmodel": gq_status, "reference": ist_status,
              "rows": rows, "headline": headline, "verdicts": verdicts}
    table = md_table(["weight (out×in)", "method", "median s", "spread s", "runs", "rel. output error",
                      "lowbit / this [95% CI]", "verdict (≤ 1)", "note"],
                     [[f"{r['shape_out_in'][0]}×{r['shape_out_in'][1]}", r["method"], r["median_s"],
                       r["spread_s"], r["repeats"], r["rel_output_error"],
                       ci_cell(r["lowbit_over_this"]) if r.get("lowbit_over_this") else None,
                       r["lowbit_over_this"]["verdict"] if r.get("lowbit_over_this") else None, r["note"]]
                      for r in rows])
    hl = (f"GPTQ rounds: paired (lowbit, GPTQModel, reference; order rotated; each peer's task built untimed); "
          f"reference: {ist_status}")
    md = (f"### Quantization time per layer ({BITS}-bit, group {GROUP}, {tokens} calibration tokens)\n\n"
          f"{header_line(info)}.\n\n{table}\n\n{hl or gq_status}\n")
    write_results(args.out_dir, "quantize", result, md)


if __name__ == "__main__":
    main()
