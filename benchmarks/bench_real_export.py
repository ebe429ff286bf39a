"""Exporting a real checkpoint as GPTQ: SmolLM2-135M quantized by lowbit, reloaded by GPTQModel and transformers.

Does the exported checkpoint score the same perplexity in both loaders as lowbit's own model?

Per bit width (``--bits``), lowbit quantizes the float model (the ``smollm2-135m`` alias, as in
``bench_real_quantize.py``: same calibration windows, ``--nsamples`` x ``--seqlen`` tokens of GSM8K train text)
with its default GPTQ (``QuantConfig(method="gptq", bits=b)``: group 64, asymmetric, damping 0.01, and whatever
the other defaults are at run time; the JSON records them), and :func:`lowbit.quant.export.export_gptq` writes it
with the tokenizer to a temporary directory (asymmetric, so ``gptq_v2``). Then (a) GPTQModel loads it
(``BACKEND.TORCH``) and (b) ``transformers.AutoModelForCausalLM.from_pretrained(dir, device_map="cpu",
dtype=...)`` loads it (optimum and GPTQModel underneath, no extra argument needed on CPU; it picks its own
kernel), and each scores the same held-out ids (``--eval-windows`` x ``--seqlen`` tokens of GSM8K test text)
with its own forward pass. lowbit's model is scored in float32 and, as the fair reference, in the loaders'
dtype (``--dtype``, fp16 by default: GPTQModel's TORCH kernel computes only in fp16/bf16). Reported per bit
width: every perplexity and its difference (%) to lowbit's same-dtype one, within ``--tolerance`` (0.5%) or
not; the largest ``|W_loader - W_lowbit|`` over all layers (the loader's ``dequantize_weight()`` against
``QuantLinear.dequantize`` in the dtype, before any forward); the kernels the loaders chose; the wall time of
every step.

Kernels on CPU (GPTQModel 7.6, transformers 5.24): GPTQModel's TORCH kernel is ``TorchLinear`` (dequantise, then
``x @ W``). transformers picks ``TorchAtenLinear`` for 4 bits, which casts activations and scales to bf16 for
``aten._weight_int4pack_mm_for_cpu`` whatever the model's dtype (so it is compared with an fp16 reference it does
not quite compute in), and ``TorchLinear`` for 2 bits. ``--transformers-torch-kernel`` also scores transformers
with ``TorchLinear`` forced (``GPTQConfig(backend="torch")``), which reproduces GPTQModel's number exactly.

Usage: ``python benchmarks/bench_real_export.py [--bits 4 2] [--eval-windows 8] [--dtype float16] [--quick]``
(needs ``make real``, GPTQModel, optimum and the GSM8K files; ``--quick``: the tiny model, 4 calibration windows
of 128 tokens, 2 eval windows, 4 bits; ~20 s). Cost on 2 shared CPU cores, per 512-token window: float32 ~4 s,
lowbit fp16 ~19 s, transformers' bf16 int4 kernel ~17 s, ``TorchLinear`` fp16 ~80 s (``x @ W`` in fp16 with
``W`` stored ``(in, out)`` hits a slow GEMM path on CPUs without native fp16: ~7x slower than ``F.linear``, ~40x
slower than bf16). Hence 8 windows (4,096 tokens) by default instead of ``bench_real_quantize``'s 16: every
scorer sees identical ids, so the comparison needs no more tokens; still ~15 (4 bits) to ~25 (2 bits) min per
bit width plus the quantization (2-17 min, depending on the load). ``--dtype bfloat16`` is several times
faster (then GPTQModel casts the fp16 scales to bf16 and matches lowbit exactly, while transformers keeps them
fp16 and dequantises in fp16: its weights differ from lowbit's by bf16 rounding).
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start on CPU without it

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from _common import base_parser, header_line, machine_info, md_table, setup, write_results  # noqa: E402
from bench_real_quantize import gsm8k_windows  # noqa: E402
from torch import nn  # noqa: E402

from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.quant import QuantConfig, QuantLinear, quantize_model  # noqa: E402
from lowbit.quant.export import export_gptq  # noqa: E402
from lowbit.recipes.loading import resolve_model  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TORCH_HF = "transformers, backend=torch"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def no_compile():
    # GPTQModel's kernels torch.compile() their dequantisation; inductor takes ~30 s per shape on this CPU and
    # changes nothing numerically, so everything that touches them runs eagerly.
    return torch._dynamo.config.patch(disable=True)


def kernels(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized linears of a loaded checkpoint (GPTQModel's ``BaseQuantLinear`` subclasses), by name."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


@torch.no_grad()
def max_weight_diff(loaded: nn.Module, qmods: dict[str, QuantLinear], dtype: torch.dtype) -> float:
    """Largest ``|W_loader - W_lowbit|`` over all layers, both dequantised in ``dtype``. Must run before the
    first forward: ``TorchAtenLinear`` repacks its weights for the int4 CPU matmul on first use."""
    ks = kernels(loaded)
    if set(ks) != set(qmods):
        raise RuntimeError(f"the loader quantized {len(ks)} linears, lowbit {len(qmods)}: "
                           f"{sorted(set(ks) ^ set(qmods))[:4]}")
    with no_compile():
        return max(float((ks[n].dequantize_weight().t().to(dtype) - q.dequantize(dtype)).abs().max())
                   for n, q in qmods.items())


def load_gptqmodel(path: Path, dtype: torch.dtype) -> nn.Module:
    from gptqmodel import BACKEND, GPTQModel

    with no_compile():
        return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=dtype).model.eval()


def load_transformers(path: Path, dtype: torch.dtype, backend: str | None = None) -> nn.Module:
    """The plain call a user makes; ``backend`` (a GPTQModel backend name) overrides the kernel it picks."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    kw = {}
    if backend is not None:  # only the loading attributes (backend) of this config are used; the rest is read
        bits = json.loads((path / "config.json").read_text())["quantization_config"]["bits"]
        kw["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    with no_compile(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loading attributes.*")
        return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=dtype, **kw).eval()


