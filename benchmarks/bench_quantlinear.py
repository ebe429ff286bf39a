"""Packed `QuantLinear` vs dense `nn.Linear` and bitsandbytes `Linear4bit` (NF4): forward+backward time (frozen
weight, input gradient), dequantisation speed, and bytes per weight.

QuantLinear is built as ``QuantLinear.from_quantized(rtn_quantize(W, bits, g))`` (uniform 2/3/4/8 bits, groups of
64 and 128) and ``from_quantized(nf_quantize(W, 4, 64))`` (NF4, the bitsandbytes format). One step is a forward
pass on ``x`` (requires grad) and a backward pass of a fixed dense upstream gradient; all candidates of a group run
in paired rounds (order rotated per round, after a warm-up round) and each is reported as its median time and as
the median of its per-round ratios to an fp32 ``nn.Linear`` of the same round, with the ratio's bootstrap 95%
interval (rounds added until every interval is within ±5% or ``--time-cap``) and a verdict from the interval
against the targets (4-bit ≤ 1.2, 2-bit ≤ 1.25; NF4 against bitsandbytes NF4 ≤ 1.0). The bf16 group
(``nn.Linear`` bf16, QuantLinear/bnb with bf16 compute) uses ``--bf16-tokens`` on CPUs without native bf16 (bf16
matmuls fall back to a scalar kernel there, tens of times slower than fp32). Bytes per weight are counted from the
stored tensors: ``bits + 32/g`` for QuantLinear (fp16 scale + zero per group), plus ``32/out`` for an act-order
``g_idx``.
Dequantisation: the effective bandwidth (packed bytes read + dense bytes written) / time; on CUDA also as a
fraction of the device's peak and of its measured copy bandwidth.

Usage: ``python benchmarks/bench_quantlinear.py [--quick] [--shape 4096x4096] [--tokens 2048] [--repeats 5]
[--time-cap 240]``.
"""

from __future__ import annotations

import torch
from _common import (
    base_parser,
    bf16_note,
    ci_cell,
    gpu_peak_bandwidth_gbs,
    header_line,
    machine_info,
    md_table,
    measured_copy_bandwidth_gbs,
    paired_ratios,
    ratio_stats,
    setup,
    verdict_row,
    write_results,
)
from torch import nn

from lowbit.quant import QuantLinear, nf_quantize, rtn_quantize

BITS = (8, 4, 3, 2)
GROUPS = (128, 64)
BNB_PLAIN = "bnb Linear4bit NF4, fp32 absmax (fp32 compute)"
TARGETS = {4: 1.2, 2: 1.25}  # QuantLinear fwd+bwd / fp32 nn.Linear


def _target(name: str) -> float | None:
    for bits, t in TARGETS.items():
        if name.startswith(f"QuantLinear {bits}-bit"):
            return t
    return None


def _buffer_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.buffers())


def _bnb_linear(W: torch.Tensor, compute_dtype: torch.dtype, compress: bool = True):
    """bitsandbytes NF4 holding ``W`` (blocks of 64; ``compress``: double-quantised absmax, the QLoRA default; without
    it the absmax stays fp32, like lowbit's per-block scales), or the error."""
    try:
        import bitsandbytes as bnb

        out, inp = W.shape
        lin = bnb.nn.Linear4bit(inp, out, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                                compress_statistics=compress, device="cpu")
        lin.weight = bnb.nn.Params4bit(W.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=compress)
        lin = lin.to(W.device)  # quantizes
        qs = lin.weight.quant_state
        nbytes = lin.weight.data.numel() * lin.weight.data.element_size()
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            nbytes += 0 if t is None else t.numel() * t.element_size()
        if getattr(qs, "state2", None) is not None:
            nbytes += sum(t.numel() * t.element_size() for t in (qs.state2.absmax, qs.state2.code))
        x = torch.randn(2, inp, device=W.device, dtype=compute_dtype, requires_grad=True)
        lin(x).float().sum().backward()  # it must run forward and backward here
        return lin, nbytes, f"bitsandbytes {bnb.__version__}"
    except Exception as e:  # noqa: BLE001 - report any failure instead of aborting the benchmark
        return None, None, f"bitsandbytes unavailable: {type(e).__name__}: {e}"[:300]


def _bnb_dequant(lin):
    from bitsandbytes.functional import dequantize_4bit

    return lambda: dequantize_4bit(lin.weight.data, lin.weight.quant_state)


