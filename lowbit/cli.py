"""The ``lowbit`` command line: argument parsing only; every subcommand builds the same config dataclasses the
recipes use (flags are generated from their fields) and calls a driver in :mod:`lowbit.recipes`.

Heavy libraries are imported lazily by the drivers; errors a user can fix surface as ``error: ...`` (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli_flags import (  # noqa: F401  (CHOICES, FIELD_HELP, OPTION_DEST: re-exported for front ends and tests)
    CHOICES,
    FIELD_HELP,
    OPTION_DEST,
    add_config_args,
    add_quant_option_args,
    config_from_args,
    quant_options_from_args,
)

log = logging.getLogger("lowbit")

# Third-party loggers whose start-up warnings a user cannot act on (optional kernels that did not load, deprecations
# inside torch); -v shows them.
QUIET = ("httpx", "urllib3", "filelock", "torchao", "torch.utils._pytree", "kernels", "bitsandbytes")


def _fail(e: Exception):
    raise SystemExit(f"error: {e}") from None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


# ------------------------------------------------------------------------------------------------ subcommands

def cmd_quantize(args: argparse.Namespace) -> int:
    from .recipes.config import CalibrationConfig, QuantConfig
    from .recipes.quantize import QuantizeRun, run_quantize

    try:
        options = quant_options_from_args(args, args.method)
        run = config_from_args(QuantizeRun, args, quant=config_from_args(QuantConfig, args, options=options),
                               calibration=config_from_args(CalibrationConfig, args, **(
                                   {} if hasattr(args, "sources") else {"sources": []})))
        s = run_quantize(run)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    q = run.quant
    print(f"quantized {run.model} with {q.method} {q.bits}-bit (group {q.group_size}) in {s['seconds']:.1f}s -> "
          f"{run.out}")
    print(f"mean relative output error {_fmt(s['mean_rel_output_error'])}, "
          f"mean relative weight error {_fmt(s['mean_rel_weight_error'])}")
    if s["ppl_before"] is not None:
        print(f"held-out perplexity: {s['ppl_before']:.3f} (full precision) -> {s['ppl_after']:.3f} (quantized)")
    print(f"per-layer errors: {Path(run.out) / 'layer_errors.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .recipes.evaluate import SUMMARY, EvalConfig, EvaluateRun, default_out, format_summary, run_evaluation

    try:
        run = config_from_args(EvaluateRun, args, eval=config_from_args(EvalConfig, args))
        summary = run_evaluation(run)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    print(format_summary(summary))
    out = Path(run.out) if run.out else default_out(summary["model_path"], summary["adapter"])
    rate = f", {summary['examples_per_s']:.2f} examples/s" if summary["examples_per_s"] else ""
    print(f"({summary['generated']} generated in {summary['generation_s']:.1f}s{rate}; results: {out / SUMMARY})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .recipes.compare import compare_runs

    try:
        table, png = compare_runs(args.runs, args.out, plot=not args.no_plot)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    print(table)
    print(f"\ntable: {Path(args.out) / 'compare.md'}")
    if png is not None:
        print(f"chart: {png}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .recipes.config import load_recipe
    from .recipes.finetune import finetune

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        summary = finetune(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    if summary:
        print(finetune_report(summary, cfg.output_dir))
    return 0


def finetune_report(summary: dict, out: str) -> str:
    """The end-of-run summary of ``lowbit finetune``: the last logged loss (the run's mean beside it), the
    accuracy per test set and their average when the run evaluated, and where the files are."""
    from .recipes.evaluate import format_summary

    s = summary
    resumed = f", resumed from {s['resumed_from']}" if s.get("resumed_from") else ""
    lines = [f"{s['method']} ({s['bits']}-bit): {s['steps']} steps in {s['train_time_s']:.1f}s{resumed}, "
             f"{s['trainable_params']:,} trainable parameters",
             f"training loss: last logged {_fmt(s['last_logged_loss'])} (last step {_fmt(s.get('last_step_loss'))}, "
             f"mean over the run {s['mean_train_loss']:.4f})"]
    if s.get("eval"):
        lines += ["evaluation:", format_summary(s["eval"])]
    out = Path(out)
    files = [f for f in ("adapter", "base", "loss.png", "log.jsonl", "run.json", "summary.json") if (out / f).exists()]
    lines.append(f"run directory: {out}  ({', '.join(files)})")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.quantization_only:
        from .recipes.demo_quant import run_demo as run_quant_demo

        try:
            run_quant_demo(out_dir=Path(args.out or "demo_out"), quick=args.quick, model_dir=args.model)
        except (ValueError, FileNotFoundError) as e:
            _fail(e)
        return 0
    if args.model:
        _fail(ValueError("--model applies to --quantization-only; to compare methods on your own model, copy a spec "
                         "(`lowbit experiment --list`) and set its model: key, or pass model=NAME to `lowbit "
                         "experiment demo`"))
    name = ("real-suite" if args.real else "demo") + ("-quick" if args.quick else "")
    return _run_spec(name, args.out, [])


def _run_spec(name: str, out: str | None, overrides: list[str]) -> int:
    from .experiments import load_spec, run_experiment

    try:
        spec = load_spec(name, overrides)
        run_experiment(spec, out)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    if args.list or not args.spec:
        from .experiments import builtin_specs, find_spec

        for n in builtin_specs():
            print(f"{n:<18} {find_spec(n).read_text().splitlines()[0].lstrip('# ')}")
        return 0
    return _run_spec(args.spec, args.out, args.overrides)


def cmd_export(args: argparse.Namespace) -> int:
    from .recipes.export_run import ExportRun, export_run

    try:
        out = export_run(config_from_args(ExportRun, args))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    if getattr(args, "format", None) == "gptq-lora":
        print(f"exported -> {out}/base + {out}/adapter (score the pair with `lowbit evaluate --model {out}/base "
              f"--adapter {out}/adapter`; serving commands in {out}/lowbit_export.json)")
    else:
        print(f"exported -> {out} (load it with `lowbit evaluate --model {out}`)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    return _run_spec("study-quick" if args.quick else "study", args.out, [])


def cmd_pretrain_tiny(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .recipes.pretrain_tiny import PretrainConfig, pretrain_dir, pretrain_tiny

    out = Path(args.out)
    try:  # the model is written atomically: --overwrite replaces it once it is complete
        cfg = config_from_args(PretrainConfig, args)
        pretrain_dir(out).check(asdict(cfg), overwrite=args.overwrite, resume=False)
    except ValueError as e:
        _fail(e)
    info = pretrain_tiny(out, cfg)
    print(f"pre-trained tiny LLaMA ({info['params'] / 1e6:.2f}M params) in {info['seconds']:.0f}s: "
          f"final train loss {info['final_train_loss']:.3f}, held-out ppl {info['heldout_ppl']:.3f} -> {out}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .recipes.params import params_report

    try:
        print(params_report(args.model, rank=args.rank, num_blocks=args.num_blocks))
    except ValueError as e:
        _fail(e)
    return 0


# ---------------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .recipes.config import CalibrationConfig, QuantConfig
    from .recipes.evaluate import EvalConfig, EvaluateRun
    from .recipes.export_run import ExportRun
    from .recipes.pretrain_tiny import PretrainConfig
    from .recipes.quantize import QuantizeRun

    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize LLaMA-class models and fine-tune "
                                     "adapters on the low-bit base.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the start-up warnings of third-party libraries")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model to packed low-bit storage")
    add_config_args(q.add_argument_group("run"), QuantizeRun)
    add_config_args(q.add_argument_group("quantization (QuantConfig)"), QuantConfig, skip=("options",),
                    required=("method", "bits"))
    add_quant_option_args(q.add_argument_group("quantizer options (QuantConfig.options; each names its methods)"))
    add_config_args(q.add_argument_group("calibration"), CalibrationConfig, rename={"sources": "calib"})
    q.set_defaults(func=cmd_quantize)

    ft = sub.add_parser("finetune", help="run a recipe: quantize -> init adapters -> train -> save")
    ft.add_argument("recipe", help="recipe YAML: a path (holding a / or ending in .yaml), or the name of a built-in "
                    "recipe such as tiny-diablo-2bit")
    ft.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20 output_dir=DIR")
    ft.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint (an error, "
                    "changing nothing, when there is none)")
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("evaluate", help="accuracy on the Math10K test sets (GSM8K, SVAMP, MAWPS, AQuA)")
    add_config_args(ev.add_argument_group("run"), EvaluateRun, skip=("progress",))
    add_config_args(ev.add_argument_group("protocol (EvalConfig)"), EvalConfig)
    ev.set_defaults(func=cmd_evaluate)

    cp = sub.add_parser("compare", help="table and bar chart comparing evaluation runs")
    cp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories holding summary.json (from evaluate --out)")
    cp.add_argument("--out", default="compare", help="directory for compare.md and compare.png")
    cp.add_argument("--no-plot", action="store_true", help="write only the markdown table")
    cp.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="the whole comparison on the embedded tiny model (quantize, init, train, "
                       "evaluate, compare)")
    d.add_argument("--out", default=None, help="output directory (default: demo_out; real_out with --real)")
    d.add_argument("--quick", action="store_true", help="the same methods on a toy budget (a few steps each, for a "
                   "smoke test): the built-in spec demo-quick (real-suite-quick with --real)")
    d.add_argument("--model", default=None, help="with --quantization-only: model directory (default: tiny)")
    d.add_argument("--quantization-only", action="store_true",
                   help="only the quantization table (perplexity, output error per method and bit width)")
    d.add_argument("--real", action="store_true",
                   help="the smollm2-* recipes on SmolLM2-135M (needs `make real`; about 2 h on 2 CPU cores), "
                        "response loss and accuracy before/after fine-tuning (default --out real_out)")
    d.set_defaults(func=cmd_demo)

    ex = sub.add_parser("export", help="merge a run's adapter into its base: a float checkpoint, or re-quantized "
                        "with GPTQ (calibrated on the merged model) into a GPTQ checkpoint")
    ex.add_argument("run_dir", help="a `lowbit finetune` output directory")
    add_config_args(ex.add_argument_group("export"), ExportRun, skip=("run_dir",), required=("out",))
    ex.set_defaults(func=cmd_export)

    st = sub.add_parser("study", help="the pre-registered comparison on the tiny model: five methods on one 2-bit "
                        "base, per-method learning rates from a validation split, 12 seeds, intervals over seeds "
                        "and test problems, Holm (resumable; hours on 2 CPU cores)")
    st.add_argument("--out", default=None, help="its ledger, runs and report (default study_out; run again to resume)")
    st.add_argument("--quick", action="store_true", help="a toy budget on four cells (for tests)")
    st.set_defaults(func=cmd_study)

    xp = sub.add_parser("experiment", help="run a comparison written as a spec (YAML: cells, budget, seeds, learning "
                        "rates, contrasts); resumable. `lowbit experiment --list` shows the built-in specs")
    xp.add_argument("spec", nargs="?", help="a spec file (a path holding a / or ending in .yaml) or a built-in name "
                    "(demo, demo-quick, real-suite, study, ...)")
    xp.add_argument("overrides", nargs="*", help="dotted key=value overrides of the spec, e.g. budget.steps=10 "
                    "seeds=[0,1]")
    xp.add_argument("--out", default=None, help="output directory (default: the spec's out)")
    xp.add_argument("--list", action="store_true", help="list the built-in specs")
    xp.set_defaults(func=cmd_experiment)

    pa = sub.add_parser("params", help="trainable-parameter counts of DiaBlo and LoRA (LLaMA-2-7B by default)")
    pa.add_argument("--model", default=None, help="model directory, hub id or alias whose config to use")
    pa.add_argument("--rank", type=int, default=64, help="LoRA rank (default: 64)")
    pa.add_argument("--num-blocks", type=int, default=64, help="DiaBlo blocks per linear (default: 64)")
    pa.set_defaults(func=cmd_params)

    pt = sub.add_parser("pretrain-tiny", help="pre-train lowbit's embedded tiny arithmetic LLaMA from scratch")
    pt.add_argument("--out", required=True, help="directory for the pre-trained model")
    pt.add_argument("--overwrite", action="store_true", help="replace an existing model in --out (once the new one "
                    "is complete)")
    add_config_args(pt.add_argument_group("pre-training (PretrainConfig)"), PretrainConfig)
    pt.set_defaults(func=cmd_pretrain_tiny)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. ``key=value`` overrides of ``finetune`` and ``experiment`` may stand anywhere on the
    line, before or after the flags (``lowbit finetune R --resume output_dir=X``)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "overrides", None) is not None:
        extra = [a for a in rest if "=" in a and not a.startswith("-")]
        args.overrides += extra
        rest = [a for a in rest if a not in extra]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Every result lowbit writes is swapped in atomically, so what was complete before Ctrl-C is still there.
        resume = {"finetune": " with --resume", "quantize": ""}.get(args.command, " (finished parts are reused)")
        print(f"\nlowbit {args.command}: interrupted. Complete results on disk are kept (lowbit swaps every file in "
              f"whole); run the same command again{resume} to go on.", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