# How GPTQModel's CPU kernels compute, where it is not simply the model's dtype.
KERNEL_NOTES = {
    "TorchAtenLinear": "4-bit only: activations and scales cast to bf16, aten._weight_int4pack_mm_for_cpu",
}


def _float_dtypes(model: nn.Module) -> dict[str, int]:
    """How many floating-point parameters and buffers a loaded model holds in each dtype (is it all ``--dtype``?)."""
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            k = str(t.dtype).removeprefix("torch.")
            out[k] = out.get(k, 0) + 1
    return out


def score_upcast(name: str, load: Callable[[Path, torch.dtype], nn.Module], path: Path, dtype: torch.dtype,
                 step: Callable, ppl: Callable[[nn.Module], float], ppl_fp32: float, truth: Callable[[float], float],
                 tolerance: float) -> dict:
    """The loader's model, loaded as usual in ``dtype`` and then cast to float32 before its first forward: the same
    kernels (``TorchLinear`` dequantises and multiplies in the input's dtype) computing in lowbit's float32, which
    separates what the checkpoint holds from what fp16 arithmetic does to a 2-bit model."""
    loaded, t_load = step(f"load ({name}) for float32", lambda: load(path, dtype))
    nn.Module.float(loaded)  # transformers' own .float() refuses quantized models; the kernels follow x's dtype
    kernel_names = sorted({type(k).__name__ for k in kernels(loaded).values()})
    with no_compile():
        p, t_ppl = step(f"ppl {name} float32", lambda: ppl(loaded))
    rel = 100 * (p - ppl_fp32) / ppl_fp32
    return {"scorer": f"{name}, cast to float32 after loading", "kernels": kernel_names, "dtype": "float32",
            "float_tensor_dtypes": _float_dtypes(loaded),
            "attn_implementation": getattr(loaded.config, "_attn_implementation", None), "ppl": p,
            "rel_diff_pct": rel, "reference": "lowbit float32", "vs_float64_pct": truth(p),
            "within_tolerance": abs(rel) <= tolerance, "load_s": t_load, "ppl_s": t_ppl}


