"""The GPU check's benchmark: QuantLinear and adapters against bf16 ``nn.Linear``, and a LLaMA-2-7B-shaped 2-bit
DiaBlo training step's peak memory.

1. QuantLinear (4-bit g128, 2-bit g64, NF4; weights from RTN / NF, which costs nothing to compute) forward + input
   gradient vs a bf16 ``nn.Linear`` forward + input gradient, on 4096x4096 and 11008x4096 at 512, 2048 and 8192
   tokens under bf16 autocast: the paired ratio with its bootstrap 95% interval (target <= 1.15 at 2048 tokens);
   at 2048 tokens also with the fused Triton matmuls (``lowbit.quant.triton_matmul``) instead of the dequantise
   kernel + cuBLAS, to decide which path QuantLinear should take by default on that GPU.
2. DiaBlo N=64 vs LoRA at equal trainable parameters (rank ``out*in / (64*(out+in))``), both on the same 2-bit
   QuantLinear base, forward + backward including the adapter's weight gradients (target <= 1.0).
3. Memory: a LLaMA-2-7B-shaped model built from its config with random bf16 weights on the device (no download),
   quantized to 2 bits (RTN g64), DiaBlo N=64 on q, k, v, up, down, gradient checkpointing, bf16 autocast, AdamW
   (bitsandbytes' paged 8-bit AdamW when installed): peak allocated memory of a training step at 4x512 and
   16x512 tokens (target <= 8 GB at 4x512) and tokens/s.

``--dry-run`` runs the same code path at toy sizes (a 2-layer LLaMA, 256-wide weights, a few tokens) on whatever
device there is: the CPU in the default test run. lowbit is imported from the checkout (``PYTHONPATH=.``); neither
``datasets``, ``bitsandbytes`` nor ``gptqmodel`` is needed.
"""

from __future__ import annotations

import contextlib
import time

import torch
from _common import base_parser, header_line, machine_info, md_table, paired_ratio, setup, write_results
from torch import nn

from lowbit.adapters import AdapterConfig, apply_adapters
from lowbit.adapters.diablo import DiaBloLinear
from lowbit.adapters.lora import LoRALinear
from lowbit.quant import QuantConfig, QuantLinear, nf_quantize, quantize_model, rtn_quantize
from lowbit.quant.qlinear import fused_matmul

FULL = {"shapes": [(4096, 4096), (11008, 4096)], "tokens": [512, 2048, 8192], "batches": [4, 16], "seq": 512}
DRY = {"shapes": [(256, 256), (512, 256)], "tokens": [16, 64], "batches": [1, 2], "seq": 16}
QUANTS = [("4-bit g128", lambda W: rtn_quantize(W, 4, 128)), ("2-bit g64", lambda W: rtn_quantize(W, 2, 64)),
          ("NF4 g64", lambda W: nf_quantize(W, 4, 64))]
TARGET_LINEAR, TARGET_ADAPTER, TARGET_MEMORY_GB = 1.15, 1.0, 8.0


def fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, fused: bool | None = None):
    """One forward + input-gradient pass; ``fused``: force the fused Triton matmuls on or off (``None``: as
    configured)."""
    def run():
        x.grad = None
        with fused_matmul(fused) if fused is not None else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                y = layer(x)
            y.backward(g)
    return run


def fused_available(dev: torch.device) -> bool:
    from lowbit.quant.triton_dequant import available

    return dev.type == "cuda" and available()


