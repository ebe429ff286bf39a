"""The ``lowbit`` flags generated from the config dataclasses (:mod:`lowbit.cli`): one flag per field, with help
text and closed value sets for fields whose name alone says too little (keys must be fields of the named config,
tested; every flag of every subcommand has a help string, tested by walking the parsers), one flag per registered
quantizer option, and the config built back from the parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import typing

FIELD_HELP = {
    "QuantConfig": {
        "bits": "bits per weight",
        "group_size": "inputs per scale; -1 = per output channel", "sym": "symmetric grid (default asymmetric)",
        "clip_search": "MSE range search for scales (helps at 2 bits)", "targets": "linear names, e.g. q_proj,k_proj",
    },
    "CalibrationConfig": {"sources": "calibration text: .txt/.json/.jsonl files, tiny (the embedded model's style), "
                                     "or wikitext2/c4 (network access)",
                          "nsamples": "calibration windows drawn from the text",
                          "seqlen": "tokens per calibration window (the text must hold at least this many)",
                          "seed": "seed of the random window positions"},
    "QuantizeRun": {"model": "Hugging Face model directory, hub id or alias (tiny, smollm2-135m)",
                    "out": "output directory for the quantized model",
                    "dtype": "dtype the float model is loaded in",
                    "device": "cpu, cuda or cuda:N (default: cuda when available)",
                    "ppl_windows": "held-out windows scored for perplexity before and after (0: skip)",
                    "overwrite": "replace an output directory holding another model (atomically)",
                    "export_gptq": "also export a GPTQ-format checkpoint (loads with GPTQModel / transformers)",
                    "stream": "read one decoder layer at a time from the safetensors files (same result, a fraction of "
                              "the memory); --no-stream loads the whole float model",
                    "calib_store": "dtype the calibration activations are kept in between layers (half precision "
                                   "halves that memory, rounding the layers' inputs)"},
    "EvaluateRun": {"model": "model directory or hub id, a lowbit quantized directory, or an alias (tiny)",
                    "adapter": "adapter directory (from fine-tuning or PEFT)",
                    "out": "results directory (default eval_out/<model>[+<adapter>]); rerun to resume",
                    "device": "cpu, cuda or cuda:N (default: cuda when available)",
                    "dtype": "auto: bfloat16 on cuda, float32 on cpu (a quantized model keeps its stored dtype)",
                    "overwrite": "discard earlier generations in --out made with other settings",
                    "force_adapter": "attach --adapter even when it was trained on another base (default: refused)"},
    "EvalConfig": {"datasets": "gsm8k, svamp, mawps, aqua (also addsub, multiarith, singleeq) read from --data-dir; "
                               "synthetic-gsm8k, synthetic-svamp, synthetic-mawps, synthetic-aqua need no files",
                   "data_dir": "folder holding gsm8k/test.json, SVAMP/test.json, ... (default: $LOWBIT_DATA_DIR)",
                   "limit": "score the first N problems of each set (default: all; synthetic sets 500)",
                   "batch_size": "prompts per generate call",
                   "max_new_tokens": "generation length (default: the variant's, 512 apiq / 256 llm-adapters)",
                   "num_beams": "beam width (default: the variant's, 1 apiq / 4 llm-adapters)",
                   "variant": "apiq (ApiQ prompt, greedy, 512 tokens) or llm-adapters (4 beams, 256 tokens)",
                   "choice_rule": "AQuA letter: llm-adapters (first capital A-E) or strict ('answer is (X)')",
                   "synthetic_seed": "seed of the synthetic test sets",
                   "response_loss": "also score the held-out response loss (teacher-forced NLL of the reference "
                                    "answer given the prompt)",
                   "loss_limit": "response loss on the first N records of each set (default: --limit)",
                   "accuracy": "generate and score answers (--no-accuracy: response loss only; needs --response-loss)"},
    "ExportRun": {"out": "the new checkpoint directory",
                  "format": "gptq: merged and re-quantized (GPTQModel / transformers); float: a plain HF checkpoint; "
                            "gptq-lora: the base unchanged in GPTQ layout + the LoRA adapter, unmerged (vLLM, PEFT)",
                  "requant": "for --format gptq: gptq (calibrated on the merged model) or rtn (round-to-nearest)",
                  "bits": "bits of the re-quantized model: 2, 3, 4 or 8 (default: the base's)",
                  "group_size": "group size of the re-quantized model (default: the base's; 128 for a float base)",
                  "dtype": "dtype of a --format float export (and of a GPTQ checkpoint's scales)",
                  "calib_samples": "calibration windows for --requant gptq (default: the recipe's)",
                  "overwrite": "replace an existing --out (atomically)"},
    "PretrainConfig": {"hidden": "hidden size (a multiple of 64)", "layers": "decoder layers",
                       "heads": "attention heads (divide --hidden)", "intermediate": "MLP width (a multiple of 64)",
                       "vocab_size": "tokenizer vocabulary (a multiple of 64)", "seqlen": "tokens per sequence",
                       "batch_size": "sequences per step", "steps": "optimizer steps", "lr": "peak learning rate",
                       "warmup_steps": "linear warm-up steps", "weight_decay": "AdamW weight decay",
                       "corpus_docs": "documents in the generated corpus",
                       "worked_fraction": "share of the corpus that is worked problems in prose",
                       "seed": "seed of the corpus and the initialisation",
                       "threads": "torch threads (default: torch's)",
                       "outlier_fraction": "share of input channels given LLaMA-like outliers (0 disables)",
                       "outlier_factor": "scale of the outlier channels"},
}

# Fields with a closed set of values: argparse lists them in --help and refuses others before any work. Each equals
# the tuple its config validates against (tested); the quantizers come from their registry (QuantConfig.methods).
CHOICES = {
    "QuantizeRun": {"dtype": ("float32", "bfloat16", "float16"),
                    "calib_store": ("float32", "bfloat16", "float16")},
    "EvaluateRun": {"dtype": ("auto", "float32", "bfloat16", "float16")},
    "EvalConfig": {"variant": ("apiq", "llm-adapters"), "choice_rule": ("llm-adapters", "strict")},
    "ExportRun": {"format": ("gptq", "float", "gptq-lora"), "requant": ("gptq", "rtn"), "bits": (2, 3, 4, 8),
                  "dtype": ("float16", "bfloat16", "float32")},
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_args(parser, cls, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                    required: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` flag per field of dataclass ``cls`` (nested dataclasses and ``skip`` excepted). Absent
    flags stay absent from the namespace, so the dataclass's own defaults apply."""
    from .recipes.config import field_types

    rename = rename or {}
    helps = dict(FIELD_HELP.get(cls.__name__, {}))
    choices = CHOICES.get(cls.__name__, {})
    if cls.__name__ == "QuantConfig":  # the registered quantizers, so that a new one needs no edit here
        methods = cls.methods()
        helps["method"] = ", ".join(f"{m} ({'/'.join(map(str, b))} bits)" for m, b in methods.items())
        choices = {**choices, "method": tuple(methods)}
    kinds = field_types(cls)
    for f in dataclasses.fields(cls):
        nested, _, args = kinds[f.name]
        name = f.name
        if name in skip or nested is not None:
            continue
        flag = "--" + rename.get(name, name).replace("_", "-")
        default = _default(f)
        text = helps.get(name, "")
        if default is not dataclasses.MISSING and name not in required:
            text = f"{text} (default: {default})".strip() if default not in (None, False) else text
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": text or None}
        if name in choices:
            kw["choices"] = choices[name]
        if default is dataclasses.MISSING or name in required:
            kw["required"] = True
        if args == (bool,):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(args[0]) is list:
            parser.add_argument(flag, nargs="+", metavar=name.upper(), **kw)
        else:
            parser.add_argument(flag, type=args[0] if args[0] in (int, float) else str, **kw)