def one_bit_width(args, bits: int, fp: nn.Module, tok, calib: torch.Tensor, held: torch.Tensor,
                  tmp: Path) -> dict:
    """Quantize, score, export, load back and score again at one bit width; one record per scorer."""
    dtype = DTYPES[args.dtype]
    ppl = lambda m: perplexity(m, held, args.seqlen, args.eval_windows)  # noqa: E731

    def step(what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        out, dt = timed(fn)
        print(f"[{bits}-bit] {what}: {dt:.1f} s", flush=True)
        return out, dt

    qcfg = QuantConfig(method="gptq", bits=bits)  # lowbit's defaults: what a user exports
    model = copy.deepcopy(fp)
    _, t_quant = step("quantize (lowbit)", lambda: quantize_model(model, qcfg, calib, progress=False))
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    ppl_fp32, t_fp32 = step("ppl lowbit float32", lambda: ppl(model))
    # The truth every low-precision forward approximates: the same quantized model computed in float64.
    ppl_f64, t_f64 = step("ppl lowbit float64", lambda: ppl(copy.deepcopy(model).double()))
    out, t_export = step("export_gptq", lambda: export_gptq(model, tmp / f"gptq-{bits}bit", tokenizer=tok))
    exported = json.loads((out / "quantize_config.json").read_text())
    # The same-dtype reference: the model's weights cast to the dtype, as the export stores them (fp16) and the
    # loaders cast them; QuantLinear then dequantises and multiplies in the input's dtype. Kept as they are:
    # QuantLinear's fp16 scales and zeros (the checkpoint's; a bf16 cast would round the scales), and buffers
    # that are not saved (RoPE's inv_freq), which a loader recomputes in float32 (an fp16 inv_freq alone shifted
    # the tiny model's perplexity by 0.03%).
    keep = [(m, k, b) for m in model.modules() for k, b in m.named_buffers(recurse=False)
            if isinstance(m, QuantLinear) or k in m._non_persistent_buffers_set]
    model.to(dtype)
    for m, k, b in keep:
        setattr(m, k, b)
    ppl_ref, t_ref = step(f"ppl lowbit {args.dtype}", lambda: ppl(model))

    def rel(p: float) -> float:
        return 100 * (p - ppl_ref) / ppl_ref

    def truth(p: float) -> float:
        return 100 * (p - ppl_f64) / ppl_f64

    scores = [
        {"scorer": "lowbit", "kernels": ["QuantLinear"], "dtype": "float64", "ppl": ppl_f64,
         "rel_diff_pct": rel(ppl_f64), "vs_float64_pct": 0.0, "ppl_s": t_f64},
        {"scorer": "lowbit", "kernels": ["QuantLinear"], "dtype": "float32", "ppl": ppl_fp32,
         "rel_diff_pct": rel(ppl_fp32), "vs_float64_pct": truth(ppl_fp32), "ppl_s": t_fp32},
        {"scorer": "lowbit", "kernels": ["QuantLinear"], "dtype": args.dtype, "ppl": ppl_ref, "rel_diff_pct": 0.0,
         "vs_float64_pct": truth(ppl_ref), "ppl_s": t_ref, "float_tensor_dtypes": _float_dtypes(model),
         "attn_implementation": getattr(model.config, "_attn_implementation", None)},
    ]
    loaders: list[tuple[str, Callable[[Path, torch.dtype], nn.Module]]] = [
        ("GPTQModel", load_gptqmodel), ("transformers", load_transformers)]
    while loaders:
        name, load = loaders.pop(0)
        try:
            loaded, t_load = step(f"load ({name})", lambda load=load: load(out, dtype))
        except Exception as e:  # a loader that cannot read the checkpoint is a result, not a crash
            scores.append({"scorer": name, "dtype": args.dtype, "error": f"{type(e).__name__}: {e}"})
            print(f"[{bits}-bit] {name} failed to load: {scores[-1]['error']}", flush=True)
            continue
        kernel_names = sorted({type(k).__name__ for k in kernels(loaded).values()})
        if name == "transformers" and kernel_names != ["TorchLinear"] and args.transformers_torch_kernel:
            # Its automatic choice is not GPTQModel's TORCH kernel: also load with that kernel forced, to tell
            # the checkpoint (read by the same kernel as in GPTQModel) from the kernel's arithmetic.
            loaders.append((TORCH_HF, lambda p, d: load_transformers(p, d, backend="torch")))
        dw = max_weight_diff(loaded, qmods, dtype)
        with no_compile():
            p, t_ppl = step(f"ppl {name}", lambda loaded=loaded: ppl(loaded))
        scores.append({"scorer": name, "kernels": kernel_names,
                       "kernel_notes": [KERNEL_NOTES[k] for k in kernel_names if k in KERNEL_NOTES],
                       "dtype": args.dtype, "float_tensor_dtypes": _float_dtypes(loaded),
                       "attn_implementation": getattr(loaded.config, "_attn_implementation", None), "ppl": p,
                       "rel_diff_pct": rel(p), "vs_float64_pct": truth(p),
                       "within_tolerance": abs(rel(p)) <= args.tolerance,
                       "max_abs_weight_diff": dw, "load_s": t_load, "ppl_s": t_ppl})
        print(f"[{bits}-bit] {name} ({', '.join(kernel_names)}): ppl {p:.4f} ({rel(p):+.3f}% vs lowbit "
              f"{args.dtype} {ppl_ref:.4f}), max abs dW {dw:.3g}", flush=True)
        del loaded  # before the next loader: one loaded model at a time
        if args.float32_too and name != TORCH_HF:
            scores.append(score_upcast(name, load, out, dtype, step, ppl, ppl_fp32, truth, args.tolerance))
    return {"bits": bits, "quant_config": dataclasses.asdict(qcfg), "exported_quantize_config": exported,
            "quantize_s": t_quant, "export_s": t_export, "scores": scores,
            "all_within_tolerance": all(s.get("within_tolerance", True) and "error" not in s for s in scores)}


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=None, help="default 4 2 (--quick: 4)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16",
                    help="what the loaders (and lowbit's reference run) compute in")
    ap.add_argument("--tolerance", type=float, default=0.5, help="allowed |relative ppl difference| in percent")
    ap.add_argument("--float32-too", action="store_true",
                    help="also score each loader's model cast to float32 after loading, against lowbit's float32")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--transformers-torch-kernel", action="store_true",
                    help="where transformers picks another CPU kernel (4 bits: TorchAtenLinear), also score it with "
                         "GPTQModel's TORCH kernel forced (GPTQConfig(backend='torch'); ~5 min more per 4 windows)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.nsamples, args.seqlen, args.eval_windows = "tiny", 4, 128, 2
    args.bits = args.bits or ([4] if args.quick else [4, 2])
    setup(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model)[0]
    tok = AutoTokenizer.from_pretrained(path)
    calib, held = gsm8k_windows(tok, args.nsamples, args.seqlen, args.eval_windows)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    records = []
    with tempfile.TemporaryDirectory(prefix="lowbit_bench_export_") as tmp:
        for bits in args.bits:
            records.append(one_bit_width(args, bits, fp, tok, calib, held, Path(tmp)))
            _write(args, records)  # after every bit width: a long run keeps what it measured


