"""``lowbit evaluate``: accuracy of a model (plain or lowbit-quantized, maybe with an adapter) on Math10K test sets.

Protocol (METHODS.md §4): the ApiQ prompt, greedy decoding, 512 new tokens, the last number (numeric sets) or the
option letter (AQuA) as the prediction. ``variant="llm-adapters"`` is the original LLM-Adapters script instead: its
prompt whitespace, 4-beam search, 256 new tokens. ``--max-new-tokens``/``--num-beams`` override either. The AQuA
rule (``choice_rule``: ``llm-adapters`` = first capital A–E, ``strict`` = "answer is (X)") only changes scoring;
the summary reports choice sets under both rules.

Files written under ``--out``:

* ``settings.json``: what determines the generations (model, adapter, prompt, beams, max new tokens, dtype, and a
  fingerprint of the weight files); a rerun with other settings is refused unless ``--overwrite``.
* ``<set>.jsonl``: one row per example ``{index, prompt, generation, extracted, label, correct}``; rows are appended
  after every batch, and rewritten in index order once the set is complete.
* ``summary.json``: per-set accuracy and n, the average over sets, model, adapter, settings, time.

Resuming: a rerun reads the rows back (a truncated last line left by a crash is dropped), checks each stored prompt
against the dataset (a different file or prompt is an error, not a silent mix), and generates only the missing
indices; extraction and scoring are recomputed from the stored generations, so the summary depends on nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from ..data.prompts import format_prompt
from ..eval.answers import VARIANTS as CHOICE_RULES
from ..eval.answers import score_generation
from ..data.testsets import DatasetSpec, known_datasets, load_records, resolve_datasets

log = logging.getLogger(__name__)

VARIANTS = {
    "apiq": {"prompt": "apiq", "num_beams": 1, "max_new_tokens": 512},
    "llm-adapters": {"prompt": "llm-adapters", "num_beams": 4, "max_new_tokens": 256},
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
SETTINGS, SUMMARY = "settings.json", "summary.json"
TINY_ALIAS = "tiny"

#: ``generate_batches(prompts)`` yields ``(indices into prompts, continuations)`` per batch (see ``iter_generate``).
BatchGenerator = Callable[[list[str]], Iterable[tuple[list[int], list[str]]]]


@dataclass
class EvalConfig:
    """Arguments of :func:`run_evaluation` (the ``lowbit evaluate`` flags); validated on construction."""

    model: str
    datasets: list[str] = field(default_factory=lambda: ["gsm8k", "svamp", "mawps", "aqua"])
    adapter: str | None = None
    data_dir: str | None = None
    out: str | None = None  # default eval_out/<model name>[+<adapter name>]
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the variant's
    num_beams: int | None = None  # None: the variant's
    variant: str = "apiq"
    choice_rule: str = "llm-adapters"
    device: str | None = None  # None: cuda if available
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu (quantized models keep their stored dtype)
    synthetic_seed: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.choice_rule not in CHOICE_RULES:
            raise ValueError(f"unknown --choice-rule {self.choice_rule!r}; choose one of {', '.join(CHOICE_RULES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        preset = VARIANTS[self.variant]
        self.max_new_tokens = preset["max_new_tokens"] if self.max_new_tokens is None else self.max_new_tokens
        self.num_beams = preset["num_beams"] if self.num_beams is None else self.num_beams
        for flag, v in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens),
                        ("--num-beams", self.num_beams), ("--limit", 1 if self.limit is None else self.limit)):
            if v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")

    @property
    def prompt(self) -> str:
        return VARIANTS[self.variant]["prompt"]


# ------------------------------------------------------------------------------------------------------ model

def resolve_model(model: str) -> tuple[str, bool]:
    """``--model`` -> (path or hub id, is a lowbit quantized directory). ``tiny`` is the embedded tiny model."""
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "quant_config.json").is_file():
            return str(p.resolve()), True
        if not (p / "config.json").is_file():
            raise ValueError(f"--model {model!r} is a directory without config.json; pass a Hugging Face model "
                             f"directory, a lowbit quantized directory (from `lowbit quantize --out`) or "
                             f"'{TINY_ALIAS}' for the embedded tiny model")
        return str(p.resolve()), False
    if model == TINY_ALIAS:
        from ..tiny import tiny_model_dir

        return str(tiny_model_dir().resolve()), False
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"--model {model!r} is not a model directory; pass a Hugging Face model directory or hub "
                         f"id, a lowbit quantized directory (from `lowbit quantize --out`) or '{TINY_ALIAS}'")
    return model, False  # a hub id: from_pretrained reports whether it exists


def _resolve_device_dtype(device: str | None, dtype: str) -> tuple[str, str]:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def model_info(model_path: str, quantized: bool, dtype: str, device: str) -> dict:
    """What the summary records about the model, read without loading it: ``quantized``, ``quantization`` (the
    :class:`~lowbit.quant.model.QuantConfig` dict), ``bits`` (quantized bits, else 16/32 from the dtype)."""
    info = {"quantized": quantized, "quantization": None, "bits": 32 if dtype == "float32" else 16, "dtype": dtype,
            "device": device}
    if quantized:
        from ..quant.serialization import read_quant_meta

        q = read_quant_meta(model_path).get("quantization") or {}
        info.update(quantization=q, bits=q.get("bits"), dtype="as stored")
    return info


def load_model(model: str, adapter: str | None = None, device: str | None = None, dtype: str = "auto"):
    """Load ``model`` (a Hugging Face directory or hub id, a lowbit quantized directory, or ``tiny``) and its
    tokenizer; attach ``adapter`` with ``lowbit.adapters.load_adapter``. -> ``(model, tokenizer, info)`` with
    ``info = {"quantized", "quantization", "bits", "dtype", "device"}``. Raises ``ValueError`` with the fix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, quantized = resolve_model(model)
    device, dtype = _resolve_device_dtype(device, dtype)
    info = model_info(path, quantized, dtype, device)
    if quantized:
        from ..quant.serialization import load_quantized, read_quant_meta

        m = load_quantized(path, device=device)  # keeps the dtype it was quantized in
        source = (read_quant_meta(path).get("source") or {}).get("model")
        tok_src = path if (Path(path) / "tokenizer_config.json").is_file() else source
        if not tok_src:
            raise ValueError(f"quantized model {path} holds no tokenizer and names no source model; re-run "
                             f"`lowbit quantize` (it saves the tokenizer)")
    else:
        try:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
        except OSError as e:
            raise ValueError(f"cannot load --model {model!r}: {e}") from None
        tok_src = path
    info["dtype"] = str(next(m.parameters()).dtype).removeprefix("torch.")
    tok = AutoTokenizer.from_pretrained(tok_src)
    if adapter is not None:
        m = attach_adapter(m, adapter, model)
    m.eval()
    return m, tok, info