def config_from_args(cls, args: argparse.Namespace, **extra):
    """Build dataclass ``cls`` from the flags present in ``args`` (lists may also be comma-separated)."""
    from .recipes.config import field_types

    kinds = field_types(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in extra or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if isinstance(v, list) and typing.get_origin(kinds[f.name][2][0]) is list:
            v = [p.strip() for item in v for p in str(item).split(",") if p.strip()]
        kw[f.name] = v
    return cls(**kw, **extra)


OPTION_DEST = "option_"  # option flags' namespace prefix: an option name never shadows a run or config field


def add_quant_option_args(group) -> None:
    """One flag per registered quantizer option (``--magr-iters``, ``--act-order/--no-act-order``), its help from
    the option field's ``metadata["help"]`` and the methods that take it; absent flags keep the method's defaults."""
    from .recipes.config import QuantConfig, field_types

    for name, (f, cls, methods) in QuantConfig.option_fields().items():
        kind = field_types(cls)[name][2][0]
        default = "" if f.default in (None, False) else f" (default: {f.default})"
        kw = {"dest": OPTION_DEST + name, "default": argparse.SUPPRESS,
              "help": f"{f.metadata.get('help', '')} [{', '.join(methods)}]{default}"}
        if kind is bool:
            group.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument("--" + name.replace("_", "-"), type=kind if kind in (int, float) else str,
                               metavar=name.upper(), **kw)


def quant_options_from_args(args: argparse.Namespace, method: str) -> dict:
    """The ``options`` mapping of the option flags present; a flag ``method`` has no use for is an error."""
    from .recipes.config import QuantConfig

    known = QuantConfig.option_fields()
    for name in (n for n in known if hasattr(args, OPTION_DEST + n) and method not in known[n][2]):
        takes = ", ".join("--" + n.replace("_", "-") for n in sorted(n for n in known if method in known[n][2]))
        raise ValueError(f"--{name.replace('_', '-')} is an option of --method {' / '.join(known[name][2])}; "
                         f"--method {method} has no use for it (its options: {takes or 'none'})")
    return {n: getattr(args, OPTION_DEST + n) for n in known if hasattr(args, OPTION_DEST + n)}
