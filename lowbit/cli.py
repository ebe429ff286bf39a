"""The ``lowbit`` command line: ``lowbit quantize ...``, ``lowbit demo``.

Every subcommand validates its arguments before loading a model, and imports heavy libraries lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("lowbit")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "torchao"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_list(values: list[str] | None) -> list[str]:
    return [v for item in (values or []) for v in item.split(",") if v]


# --------------------------------------------------------------------------------------------------- quantize

def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    p.add_argument("--method", required=True, help="rtn, gptq, magr-gptq, magr-rtn or nf")
    p.add_argument("--bits", type=int, required=True, help="2, 3, 4 or 8 (nf: 2 or 4)")
    p.add_argument("--group-size", type=int, default=64, help="inputs per scale; -1 = per output channel")
    p.add_argument("--calib", nargs="+", default=None,
                   help="calibration text: .txt/.json/.jsonl files (or wikitext2/c4 with network access)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", required=True, help="output directory for the quantized model")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by descending diag(H)")
    p.add_argument("--static-groups", action="store_true", help="GPTQ act-order with contiguous groups")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--clip-search", action="store_true", help="MSE range search for scales (helps at 2 bits)")
    p.add_argument("--magr-alpha", type=float, default=None)
    p.add_argument("--magr-iters", type=int, default=200)
    p.add_argument("--targets", nargs="+", default=None, help="linear names, e.g. q_proj,k_proj (default all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the full-precision model in")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available)")
    p.add_argument("--ppl-windows", type=int, default=16, help="held-out windows scored for perplexity (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding another model")
    p.add_argument("--export-gptq", default=None, metavar="DIR",
                   help="also export a GPTQ-format checkpoint (loads with GPTQModel / transformers)")


def _check_out_dir(out: Path, source: str, fingerprint: str, quant: dict, overwrite: bool) -> None:
    """Refuse to overwrite a directory holding something else (a different model or different settings)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is a file; choose a directory path")
    if not any(out.iterdir()) or overwrite:
        return
    qc = out / "quant_config.json"
    if not qc.is_file():
        raise SystemExit(f"error: --out {out} is a non-empty directory that is not a lowbit quantized model; "
                         f"choose another --out or pass --overwrite to replace it")
    meta = json.loads(qc.read_text())
    old_src = meta.get("source", {})
    if old_src.get("fingerprint") != fingerprint or old_src.get("model") != source or meta.get("quantization") != quant:
        raise SystemExit(f"error: --out {out} already holds a different quantized model "
                         f"(source {old_src.get('model')!r}, method {meta.get('quantization', {}).get('method')!r}, "
                         f"bits {meta.get('quantization', {}).get('bits')!r}); choose another --out or pass "
                         f"--overwrite to replace it")
    log.info("%s holds the same model and settings; it will be replaced", out)