def attach_adapter(model, adapter: str, model_name: str = "the model"):
    """``lowbit.adapters.load_adapter(model, adapter)``, with its errors turned into one clear ``ValueError``."""
    try:
        from ..adapters import load_adapter
    except ImportError:
        raise ValueError("--adapter needs lowbit.adapters.load_adapter, which this lowbit version does not "
                         "provide yet; evaluate without --adapter or update lowbit") from None
    try:
        return load_adapter(model, adapter)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"adapter {adapter!r} cannot be attached to --model {model_name!r}: {e}. Pass the base "
                         f"model (or quantized base) the adapter was trained on") from None


def _fingerprint(path: str | None) -> str | None:
    """A cheap identity of a directory's weight files (names, sizes, mtimes): a retrained adapter or re-quantized
    model in the same place must not be mixed with the generations of the old one."""
    if path is None or not Path(path).is_dir():
        return None
    files = sorted(f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- per-example rows

def read_rows(path: Path) -> dict[int, dict]:
    """Rows of a ``<set>.jsonl`` keyed by example index (a later row for the same index wins).

    A last line that is cut short (a crash mid-write) is dropped and the file rewritten without it, so that the next
    append starts on a fresh line; a bad line elsewhere is an error."""
    if not path.is_file():
        return {}
    text = path.read_text()
    lines = text.split("\n")
    rows: dict[int, dict] = {}
    dropped = False
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row["index"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if k == len(lines) - 1:  # the last line, no newline after it: an interrupted append
                dropped = True
                continue
            raise ValueError(f"{path} line {k + 1} is not a result row; delete the file to regenerate that set, "
                             f"or pass --overwrite") from None
    if dropped or (text and not text.endswith("\n")):
        log.warning("%s: dropping a truncated last line (interrupted run)", path)
        _write_rows(path, rows)
    return rows


def _write_rows(path: Path, rows: dict[int, dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in sorted(rows)))


def _row(index: int, prompt: str, generation: str, label: str, kind: str, rule: str) -> dict:
    pred, ok = score_generation(generation, label, kind, rule)
    return {"index": index, "prompt": prompt, "generation": generation, "extracted": pred, "label": label,
            "correct": ok}


def set_result(spec: DatasetSpec, rows: list[dict], rule: str) -> dict:
    """Accuracy of one set from its rows (re-extracted from the generations with ``rule``)."""
    n = len(rows)
    correct = sum(score_generation(r["generation"], r["label"], spec.kind, rule)[1] for r in rows)
    res = {"name": spec.name, "display": spec.display, "kind": spec.kind, "n": n, "correct": correct,
           "accuracy": 100.0 * correct / n if n else 0.0}
    if spec.kind == "choice":
        res["accuracy_by_rule"] = {
            r: 100.0 * sum(score_generation(x["generation"], x["label"], "choice", r)[1] for x in rows) / max(1, n)
            for r in CHOICE_RULES}
    return res


# ---------------------------------------------------------------------------------------------------- the run

def _settings_key(cfg: EvalConfig, model_path: str, quantized: bool, adapter_path: str | None, dtype: str) -> dict:
    return {"model": model_path, "model_fingerprint": _fingerprint(model_path), "adapter": adapter_path,
            "adapter_fingerprint": _fingerprint(adapter_path), "prompt": cfg.prompt, "num_beams": cfg.num_beams,
            "max_new_tokens": cfg.max_new_tokens, "dtype": "as stored" if quantized else dtype}


def _check_settings(out: Path, key: dict, dataset_names: list[str], overwrite: bool) -> list[Path]:
    """Refuse an ``--out`` holding generations made with other settings (unless ``overwrite``); -> the result files
    to discard. Nothing is deleted or written here, so a run that fails later (a bad adapter) changes nothing."""
    f = out / SETTINGS
    old = json.loads(f.read_text()) if f.is_file() else None
    diff = [k for k in key if old is not None and old.get(k) != key[k]]
    if diff and not overwrite:
        what = ", ".join(f"{k} {old.get(k)!r} there, {key[k]!r} now" for k in diff)
        raise ValueError(f"--out {out} holds generations made with other settings ({what}); choose another "
                         f"--out, or pass --overwrite to discard them")
    if not overwrite:
        return []
    names = known_datasets() if diff else dataset_names  # other settings: every set there is stale
    # Only our own files: --out may be a fine-tuning run directory.
    return [p for p in [out / f"{n}.jsonl" for n in names] + [out / SUMMARY] if p.exists()]


def default_out(model_path: str, adapter: str | None) -> Path:
    name = Path(model_path).name + (f"+{Path(adapter).name}" if adapter else "")
    return Path("eval_out") / name


def run_evaluation(cfg: EvalConfig, generate_batches: BatchGenerator | None = None) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.datasets``; write rows and ``summary.json`` under ``cfg.out``; return the
    summary. Every check (dataset names and files, model and adapter paths, output settings) runs before the model
    loads; the model loads only if some example is missing. ``generate_batches`` replaces the model (tests: an
    oracle)."""
    t_start = time.perf_counter()
    specs = resolve_datasets(cfg.datasets, cfg.data_dir)
    records = {s.name: load_records(s, cfg.limit, cfg.synthetic_seed) for s in specs}
    if generate_batches is None:
        model_path, quantized = resolve_model(cfg.model)
        device, dtype = _resolve_device_dtype(cfg.device, cfg.dtype)
    else:
        model_path, quantized, device, dtype = cfg.model, False, "n/a", "n/a"
    adapter_path = None
    if cfg.adapter is not None:
        if not Path(cfg.adapter).expanduser().is_dir():
            raise ValueError(f"--adapter {cfg.adapter!r} is not a directory; pass the adapter directory written by "
                             f"fine-tuning")
        adapter_path = str(Path(cfg.adapter).expanduser().resolve())
    out = Path(cfg.out) if cfg.out else default_out(model_path, adapter_path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file; choose a directory path")
    key = _settings_key(cfg, model_path, quantized, adapter_path, dtype)
    discard = _check_settings(out, key, [s.name for s in specs], cfg.overwrite)

    # What is already done: rows on disk whose prompt is the prompt we would use now.
    prompts, stored, missing = {}, {}, {}
    for s in specs:
        prompts[s.name] = [format_prompt(r["instruction"], r.get("input", ""), cfg.prompt) for r in records[s.name]]
        path = out / f"{s.name}.jsonl"
        stored[s.name] = {} if path in discard else read_rows(path)
        for i, row in stored[s.name].items():
            if i < len(prompts[s.name]) and row.get("prompt") != prompts[s.name][i]:
                raise ValueError(f"{out / (s.name + '.jsonl')}: example {i} was generated from another prompt "
                                 f"(the dataset file, --synthetic-seed or prompt changed); choose another --out "
                                 f"or pass --overwrite")
        missing[s.name] = [i for i in range(len(prompts[s.name])) if i not in stored[s.name]]
        log.info("%s: %d examples, %d done, %d to generate", s.name, len(prompts[s.name]),
                 len(prompts[s.name]) - len(missing[s.name]), len(missing[s.name]))

    info = model_info(model_path, quantized, dtype, device) if generate_batches is None else {
        "quantized": False, "quantization": None, "bits": None, "dtype": dtype, "device": device}
    peak = None
    if generate_batches is None and any(missing.values()):
        import torch

        from ..eval.generate import iter_generate

        t0 = time.perf_counter()
        model, tok, loaded = load_model(model_path, adapter_path, device, cfg.dtype)
        log.info("loaded %s%s in %.1fs (%s, %s)", model_path, f" + adapter {adapter_path}" if adapter_path else "",
                 time.perf_counter() - t0, loaded["dtype"], loaded["device"])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def generate_batches(batch_prompts):
            return iter_generate(model, tok, batch_prompts, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size, num_beams=cfg.num_beams)

    # The model (and adapter) loaded: only now touch the directory.
    out.mkdir(parents=True, exist_ok=True)
    for p in discard:
        log.info("--overwrite: removing %s", p)
        p.unlink()
    if any(missing.values()) or not (out / SETTINGS).is_file():
        atomic_write_json(out / SETTINGS, key)
    summary = {"model": cfg.model, "model_path": model_path, "adapter": adapter_path, **info,
               "settings": {k: v for k, v in asdict(cfg).items() if k not in ("model", "adapter", "overwrite",
                                                                                "progress", "out", "datasets")},
               "datasets": {}, "average": None, "generated": 0, "generation_s": 0.0}
    summary["settings"]["prompt"] = cfg.prompt
    for s in specs:
        gen_s = _generate_missing(s, out / f"{s.name}.jsonl", prompts[s.name], records[s.name], stored[s.name],
                                  missing[s.name], generate_batches, cfg)
        rows = stored[s.name]
        for i, row in rows.items():  # re-score with today's labels and rule, so the file agrees with the summary
            if i < len(records[s.name]):
                row["label"] = str(records[s.name][i]["answer"])
            row["extracted"], row["correct"] = score_generation(row["generation"], row["label"], s.kind,
                                                                cfg.choice_rule)
        _write_rows(out / f"{s.name}.jsonl", rows)
        res = set_result(s, [rows[i] for i in range(len(prompts[s.name]))], cfg.choice_rule)
        res.update(generated=len(missing[s.name]), file=f"{s.name}.jsonl")
        summary["datasets"][s.name] = res
        summary["generated"] += len(missing[s.name])
        summary["generation_s"] += gen_s
        log.info("%s: %.1f%% (%d/%d)", s.name, res["accuracy"], res["correct"], res["n"])
        _finish_summary(summary, out, t_start, complete=False, peak=peak)
    if device.startswith("cuda") and summary["generated"]:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
    return _finish_summary(summary, out, t_start, complete=True, peak=peak)


def _generate_missing(spec: DatasetSpec, path: Path, prompts: list[str], records: list[dict], rows: dict[int, dict],
                      missing: list[int], generate_batches: BatchGenerator, cfg: EvalConfig) -> float:
    """Generate the ``missing`` examples, appending each batch's rows to ``path``; -> seconds spent."""
    if not missing:
        return 0.0
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with open(path, "a") as f, tqdm(total=len(missing), desc=spec.name, unit="ex", disable=not cfg.progress) as bar:
        for idx, texts in generate_batches([prompts[i] for i in missing]):
            for j, text in zip(idx, texts):
                i = missing[j]
                rows[i] = _row(i, prompts[i], text, str(records[i]["answer"]), spec.kind, cfg.choice_rule)
                f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a crash loses at most the batch in flight
            bar.update(len(idx))
    got = [i for i in missing if i not in rows]
    if got:
        raise RuntimeError(f"{spec.name}: the generator returned no output for examples {got[:5]}")
    return time.perf_counter() - t0


def _finish_summary(summary: dict, out: Path, t_start: float, complete: bool, peak: float | None) -> dict:
    import torch

    accs = [d["accuracy"] for d in summary["datasets"].values()]
    summary.update(
        average=sum(accs) / len(accs) if accs else None, complete=complete,
        examples_per_s=summary["generated"] / summary["generation_s"] if summary["generation_s"] else None,
        time_s=time.perf_counter() - t_start, eval_peak_memory_gb=peak, torch=torch.__version__,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    from .. import __version__

    summary["lowbit"] = __version__
    atomic_write_json(out / SUMMARY, summary)
    return summary


def format_summary(summary: dict) -> str:
    """Per-set accuracy lines and the average, as printed by ``lowbit evaluate``."""
    lines = []
    for d in summary["datasets"].values():
        extra = ""
        if "accuracy_by_rule" in d:
            extra = "  [" + ", ".join(f"{r}: {a:.1f}%" for r, a in d["accuracy_by_rule"].items()) + "]"
        lines.append(f"{d['display']:<14} {d['accuracy']:6.1f}%  ({d['correct']}/{d['n']}){extra}")
    lines.append(f"{'average':<14} {summary['average']:6.1f}%")
    return "\n".join(lines)


def evaluate_command(args) -> int:
    """The body of ``lowbit evaluate`` (``args`` from :func:`lowbit.cli.add_evaluate_args`)."""
    datasets = [d for item in (args.datasets or []) for d in item.split(",") if d.strip()]
    try:
        cfg = EvalConfig(model=args.model, datasets=datasets, adapter=args.adapter, data_dir=args.data_dir,
                         out=args.out, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         num_beams=args.num_beams, variant=args.variant, choice_rule=args.choice_rule,
                         device=args.device, dtype=args.dtype, synthetic_seed=args.synthetic_seed,
                         overwrite=args.overwrite)
        summary = run_evaluation(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_summary(summary))
    out = Path(cfg.out) if cfg.out else default_out(summary["model_path"], summary["adapter"])
    rate = f", {summary['examples_per_s']:.2f} examples/s" if summary["examples_per_s"] else ""
    print(f"({summary['generated']} generated in {summary['generation_s']:.1f}s{rate}; results: {out / SUMMARY})")
    return 0


__all__ = ["EvalConfig", "VARIANTS", "attach_adapter", "evaluate_command", "format_summary", "load_model",
           "read_rows", "resolve_model", "run_evaluation"]