def linear_rows(dev, sizes, repeats, most) -> list[dict]:
    rows = []
    for out, inp in sizes["shapes"]:
        W = torch.randn(out, inp, device=dev) * 0.02
        dense = nn.Linear(inp, out, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        dense.weight.copy_(W)
        layers = {name: QuantLinear.from_quantized(q(W)).to(dev) for name, q in QUANTS}
        for n_tok in sizes["tokens"]:
            x = torch.randn(n_tok, inp, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(n_tok, out, device=dev, dtype=torch.bfloat16)
            # The fused Triton matmuls are timed at 2048 tokens only (the target's token count), to keep the
            # script within its budget.
            kernels = [("dequantise + GEMM", False)] + ([("fused Triton", True)]
                                                         if fused_available(dev) and n_tok == 2048 else [])
            for name, layer in layers.items():
                for kernel, fused in kernels:
                    r = paired_ratio(fwd_bwd(layer, x, g, fused if fused else None), fwd_bwd(dense, x, g),
                                     min_repeats=repeats, max_repeats=most, time_cap_s=20,
                                     target=TARGET_LINEAR if n_tok == 2048 else None, device=dev)
                    rows.append({"item": "quantlinear", "shape": [out, inp], "tokens": n_tok, **r, "quant": name,
                                 "kernel": kernel})
    return rows


def adapter_rows(dev, sizes, repeats, most) -> list[dict]:
    rows = []
    for out, inp in sizes["shapes"]:
        base = QuantLinear.from_quantized(rtn_quantize(torch.randn(out, inp) * 0.02, 2, 64)).to(dev)
        n = 64 if inp % 64 == 0 and out % 64 == 0 and min(inp, out) >= 512 else 8
        rank = max(1, out * inp // (n * (out + inp)))
        diablo, lora = DiaBloLinear(base, n).to(dev), LoRALinear(base, rank, 2.0 * rank).to(dev)
        for p in (*diablo.trainable_parameters(), *lora.trainable_parameters()):
            p.data.normal_(0, 0.01)
        params = (sum(p.numel() for p in diablo.trainable_parameters()),
                  sum(p.numel() for p in lora.trainable_parameters()))
        for n_tok in sizes["tokens"]:
            x = torch.randn(n_tok, inp, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(n_tok, out, device=dev, dtype=torch.bfloat16)
            r = paired_ratio(fwd_bwd(diablo, x, g), fwd_bwd(lora, x, g), min_repeats=repeats,
                             max_repeats=most, time_cap_s=20, target=TARGET_ADAPTER, device=dev)
            rows.append({"item": "adapters", "shape": [out, inp], "tokens": n_tok, "num_blocks": n, "rank": rank,
                         "params_diablo_lora": list(params), **r})
    return rows


def llama_config(dry: bool):
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def memory_rows(dev, sizes, dry: bool) -> list[dict]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(llama_config(dry)).to(torch.bfloat16)
    quantize_model(model, QuantConfig(method="rtn", bits=2, group_size=64), progress=False)
    apply_adapters(model, AdapterConfig(adapter="diablo", num_blocks=8 if dry else 64,
                                        targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
                   progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        import bitsandbytes as bnb

        opt, opt_name = bnb.optim.PagedAdamW8bit(params, lr=1e-4), "bitsandbytes PagedAdamW8bit"
    except ImportError:
        opt, opt_name = torch.optim.AdamW(params, lr=1e-4), "torch AdamW"
    rows = []
    for b in sizes["batches"]:
        ids = torch.randint(0, model.config.vocab_size, (b, sizes["seq"]), device=dev)

        def step(ids=ids):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # optimizer state allocated
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        n = 1 if dry else 3
        for _ in range(n):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = (time.perf_counter() - t0) / n
        peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
        rows.append({"item": "memory", "batch": b, "seq": sizes["seq"], "peak_allocated_gb": peak,
                     "tokens_per_s": b * sizes["seq"] / dt, "optimizer": opt_name,
                     "trainable": sum(p.numel() for p in params), "target_gb": TARGET_MEMORY_GB if b == 4 else None,
                     "verdict": (None if peak is None or b != 4 else "met" if peak <= TARGET_MEMORY_GB else "missed")})
    return rows


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes, same code path (CPU in the default tests)")
    args = ap.parse_args()
    dry = args.dry_run or args.quick
    dev = setup(args)
    sizes = DRY if dry else FULL
    repeats = args.repeats or (2 if dry else 5)
    info = machine_info(dev)
    t0 = time.perf_counter()
    most = repeats if dry else max(repeats, 20)
    lin, ada = linear_rows(dev, sizes, repeats, most), adapter_rows(dev, sizes, repeats, most)
    mem = memory_rows(dev, sizes, dry)
    ci = lambda r: f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"  # noqa: E731
    md = (f"### GPU check{' (dry run: toy sizes)' if dry else ''} (`bench_gpu.py`)\n\n{header_line(info)}\n\n"
          "QuantLinear forward + input gradient vs bf16 nn.Linear (bf16 autocast):\n\n"
          + md_table(["weight", "tokens", "QuantLinear", "kernel", "ratio (median)", "95% CI", "pairs", "verdict"],
                     [[f"{r['shape'][0]}x{r['shape'][1]}", r["tokens"], r["quant"], r["kernel"], r["ratio"], ci(r),
                       r["repeats"], r["verdict"]] for r in lin])
          + "\n\nDiaBlo vs LoRA at equal trainable parameters, 2-bit base, forward + backward:\n\n"
          + md_table(["weight", "tokens", "DiaBlo N", "LoRA r", "params DiaBlo / LoRA", "ratio", "95% CI", "verdict"],
                     [[f"{r['shape'][0]}x{r['shape'][1]}", r["tokens"], r["num_blocks"], r["rank"],
                       "{:,} / {:,}".format(*r["params_diablo_lora"]), r["ratio"], ci(r), r["verdict"]] for r in ada])
          + f"\n\nTraining step memory ({'toy 2-layer' if dry else 'LLaMA-2-7B-shaped'}, 2-bit RTN, DiaBlo, "
            "gradient checkpointing, bf16 autocast):\n\n"
          + md_table(["tokens", "peak allocated GB", "tokens/s", "optimizer", "trainable", "verdict"],
                     [[f"{r['batch']}x{r['seq']}", r["peak_allocated_gb"], r["tokens_per_s"], r["optimizer"],
                       f"{r['trainable']:,}", r["verdict"]] for r in mem]))
    write_results(args.out_dir, "gpu", {"machine": info, "dry_run": dry, "device": str(dev), "rows": lin + ada + mem,
                                        "seconds": time.perf_counter() - t0}, md)


if __name__ == "__main__":
    main()