def _error_table(report: list[dict]) -> str:
    lines = ["| layer | module | shape | rel. output error | rel. weight error | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in report:
        oe = f"{r['rel_output_error']:.4f}" if "rel_output_error" in r else "n/a"
        lines.append(f"| {r['layer']} | {r['module']} | {r['shape'][0]}×{r['shape'][1]} | {oe} | "
                     f"{r['rel_weight_error']:.4f} | {r['time_s']:.2f} |")
    return "\n".join(lines)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from .quant.model import QuantConfig

    # 1. Cheap validation first: settings, output directory, calibration files.
    try:
        qcfg = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                           act_order=args.act_order, static_groups=args.static_groups, damp=args.damp,
                           clip_search=args.clip_search, magr_alpha=args.magr_alpha, magr_iters=args.magr_iters,
                           targets=_split_list(args.targets) or None)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    calib = _split_list(args.calib)
    if qcfg.needs_calibration and not calib:
        raise SystemExit(f"error: method {args.method!r} needs calibration data; pass --calib FILE "
                         f"(.txt/.json/.jsonl) with at least --seqlen {args.seqlen} tokens of text")
    if args.nsamples <= 0 or args.seqlen <= 0:
        raise SystemExit(f"error: --nsamples and --seqlen must be positive (got {args.nsamples}, {args.seqlen})")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .eval.perplexity import perplexity
    from .data.calibration import split_calibration, tokenize_sources
    from .quant.model import quantize_model
    from .quant.serialization import config_fingerprint, save_quantized

    try:
        hf_config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read a model config from --model {args.model!r}: {e}") from None
    out = Path(args.out)
    _check_out_dir(out, args.model, config_fingerprint(hf_config), qcfg.to_dict(), args.overwrite)
    if args.export_gptq and Path(args.export_gptq).exists() and any(Path(args.export_gptq).iterdir()):
        raise SystemExit(f"error: --export-gptq {args.export_gptq} is a non-empty directory; choose another path")

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = held = None
    if calib:
        try:
            ids = tokenize_sources(tok, calib)
            windows, held = split_calibration(ids, args.nsamples, args.seqlen, seed=args.seed)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        log.info("calibration: %d windows of %d tokens; %d held-out tokens", *windows.shape, len(held))

    # 2. The expensive part.
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    ppl_before = ppl_after = None
    if held is not None and args.ppl_windows > 0 and len(held) >= 2:
        ppl_before = perplexity(model, held, args.seqlen, args.ppl_windows)
    try:
        report = quantize_model(model, qcfg, windows)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if ppl_before is not None:
        ppl_after = perplexity(model, held, args.seqlen, args.ppl_windows)
    elapsed = time.perf_counter() - t0
    summary = {"model": args.model, "quantization": qcfg.to_dict(), "ppl_before": ppl_before, "ppl_after": ppl_after,
               "mean_rel_output_error": _mean(r.get("rel_output_error") for r in report),
               "mean_rel_weight_error": _mean(r["rel_weight_error"] for r in report), "seconds": elapsed}
    save_quantized(model, out, qcfg, tokenizer=tok, source=args.model, extra={"summary": summary})
    from .io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "layer_errors.json", report)
    atomic_write_text(out / "layer_errors.md", _error_table(report) + "\n")
    if args.export_gptq:
        from .quant.export import export_gptq

        try:
            export_gptq(model, args.export_gptq, tokenizer=tok)
        except ValueError as e:
            raise SystemExit(f"error: GPTQ export failed: {e}") from None
    print(f"quantized {args.model} with {qcfg.method} {qcfg.bits}-bit (group {qcfg.group_size}) "
          f"in {elapsed:.1f}s -> {out}")
    print(f"mean relative output error {_fmt(summary['mean_rel_output_error'])}, "
          f"mean relative weight error {_fmt(summary['mean_rel_weight_error'])}")
    if ppl_before is not None:
        print(f"held-out perplexity: {ppl_before:.3f} (full precision) -> {ppl_after:.3f} (quantized)")
    print(f"per-layer errors: {out / 'layer_errors.md'}")
    return 0


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# ------------------------------------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    if args.quantization_only:
        from .recipes.demo_quant import run_demo as run_quant_demo

        try:
            run_quant_demo(out_dir=Path(args.out), quick=args.quick, model_dir=args.model)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        return 0
    if args.model:
        raise SystemExit("error: --model applies to --quantization-only; the comparison uses the embedded tiny "
                         "model and its recipes (run `lowbit finetune` on your own model instead)")
    from .recipes.demo import run_demo

    run_demo(out_dir=Path(args.out), quick=args.quick)
    return 0


def cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    from .recipes.pretrain_tiny import PretrainConfig, pretrain_tiny

    try:
        cfg = PretrainConfig(steps=args.steps, seed=args.seed, hidden=args.hidden, layers=args.layers,
                             intermediate=args.intermediate, batch_size=args.batch_size, lr=args.lr,
                             threads=args.threads, outlier_fraction=args.outlier_fraction,
                             outlier_factor=args.outlier_factor)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: --out {out} is not empty; choose another path or pass --overwrite")
    info = pretrain_tiny(out, cfg)
    print(f"pre-trained tiny LLaMA ({info['params'] / 1e6:.2f}M params) in {info['seconds']:.0f}s: "
          f"final train loss {info['final_train_loss']:.3f}, held-out ppl {info['heldout_ppl']:.3f} -> {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .recipes.config import load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    from .recipes.finetune import finetune

    try:
        summary = finetune(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if summary:
        print(f"{summary['method']} ({summary['bits']}-bit): {summary['steps']} steps, final loss "
              f"{summary['final_loss']:.4f}, {summary['trainable_params']:,} trainable parameters, "
              f"{summary['train_time_s']:.1f}s -> {cfg.output_dir}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .adapters.params import llama2_7b_config, param_table

    if args.model:
        from transformers import AutoConfig

        hf_config, label = AutoConfig.from_pretrained(args.model), args.model
    else:
        hf_config, label = llama2_7b_config(), "LLaMA-2-7B"
    rows = param_table(hf_config, rank=args.rank, num_blocks=args.num_blocks)
    print(f"trainable parameters on {label} (built on the meta device)\n")
    print("| adapter | targets | trainable | % of base |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['adapter']} | {r['targets']} | {r['trainable']:,} | {r['percent']:.3f}% |")
    return 0


# ------------------------------------------------------------------------------------------- evaluate, compare

def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory or hub id, a lowbit quantized directory, or 'tiny' (embedded)")
    p.add_argument("--adapter", default=None, help="adapter directory, attached with lowbit.adapters.load_adapter")
    p.add_argument("--datasets", nargs="+", default=["gsm8k,svamp,mawps,aqua"],
                   help="comma-separated: gsm8k, svamp, mawps, aqua (also addsub, multiarith, singleeq) read from "
                        "--data-dir; synthetic-gsm8k, synthetic-svamp, synthetic-mawps, synthetic-aqua need no files")
    p.add_argument("--data-dir", default=None,
                   help="folder holding gsm8k/test.json, SVAMP/test.json, ... (default: $LOWBIT_DATA_DIR)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each set (synthetic default 500)")
    p.add_argument("--out", default=None, help="results directory (default eval_out/<model>[+<adapter>])")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 512 (apiq) or 256 (llm-adapters)")
    p.add_argument("--num-beams", type=int, default=None, help="default: 1 (apiq, greedy) or 4 (llm-adapters)")
    p.add_argument("--variant", default="apiq", choices=["apiq", "llm-adapters"],
                   help="protocol: ApiQ prompt + greedy, or the original LLM-Adapters prompt + 4-beam search")
    p.add_argument("--choice-rule", default="llm-adapters", choices=["llm-adapters", "strict"],
                   help="AQuA letter: first capital A-E (published) or the last 'answer is (X)'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on cuda, float32 on cpu (quantized models keep their stored dtype)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="dataset seed of the synthetic-* sets")
    p.add_argument("--overwrite", action="store_true", help="discard earlier generations in --out")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .recipes.evaluate import evaluate_command

    return evaluate_command(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.compare import compare_command

    return compare_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize LLaMA-class models and fine-tune "
                                     "adapters on the low-bit base.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model to packed low-bit storage")
    add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)
    d = sub.add_parser("demo", help="the whole comparison on the embedded tiny model (quantize, init, train, "
                       "evaluate, compare)")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--quick", action="store_true", help="fewer methods and test problems (for tests)")
    d.add_argument("--model", default=None, help="with --quantization-only: model directory (default: tiny)")
    d.add_argument("--quantization-only", action="store_true",
                   help="only the quantization table (perplexity, output error per method and bit width)")
    d.set_defaults(func=cmd_demo)
    ft = sub.add_parser("finetune", help="run a recipe: quantize -> init adapters -> train -> save")
    ft.add_argument("recipe", help="recipe YAML (a path, or the name of a built-in recipe such as tiny-diablo-2bit)")
    ft.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20 output_dir=DIR")
    ft.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    ft.set_defaults(func=cmd_finetune)
    pa = sub.add_parser("params", help="trainable-parameter counts of DiaBlo and LoRA (LLaMA-2-7B by default)")
    pa.add_argument("--model", default=None, help="model directory or hub id whose config to use")
    pa.add_argument("--rank", type=int, default=64)
    pa.add_argument("--num-blocks", type=int, default=64)
    pa.set_defaults(func=cmd_params)
    from .recipes.pretrain_tiny import PretrainConfig  # no heavy imports: defaults come from the config dataclass

    pdef = PretrainConfig()
    pt = sub.add_parser("pretrain-tiny", help="pre-train lowbit's embedded tiny arithmetic LLaMA from scratch")
    pt.add_argument("--out", required=True)
    for flag, typ in (("steps", int), ("seed", int), ("hidden", int), ("layers", int), ("intermediate", int),
                      ("batch_size", int), ("lr", float), ("threads", int), ("outlier_fraction", float),
                      ("outlier_factor", float)):
        pt.add_argument(f"--{flag.replace('_', '-')}", type=typ, default=getattr(pdef, flag))
    pt.add_argument("--overwrite", action="store_true")
    pt.set_defaults(func=cmd_pretrain_tiny)
    ev = sub.add_parser("evaluate", help="accuracy on the Math10K test sets (GSM8K, SVAMP, MAWPS, AQuA)")
    add_evaluate_args(ev)
    ev.set_defaults(func=cmd_evaluate)
    cp = sub.add_parser("compare", help="table and bar chart comparing evaluation runs")
    cp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories holding summary.json (from evaluate --out)")
    cp.add_argument("--out", default="compare", help="directory for compare.md and compare.png")
    cp.add_argument("--no-plot", action="store_true", help="write only the markdown table")
    cp.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
