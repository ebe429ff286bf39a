"""Tiny-model training step: time and peak memory of DiaBlo vs LoRA on fp32, 4-bit and 2-bit (RTN) bases.

The embedded tiny LLaMA (``lowbit.models.tiny.TINY_MODEL_DIR``, 3.7M parameters, 4 layers of width 256) gets
DiaBlo (N = 16) or LoRA (r = 16, α = 16) on q, k, v, up, down through ``apply_adapters``; the base is kept fp32 or
quantized with ``QuantConfig(method="rtn", bits=b, group_size=64)`` (all seven projections per layer). One step
= forward + loss + backward + AdamW update on a batch of 16 × 256 random tokens.

Time: all six configurations live in one process and take their steps in paired rounds (one step each, order
rotated per round) after 2 warm-up rounds; each ratio to the fp32-base LoRA run (and DiaBlo / LoRA on the same
base) is the median of the per-round ratios with its bootstrap 95% interval, rounds added from ``--steps`` until
the intervals are within ±5% or ``--time-cap`` seconds. A quantized base is reported against the target "costs at
most 10% more step time than fp32" (``≤ 1.1``), DiaBlo against LoRA with ``≤ 1.05``. Memory: each configuration again
in its own subprocess running 3 steps, reporting its own peak RSS (``VmHWM`` read inside the child: Python, torch,
the model, activations, optimizer state; ``ru_maxrss`` is not used, as a child started by ``subprocess`` inherits
its parent's high-water mark on Linux) and the rise of the peak RSS during the 3 steps over the RSS before
them (``VmHWM`` reset first; on CUDA the peak allocated bytes); plus the model's parameter + buffer bytes
(exact) and its base weights' share.

Usage: ``python benchmarks/bench_train_tiny.py [--quick] [--steps 10] [--time-cap 120] [--threads N]``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from _common import (
    base_parser,
    ci_cell,
    header_line,
    machine_info,
    md_table,
    module_bytes,
    own_peak_rss_bytes,
    paired_ratios,
    peak_memory_delta,
    ratio_stats,
    setup,
    verdict_row,
    write_results,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
CONFIGS = [(base, adapter) for base in ("fp32", "4-bit", "2-bit") for adapter in ("lora", "diablo")]


def build(base: str, adapter: str, device: torch.device):
    """The tiny model with adapters on ``base`` (``fp32`` | ``4-bit`` | ``2-bit``), its optimizer and a report."""
    from transformers import AutoModelForCausalLM

    from lowbit.adapters import AdapterConfig, apply_adapters
    from lowbit.models.tiny import TINY_MODEL_DIR
    from lowbit.quant import QuantConfig

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).to(device)
    quant = None if base == "fp32" else QuantConfig(method="rtn", bits=int(base[0]), group_size=64)
    cfg = AdapterConfig(adapter=adapter, rank=16, alpha=16.0, num_blocks=16, targets=list(TARGETS))
    report = apply_adapters(model, cfg, quant=quant, progress=False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    total = module_bytes(model)
    return model, opt, {"trainable_params": report["trainable"], "param_buffer_bytes": total,
                        "base_bytes": total - adapter_bytes, "adapter_bytes": adapter_bytes}


def make_step(model, opt, batch: torch.Tensor):
    losses: list[float] = []

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return step, losses


def random_batch(vocab: int, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def worker(args) -> None:
    """One configuration in a fresh process: 3 steps; prints one JSON line with peak RSS figures."""
    dev = setup(args)
    base, adapter = args.worker.split(":")
    model, opt, sizes = build(base, adapter, dev)
    batch = random_batch(model.config.vocab_size, args.batch, args.seq, dev)
    step, losses = make_step(model, opt, batch)
    hwm_before = own_peak_rss_bytes()  # this process's own peak so far (the reset below clears it)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def steps():
        for _ in range(3):
            step()
    rise = peak_memory_delta(steps, dev)["peak_delta_bytes"]
    hwm_after = own_peak_rss_bytes()
    peak = max(hwm_before, hwm_after) if hwm_before and hwm_after else None
    out = {"config": args.worker, "peak_rss_bytes": peak, "peak_rss_before_steps_bytes": hwm_before,
           "peak_rise_bytes": rise, "losses": losses, **sizes}
    if dev.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--time-cap", type=float, default=120.0, help="seconds of paired rounds at most")
    ap.add_argument("--worker", default=None, help="internal: run one BASE:ADAPTER configuration")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq = 2, 32
    if args.worker:
        return worker(args)
    dev = setup(args)
    info = machine_info(dev)
    steps = args.steps or args.repeats or (1 if args.quick else 10)

    configs = [("fp32", "lora"), ("2-bit", "diablo")] if args.quick else CONFIGS
    built = {f"{b} {a}": build(b, a, dev) for b, a in configs}
    vocab = next(iter(built.values()))[0].config.vocab_size
    batch = random_batch(vocab, args.batch, args.seq, dev)
    fns, losses = {}, {}
    for k, (model, opt, _) in built.items():
        fns[k], losses[k] = make_step(model, opt, batch)
    targets = {k: 1.1 for k in fns if not k.startswith("fp32")}
    pr = paired_ratios(fns, "fp32 lora", min_repeats=max(2, steps), max_repeats=3 if args.quick else 40,
                       time_cap_s=args.time_cap, warmup=1 if args.quick else 2, targets=targets, device=dev)
    ts = {k: v["times_s"] for k, v in pr["times"].items()}

    # Peak memory: one subprocess per configuration.
    mem = {}
    for b, a in configs:
        cmd = [sys.executable, __file__, "--worker", f"{b}:{a}", "--batch", str(args.batch), "--seq",
               str(args.seq), "--device", dev.type] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            mem[f"{b} {a}"] = {"error": (proc.stderr or proc.stdout)[-500:]}
        else:
            mem[f"{b} {a}"] = json.loads(line[len("RESULT "):])

    rows = []
    for k, (_, _, sizes) in built.items():
        m = mem.get(k, {})
        vs = pr["ratios"].get(k)
        base, adapter = k.split()
        vs_lora = ratio_stats(ts[k], ts[f"{base} lora"], 1.05) if adapter == "diablo" and f"{base} lora" in ts else None
        rows.append({"config": k, **pr["times"][k], "vs_fp32_lora": vs, "diablo_vs_lora": vs_lora,
                     "ratio_vs_fp32_lora": 1.0 if vs is None else vs["ratio"],
                     **sizes, "peak_rss_bytes": m.get("peak_rss_bytes"),
                     "rss_peak_increase_bytes": m.get("peak_rise_bytes"),
                     "cuda_max_allocated_bytes": m.get("cuda_max_allocated_bytes"),
                     "memory_error": m.get("error"), "losses": [round(x, 4) for x in losses[k]]})

    def by(k):
        return next((r for r in rows if r["config"] == k), None)

    def rel(key, b, a):
        q, f = by(f"{b} {a}"), by(f"fp32 {a}")
        return q[key] / f[key] if q and f and q[key] and f[key] else None

    less = {f"{b} {a}": {"param_buffer_bytes_vs_fp32": rel("param_buffer_bytes", b, a),
                         "peak_rss_vs_fp32": rel("peak_rss_bytes", b, a),
                         "peak_rise_vs_fp32": rel("rss_peak_increase_bytes", b, a)}
            for b in ("4-bit", "2-bit") for a in ("lora", "diablo") if by(f"{b} {a}")}
    result = {"benchmark": "train_tiny", "machine": info, "device": str(dev), "batch": [args.batch, args.seq],
              "steps": steps, "rounds": pr["repeats"], "targets": TARGETS, "quick": args.quick, "rows": rows,
              "verdicts": [verdict_row("train_tiny", f"tiny-model step, {r['config']} / fp32 lora",
                                       {**r["vs_fp32_lora"], "repeats": pr["repeats"]})
                           for r in rows if r["vs_fp32_lora"] and r["vs_fp32_lora"]["target"] is not None]
              + [verdict_row("train_tiny", f"tiny-model step, DiaBlo / LoRA on the {r['config'].split()[0]} base",
                             {**r["diablo_vs_lora"], "repeats": pr["repeats"]}) for r in rows if r["diablo_vs_lora"]],
              "quantized_vs_fp32_memory": less,
              "diablo_over_lora": {b: by(f"{b} diablo")["median_s"] / by(f"{b} lora")["median_s"]
                                   for b in ("fp32", "4-bit", "2-bit") if by(f"{b} diablo") and by(f"{b} lora")}}
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    def cv(v):
        return (None, None) if v is None else (ci_cell(v), v["verdict"])

    table = md_table(["base", "adapter", "trainable", "median ms/step", "IQR ms", "× fp32 LoRA [95% CI]",
                      "verdict (≤ 1.1)", "DiaBlo × LoRA [95% CI]", "verdict (≤ 1.05)",
                      "params+buffers MiB", "of which base MiB", "peak RSS MiB", "peak RSS rise MiB"],
                     [[r["config"].split()[0], r["config"].split()[1], f"{r['trainable_params']:,}",
                       1e3 * r["median_s"], 1e3 * r["iqr_s"], *cv(r["vs_fp32_lora"]), *cv(r["diablo_vs_lora"]),
                       mib(r["param_buffer_bytes"]),
                       mib(r["base_bytes"]), mib(r["peak_rss_bytes"]), mib(r["rss_peak_increase_bytes"])]
                      for r in rows])
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f} %"

    verdict = "; ".join(f"{k}: params+buffers {pct(v['param_buffer_bytes_vs_fp32'])}, peak RSS "
                        f"{pct(v['peak_rss_vs_fp32'])}, peak rise {pct(v['peak_rise_vs_fp32'])} of the fp32 base's"
                        for k, v in less.items())
    md = (f"### Tiny-model training step ({args.batch}×{args.seq} tokens, AdamW, adapters on {','.join(TARGETS)})\n\n"
          f"{header_line(info)}; {pr['repeats']} paired rounds of one step each; memory from one subprocess per "
          f"configuration.\n\n{table}\n\nQuantized vs fp32 base: {verdict}.\n")
    write_results(args.out_dir, "train_tiny", result, md)


if __name__ == "__main__":
    main()
