"""``lowbit quantize``: load a model, quantize its decoder linears, report perplexity and per-layer errors, save.

Cheap validation first (settings, the architecture from the model's config.json, output directory, calibration
text), then the expensive part. The output directory holds the packed model (``quant_config.json`` +
``model.safetensors`` + tokenizer, loadable with :func:`lowbit.quant.load_quantized`), ``layer_errors.json`` /
``layer_errors.md``, all written in one atomic step, and optionally a GPTQ-format export (``export_gptq``, its own
atomic step) that GPTQModel and ``transformers`` load. A process killed at any point leaves each directory holding
its previous complete content or the new one; the same command run again completes (it replaces an output that
holds the same model and settings, and a lowbit export of the same bit width and group size).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import DamagedFileError, read_json, recover_dir
from ..quant import QuantConfig
from .config import TINY, CalibrationConfig
from .loading import check_architecture, resolve_model

log = logging.getLogger(__name__)


@dataclass
class QuantizeRun:
    """One ``lowbit quantize`` run. model: directory, hub id or alias. out: output directory. dtype: load dtype of the
    float model. device: default cuda when available. ppl_windows: held-out windows scored for perplexity (0: skip).
    overwrite: replace an output directory (and export directory) holding another model. export_gptq: also write a
    GPTQ-format checkpoint to this directory."""

    model: str
    out: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(sources=[]))
    dtype: str = "float32"
    device: str | None = None
    ppl_windows: int = 16
    overwrite: bool = False
    export_gptq: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quant.needs_calibration and not self.calibration.sources:
            raise ValueError(f"method {self.quant.method!r} needs calibration data; pass --calib FILE "
                             f"(.txt/.json/.jsonl) with at least --seqlen {self.calibration.seqlen} tokens of text")


def calibration_windows(c: CalibrationConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(nsamples, seqlen)`` calibration token ids from ``c`` and the held-out 1-D ids (``None`` for ``tiny``,
    whose held-out text is separate)."""
    if c.sources == [TINY]:
        from ..models.tiny import calibration_ids

        return calibration_ids(tokenizer, c.nsamples, c.seqlen), None
    from ..data.calibration import split_calibration, tokenize_sources

    ids = tokenize_sources(tokenizer, c.sources)
    return split_calibration(ids, c.nsamples, c.seqlen, seed=c.seed)