def _step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    def run():
        xi = x.detach().requires_grad_(True)
        layer(xi).backward(gy)
    return run


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN (LLaMA-2-7B: 4096x4096, 11008x4096, 4096x11008)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bf16-tokens", type=int, default=None,
                    help="tokens of the bf16 group (default: --tokens on GPUs and bf16-capable CPUs, else 128)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 group")
    ap.add_argument("--time-cap", type=float, default=240.0, help="seconds of paired rounds per group at most")
    args = ap.parse_args()
    dev = setup(args)
    info = machine_info(dev)
    if args.quick:
        out_f, in_f, tokens, repeats = 256, 512, 64, args.repeats or 1
    else:
        out_f, in_f = map(int, args.shape.lower().split("x"))
        tokens, repeats = args.tokens, args.repeats or 5
    native_bf16 = dev.type == "cuda" or info["isa"]["avx512_bf16"] or info["isa"]["amx_bf16"]
    bf16_tokens = args.bf16_tokens or (tokens if native_bf16 or args.quick else min(tokens, 64))
    rounds = {"min_repeats": repeats, "max_repeats": 3 if args.quick else 30, "time_cap_s": args.time_cap,
              "device": dev}

    torch.manual_seed(0)
    W = torch.randn(out_f, in_f, device=dev) * 0.02
    dense = nn.Linear(in_f, out_f, bias=False, device=dev).requires_grad_(False)
    dense.weight.copy_(W)

    qlayers: dict[str, tuple[QuantLinear, float]] = {}
    for bits in BITS:
        for g in GROUPS:
            qlayers[f"QuantLinear {bits}-bit g{g}"] = (QuantLinear.from_quantized(rtn_quantize(W, bits, g)),
                                                       bits + 32 / g)
    qlayers["QuantLinear NF4 g64"] = (QuantLinear.from_quantized(nf_quantize(W, 4, 64)), 4 + 16 / 64)
    bnb32, bnb_bytes, bnb_status = _bnb_linear(W, torch.float32)
    bnb32_plain, bnb_plain_bytes, _ = _bnb_linear(W, torch.float32, compress=False)
    print(bnb_status, flush=True)

    # ---- fp32 group
    x = torch.randn(tokens, in_f, device=dev)
    gy = torch.randn(tokens, out_f, device=dev)
    cands = {"nn.Linear fp32": dense, **{k: m for k, (m, _) in qlayers.items()}}
    if bnb32 is not None:
        cands["bnb Linear4bit NF4 (fp32 compute)"] = bnb32
    if bnb32_plain is not None:
        cands[BNB_PLAIN] = bnb32_plain
    pr = paired_ratios({k: _step(m, x, gy) for k, m in cands.items()}, "nn.Linear fp32",
                       targets={k: _target(k) for k in cands}, **rounds)
    ts = {k: v["times_s"] for k, v in pr["times"].items()}
    bnb_key = "bnb Linear4bit NF4 (fp32 compute)"
    rows = []
    for k, m in cands.items():
        if k == "nn.Linear fp32":
            bpw, formula = 32.0, 32.0
        elif k == BNB_PLAIN:
            bpw, formula = 8 * bnb_plain_bytes / W.numel(), 4 + 32 / 64
        elif k.startswith("bnb"):
            bpw, formula = 8 * bnb_bytes / W.numel(), 4 + 8 / 64 + 32 / (64 * 256)
        else:
            bpw, formula = 8 * _buffer_bytes(m) / W.numel(), qlayers[k][1]
        rows.append({"layer": k, "compute": "fp32", "tokens": tokens, "bits_per_weight": bpw,
                     "bits_per_weight_formula": formula, **pr["times"][k], "vs_fp32_linear": pr["ratios"].get(k),
                     "ratio_vs_fp32_linear": pr["ratios"][k]["ratio"] if k in pr["ratios"] else 1.0})
    vs_bnb = {}
    if bnb32 is not None:
        vs_bnb["NF4 g64 vs bitsandbytes NF4, fp32 compute"] = ratio_stats(ts["QuantLinear NF4 g64"], ts[bnb_key], 1.0)
    if bnb32_plain is not None:
        vs_bnb["NF4 g64 vs bitsandbytes NF4 without double quantisation, fp32 compute"] = ratio_stats(
            ts["QuantLinear NF4 g64"], ts[BNB_PLAIN], 1.0)

    # ---- bf16 group (its own fp32 baseline, same token count)
    if not args.no_bf16:
        xb = torch.randn(bf16_tokens, in_f, device=dev)
        gyb = torch.randn(bf16_tokens, out_f, device=dev)
        dense16 = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        dense16.weight.copy_(W)
        b16 = {"nn.Linear fp32": (dense, torch.float32), "nn.Linear bf16": (dense16, torch.bfloat16)}
        for k in ("QuantLinear 4-bit g128", "QuantLinear 2-bit g64", "QuantLinear NF4 g64"):
            src = qlayers[k][0]
            q16 = QuantLinear.from_quantized(src.to_quantized(), compute_dtype=torch.bfloat16)
            b16[k + " (bf16 compute)"] = (q16, torch.bfloat16)
        bnb16, _, _ = _bnb_linear(W, torch.bfloat16)
        if bnb16 is not None:
            b16["bnb Linear4bit NF4 (bf16 compute)"] = (bnb16, torch.bfloat16)
        pr16 = paired_ratios({k: _step(m, xb.to(dt), gyb.to(dt)) for k, (m, dt) in b16.items()}, "nn.Linear fp32",
                             **{**rounds, "min_repeats": max(2, repeats // 2) if not native_bf16 else repeats,
                                "time_cap_s": 0.0 if not native_bf16 else args.time_cap})
        for k in b16:
            if k == "nn.Linear fp32":
                continue
            rows.append({"layer": k, "compute": "bf16", "tokens": bf16_tokens, "bits_per_weight": None,
                         "bits_per_weight_formula": None, **pr16["times"][k], "vs_fp32_linear": pr16["ratios"][k],
                         "ratio_vs_fp32_linear": pr16["ratios"][k]["ratio"],
                         "fp32_linear_median_s_same_tokens": pr16["times"]["nn.Linear fp32"]["median_s"]})
        if bnb16 is not None:
            t16 = {k: v["times_s"] for k, v in pr16["times"].items()}
            vs_bnb["NF4 g64 vs bitsandbytes NF4, bf16 compute"] = ratio_stats(
                t16["QuantLinear NF4 g64 (bf16 compute)"], t16["bnb Linear4bit NF4 (bf16 compute)"], 1.0)

    # ---- dequantisation alone (fp32 output)
    deq = {k: (lambda m=m: m.dequantize(torch.float32)) for k, (m, _) in qlayers.items()}
    if bnb32 is not None:
        deq["bnb Linear4bit NF4 (fp32 compute)"] = _bnb_dequant(bnb32)
    base_dq = "bnb Linear4bit NF4 (fp32 compute)" if bnb32 is not None else "QuantLinear 4-bit g128"
    prd = paired_ratios(deq, base_dq, **rounds)
    peak_bw = gpu_peak_bandwidth_gbs(dev) if dev.type == "cuda" else None
    copy_bw = measured_copy_bandwidth_gbs(dev) if dev.type == "cuda" else None
    dq_rows = []
    for k in deq:
        stored = (_buffer_bytes(qlayers[k][0]) if k in qlayers else bnb_bytes)
        moved = stored + 4 * W.numel()
        med = prd["times"][k]["median_s"]
        gbs = moved / med / 1e9
        dq_rows.append({"layer": k, **prd["times"][k], "bytes_moved": moved, "effective_gbs": gbs,
                        "vs": base_dq, "vs_ratio": prd["ratios"].get(k),
                        "fraction_of_peak_bandwidth": gbs / peak_bw if peak_bw else None,
                        "fraction_of_copy_bandwidth": gbs / copy_bw if copy_bw else None})

    # ---- storage of an act-order layer (g_idx) without quantizing one
    act = {f"{b}-bit g{g} act-order": 8 * _buffer_bytes(QuantLinear(in_f, out_f, b, g, act_order=True)) / W.numel()
           for b in (4, 2) for g in (128, 64)}

    def row(name):
        return next((r for r in rows if r["layer"] == name), None)

    headline = {
        "4bit_g128_vs_fp32_linear": row("QuantLinear 4-bit g128")["ratio_vs_fp32_linear"],
        "4bit_g64_vs_fp32_linear": row("QuantLinear 4-bit g64")["ratio_vs_fp32_linear"],
        "2bit_g128_vs_fp32_linear": row("QuantLinear 2-bit g128")["ratio_vs_fp32_linear"],
        "2bit_g64_vs_fp32_linear": row("QuantLinear 2-bit g64")["ratio_vs_fp32_linear"],
        **{k: v["ratio"] for k, v in vs_bnb.items()},
        "bf16_linear_vs_fp32_linear": (row("nn.Linear bf16") or {}).get("ratio_vs_fp32_linear"),
    }
    verdicts = [verdict_row("quantlinear", f"{r['layer']} fwd+bwd / fp32 nn.Linear, {out_f}×{in_f}, {tokens} "
                            "tokens", {**r["vs_fp32_linear"], "repeats": r["repeats"]})
                for r in rows if r["compute"] == "fp32" and r["vs_fp32_linear"] and r["vs_fp32_linear"]["target"]]
    verdicts += [verdict_row("quantlinear", f"QuantLinear {k} (fwd+bwd, {out_f}×{in_f})",
                             {**v, "repeats": len(v["ratios"])}) for k, v in vs_bnb.items()]
    result = {"benchmark": "quantlinear", "machine": info, "device": str(dev), "shape": [out_f, in_f],
              "tokens": tokens, "bf16_tokens": None if args.no_bf16 else bf16_tokens, "repeats": repeats,
              "quick": args.quick, "bitsandbytes": bnb_status, "bf16_note": bf16_note(info), "rows": rows,
              "dequantize": dq_rows, "act_order_bits_per_weight": act, "headline": headline,
              "vs_bitsandbytes": vs_bnb, "verdicts": verdicts}

    def bpw(r):
        if r["bits_per_weight"] is None:
            return None
        return f"{r['bits_per_weight']:.3f} ({r['bits_per_weight_formula']:.3f})"

    def verdict(r):
        v = r["vs_fp32_linear"]
        return None if not v or v["target"] is None else f"{v['verdict']} (≤ {v['target']:g})"

    t1 = md_table(["layer", "compute", "tokens", "bits/weight (formula)", "median ms", "IQR ms", "rounds",
                   "× fp32 Linear [95% CI]", "verdict"],
                  [[r["layer"], r["compute"], r["tokens"], bpw(r), 1e3 * r["median_s"], 1e3 * r["iqr_s"],
                    r["repeats"], ci_cell(r["vs_fp32_linear"]) if r["vs_fp32_linear"] else 1.0, verdict(r)]
                   for r in rows])
    tb = md_table(["ratio", "median [95% CI]", "rounds", "verdict (≤ 1)"],
                  [[k, ci_cell(v), len(v["ratios"]), v["verdict"]] for k, v in vs_bnb.items()])
    t2 = md_table(["dequantise (fp32 out)", "median ms", f"× {base_dq} [95% CI]", "effective GB/s"]
                  + (["% of peak", "% of copy bw"] if dev.type == "cuda" else []),
                  [[r["layer"], 1e3 * r["median_s"], ci_cell(r["vs_ratio"]) if r["vs_ratio"] else 1.0,
                    r["effective_gbs"]]
                   + ([100 * r["fraction_of_peak_bandwidth"] if r["fraction_of_peak_bandwidth"] else None,
                       100 * r["fraction_of_copy_bandwidth"]] if dev.type == "cuda" else []) for r in dq_rows])
    notes = ["act-order adds the int32 g_idx: " + ", ".join(f"{k} = {v:.3f} bits/weight" for k, v in act.items()),
             bnb_status if bnb32 is None else f"{bnb_status}: NF4, blocks of 64, double-quantised absmax (QLoRA "
                                              f"defaults); its bits/weight formula is 4 + 8/64 + 32/(64·256); "
                                              f"like for like with lowbit's NF4: `{BNB_PLAIN}` "
                                              "(compress_statistics=False: 4 + 32/64)"]
    if bf16_note(info):
        notes.append(bf16_note(info))
    md = (f"### QuantLinear: forward+backward of a frozen {out_f}×{in_f} layer (input gradient)\n\n"
          f"{header_line(info)}; paired rounds (at least {repeats}; until the intervals are within ±5% or "
          f"{args.time_cap:g} s per group); bf16 group: its own fp32 baseline.\n\n"
          f"{t1}\n\n{tb}\n\n{t2}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    write_results(args.out_dir, "quantlinear", result, md)


if __name__ == "__main__":
    main()