def _write(args, records: list[dict]) -> None:
    info = machine_info()
    rows = []
    for r in records:
        for x in r["scores"]:
            if "error" in x:
                err = x["error"][:100].replace("|", "/")  # a cell of the markdown table
                rows.append([r["bits"], x["scorer"], None, x["dtype"], err, None, None, "NO", None, None, None])
                continue
            kern = ", ".join(x["kernels"]) + ("*" if x.get("kernel_notes") else "")
            within = {True: "yes", False: "NO"}.get(x.get("within_tolerance"), "—")
            dw = x.get("max_abs_weight_diff")
            vs64 = x.get("vs_float64_pct")
            ref = "" if x.get("reference") is None else f" (vs {x['reference']})"
            rows.append([r["bits"], x["scorer"], kern, x["dtype"], f"{x['ppl']:.4f}", f"{x['rel_diff_pct']:+.3f}{ref}",
                         None if vs64 is None else f"{vs64:+.3f}", within, None if dw is None else f"{dw:.3g}",
                         _s(x.get("load_s")), _s(x["ppl_s"])])
    notes = sorted({n for r in records for x in r["scores"] for n in x.get("kernel_notes", [])})
    md = (f"### Exporting {args.model} as GPTQ: perplexity after loading in GPTQModel and transformers\n\n"
          f"{header_line(info, _extra(args))}\n\n"
          + md_table(["bits", "scored by", "kernel", "dtype", "held-out ppl", f"Δ % vs lowbit {args.dtype}",
                      "Δ % vs float64", f"within {args.tolerance}%", "max abs ΔW", "load (s)", "ppl (s)"], rows)
          + "".join(f"\n\n\\* {n}" for n in notes)
          + "\n\n" + md_table(["bits", "lowbit quantize (s)", "export_gptq (s)", "all within tolerance"],
                                [[r["bits"], _s(r["quantize_s"]), _s(r["export_s"]),
                                  "yes" if r["all_within_tolerance"] else "NO"] for r in records]))
    write_results(args.out_dir, "real_export", {"machine": info, "model": args.model, "dtype": args.dtype,
                                                "eval_windows": args.eval_windows, "seqlen": args.seqlen,
                                                "nsamples": args.nsamples, "tolerance_pct": args.tolerance,
                                                "records": records}, md)


def _s(t: float | None) -> str | None:
    return None if t is None else f"{t:.1f}"


def _extra(args) -> str:
    return (f"; calibration {args.nsamples} x {args.seqlen} GSM8K train tokens; held-out perplexity on "
            f"{args.eval_windows} x {args.seqlen} GSM8K test tokens; Δ: relative to lowbit in {args.dtype}; "
            f"max abs ΔW: loader's dequantised weights vs lowbit's, in {args.dtype}")


if __name__ == "__main__":
    main()