def _check_out_dir(out: Path, source: str, fingerprint: str, quant: dict, overwrite: bool) -> None:
    """Refuse to overwrite a directory holding something else (a different model or different settings)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is a file; choose a directory path")
    if not any(out.iterdir()) or overwrite:
        return
    qc = out / "quant_config.json"
    if not qc.is_file():
        raise ValueError(f"--out {out} is a non-empty directory that is not a lowbit quantized model; "
                         f"choose another --out or pass --overwrite to replace it")
    from ..quant import read_quant_meta

    try:
        meta = read_quant_meta(out)
    except ValueError as e:
        raise ValueError(f"--out {out} holds a damaged quantized model ({e}); pass --overwrite to replace it") from None
    old_src = meta.get("source") or {}
    old_q = meta.get("quantization") or {}
    try:
        same_q = QuantConfig.from_dict(old_q).to_dict() == quant  # also reads older lowbit's settings
    except (TypeError, ValueError):
        same_q = False
    if old_src.get("fingerprint") != fingerprint or old_src.get("model") != source or not same_q:
        raise ValueError(f"--out {out} already holds a different quantized model "
                         f"(source {old_src.get('model')!r}, method {old_q.get('method')!r}, "
                         f"bits {old_q.get('bits')!r}); choose another --out or pass --overwrite to replace it")
    log.info("%s holds the same model and settings; it will be replaced", out)


def _check_export_dir(d: Path, quant: QuantConfig, overwrite: bool) -> None:
    """Refuse a non-empty ``--export-gptq`` directory unless it is a lowbit export of the same bit width and group
    size (a rerun of the same command) or ``overwrite`` is set."""
    if not d.exists() or overwrite:
        return
    if not d.is_dir():
        raise ValueError(f"--export-gptq {d} exists and is a file; choose a directory path")
    if not any(d.iterdir()):
        return
    qc_path = d / "quantize_config.json"
    try:
        qc = read_json(qc_path)
        ours = isinstance(qc, dict) and any(str(q).startswith("lowbit:") for q in qc["meta"]["quantizer"])
        why = None if ours and (qc["bits"], qc["group_size"]) == (quant.bits, quant.group_size) else \
            f"{qc_path} names another quantizer or other settings"
    except DamagedFileError as e:
        why = e.reason
    except (ValueError, OSError) as e:
        why = str(e)
    except (KeyError, TypeError):
        why = f"{qc_path} is not a GPTQ quantize config"
    if why:
        raise ValueError(f"--export-gptq {d} is a non-empty directory that is not a lowbit export of these settings "
                         f"({why}); choose another path or pass --overwrite to replace it")
    log.info("%s holds a lowbit export of the same settings; it will be replaced", d)


def error_table(report: list[dict]) -> str:
    lines = ["| layer | module | shape | rel. output error | rel. weight error | time (s) |",
             "|---|---|---|---|---|---|"]
    for r in report:
        oe = f"{r['rel_output_error']:.4f}" if "rel_output_error" in r else "n/a"
        lines.append(f"| {r['layer']} | {r['module']} | {r['shape'][0]}×{r['shape'][1]} | {oe} | "
                     f"{r['rel_weight_error']:.4f} | {r['time_s']:.2f} |")
    return "\n".join(lines)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def run_quantize(run: QuantizeRun) -> dict:
    """Quantize ``run.model`` and save it to ``run.out``; returns the summary (also stored in quant_config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..eval.perplexity import perplexity
    from ..quant import quantize_model, save_quantized
    from ..quant.serialization import config_fingerprint

    # 1. Cheap validation first: model config and architecture, output directory, calibration text.
    path, quantized = resolve_model(run.model)
    if quantized:
        raise ValueError(f"model {run.model!r} is already a lowbit quantized directory; pass the float model")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a model config from --model {run.model!r}: {e}") from None
    check_architecture(hf_config, run.model)  # before the weights, not inside quantize_model after them
    out = recover_dir(Path(run.out))  # a swap cut short by a crash is finished first
    _check_out_dir(out, run.model, config_fingerprint(hf_config), run.quant.to_dict(), run.overwrite)
    if run.export_gptq:
        _check_export_dir(recover_dir(Path(run.export_gptq)), run.quant, run.overwrite)
    tok = AutoTokenizer.from_pretrained(path)
    windows = held = None
    if run.calibration.sources:
        windows, held = calibration_windows(run.calibration, tok)
        log.info("calibration: %d windows of %d tokens; %s held-out tokens", *windows.shape,
                 "no" if held is None else len(held))

    # 2. The expensive part.
    device = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqlen = run.calibration.seqlen
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, run.dtype)).to(device).eval()
    ppl_before = ppl_after = None
    if held is not None and run.ppl_windows > 0 and len(held) >= 2:
        ppl_before = perplexity(model, held, seqlen, run.ppl_windows)
    report = quantize_model(model, run.quant, windows)
    if ppl_before is not None:
        ppl_after = perplexity(model, held, seqlen, run.ppl_windows)
    elapsed = time.perf_counter() - t0
    summary = {"model": run.model, "quantization": run.quant.to_dict(), "ppl_before": ppl_before,
               "ppl_after": ppl_after, "mean_rel_output_error": _mean(r.get("rel_output_error") for r in report),
               "mean_rel_weight_error": _mean(r["rel_weight_error"] for r in report), "seconds": elapsed}
    save_quantized(model, out, run.quant, tokenizer=tok, source=run.model, extra={"summary": summary},
                   files={"layer_errors.json": json.dumps(report, indent=2) + "\n",
                          "layer_errors.md": error_table(report) + "\n"})
    if run.export_gptq:
        from ..quant.export import export_gptq

        try:
            export_gptq(model, run.export_gptq, tokenizer=tok, overwrite=True)  # checked by _check_export_dir
        except ValueError as e:
            raise ValueError(f"GPTQ export failed: {e}") from None
    return summary
