"""``lowbit quantize``: load a model, quantize its decoder linears, report perplexity and per-layer errors, save.

Cheap validation first (settings, the architecture from the model's config.json, output directory, calibration
text), then the expensive part. The output directory holds the packed model (``quant_config.json`` +
``model.safetensors`` + tokenizer, loadable with :func:`lowbit.quant.load_quantized`), ``layer_errors.json`` /
``layer_errors.md`` and its stamp ``lowbit_run.json`` (:mod:`lowbit.rundir`: model, architecture, settings), all
written in one atomic step, and optionally a GPTQ-format export (``export_gptq``, its own
atomic step) that GPTQModel and ``transformers`` load. A process killed at any point leaves each directory holding
its previous complete content or the new one; the same command run again completes (it replaces an output that
holds the same model and settings, and a lowbit export of the same bit width and group size).

Every step that can take long shows progress: a bar over the held-out windows (perplexity before and after), over
the layers, and over the bytes of each weights file written, with a log line for the checksums and the flush.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import DamagedFileError, read_json
from ..quant import QuantConfig
from ..rundir import DONE, PARTIAL, STAMP, RunDir
from .config import TINY, CalibrationConfig
from .loading import check_architecture, local_only, resolve_model

log = logging.getLogger(__name__)


@dataclass
class QuantizeRun:
    """One ``lowbit quantize`` run. model: directory, hub id or alias. out: output directory. dtype: load dtype of the
    float model. device: default cuda when available. ppl_windows: held-out windows scored for perplexity (0: skip).
    overwrite: replace an output directory (and export directory) holding another model. export_gptq: also write a
    GPTQ-format checkpoint to this directory. stream: read one decoder layer at a time from the model's safetensors
    files (the same result as loading the whole float model, in a fraction of the memory; a checkpoint without
    safetensors files is loaded whole). calib_store: dtype the calibration activations are kept in between layers
    (bfloat16/float16 halve that memory; the layers' inputs are then rounded to it)."""

    model: str
    out: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(sources=[]))
    dtype: str = "float32"
    device: str | None = None
    ppl_windows: int = 16
    overwrite: bool = False
    export_gptq: str | None = None
    stream: bool = True
    calib_store: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.calib_store not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"calib_store must be float32, bfloat16 or float16, got {self.calib_store!r}")
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


def _settings(model: str, fingerprint: str, quant: dict) -> dict:
    """What makes two quantized models the same: the source, its architecture and the quantization settings."""
    return {"model": model, "fingerprint": fingerprint, "quantization": quant}


def _same_settings(old: dict, new: dict) -> bool:
    try:  # also reads older lowbit's quantization settings
        old_q = QuantConfig.from_dict(old.get("quantization") or {}).to_dict()
    except (TypeError, ValueError):
        return False
    return {**old, "quantization": old_q} == new


def _recorded_settings(out: Path) -> dict | None:
    """The settings an output written without a stamp (by an earlier lowbit) recorded in its quant_config.json."""
    from ..quant import read_quant_meta

    if not (out / "quant_config.json").is_file():
        return None
    try:
        meta = read_quant_meta(out)
    except DamagedFileError:
        raise
    except ValueError as e:  # another format or a newer lowbit: not a model this command may replace
        raise DamagedFileError(out / "quant_config.json", str(e), "pass --overwrite to replace it") from None
    src = meta.get("source") or {}
    return {"settings": _settings(src.get("model"), src.get("fingerprint"), meta.get("quantization") or {}),
            "complete": True}


def out_dir(path: str | Path) -> RunDir:
    """The ``--out`` of ``lowbit quantize``: a quantized model, written in one atomic step (its stamp inside)."""
    return RunDir(path, "quantize", _same_settings, what="quantized model", recorded=_recorded_settings,
                  record="quant_config.json")


def _export_settings(quant: QuantConfig) -> dict:
    return {"quantizer": "lowbit", "bits": quant.bits, "group_size": quant.group_size}


def _recorded_export(d: Path) -> dict | None:
    """The settings in a GPTQ export's quantize_config.json (the GPTQ format's own record: loaders read it)."""
    qc_path = d / "quantize_config.json"
    if not qc_path.is_file():
        return None
    qc = read_json(qc_path, "pass --overwrite to replace the export")
    try:
        ours = any(str(q).startswith("lowbit:") for q in qc["meta"]["quantizer"])
        settings = {"quantizer": "lowbit" if ours else "another", "bits": qc["bits"], "group_size": qc["group_size"]}
    except (KeyError, TypeError):
        raise DamagedFileError(qc_path, f"{qc_path} is not a GPTQ quantize config",
                               "pass --overwrite to replace the export") from None
    return {"settings": settings, "complete": True}


def _check_export_dir(d: Path, quant: QuantConfig, overwrite: bool) -> None:
    """Refuse a non-empty ``--export-gptq`` directory unless it is a lowbit export of the same bit width and group
    size (a rerun of the same command) or ``overwrite`` is set."""
    rd = RunDir(d, "quantize", what="lowbit GPTQ export of these settings", stamp=None, recorded=_recorded_export,
                record="quantize_config.json")
    if rd.check(_export_settings(quant), overwrite=overwrite, flag="--export-gptq") in (DONE, PARTIAL):
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
    path, settings = _check_inputs(run)
    tok, windows, held = _load_calibration(run, path)
    model, summary, report = _quantize(run, path, windows, held)
    _save_outputs(run, model, tok, settings, summary, report)
    return summary


def _check_inputs(run: QuantizeRun) -> tuple[str, dict]:
    """Cheap validation before any weight loads: the model's config and architecture, the output directories.
    Returns the model's path and the run's settings (its stamp)."""
    from transformers import AutoConfig

    from ..quant.serialization import config_fingerprint

    path, quantized = resolve_model(run.model)
    if quantized:
        raise ValueError(f"model {run.model!r} is already a lowbit quantized directory; pass the float model")
    try:
        hf_config = AutoConfig.from_pretrained(path, **local_only(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a model config from --model {run.model!r}: {e}") from None
    check_architecture(hf_config, run.model)  # before the weights, not inside quantize_model after them
    settings = _settings(run.model, config_fingerprint(hf_config), run.quant.to_dict())
    if out_dir(run.out).check(settings, overwrite=run.overwrite) in (DONE, PARTIAL):
        log.info("%s holds the same model and settings; it will be replaced", run.out)
    if run.export_gptq:
        _check_export_dir(Path(run.export_gptq), run.quant, run.overwrite)
    return path, settings


def _load_calibration(run: QuantizeRun, path: str):
    """The tokenizer, the calibration windows and the held-out ids (``None`` without calibration sources)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **local_only(path))
    windows = held = None
    if run.calibration.sources:
        windows, held = calibration_windows(run.calibration, tok)
        log.info("calibration: %d windows of %d tokens; %s held-out tokens", *windows.shape,
                 "no" if held is None else len(held))
    return tok, windows, held


def _quantize(run: QuantizeRun, path: str, windows, held) -> tuple[torch.nn.Module, dict, list[dict]]:
    """The expensive part: load, score, quantize, score again. -> (model, summary, per-layer report)."""
    from ..eval.perplexity import perplexity
    from ..quant import quantize_model
    from ..quant.streaming import is_streaming, streamed_perplexity
    from .loading import load_float_model

    device = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seqlen = run.calibration.seqlen
    t0 = time.perf_counter()
    model = load_float_model(path, run.dtype, device, stream=run.stream)
    ppl_before = ppl_after = None
    if held is not None and run.ppl_windows > 0 and len(held) >= 2:
        score = streamed_perplexity if is_streaming(model) else perplexity
        ppl_before = score(model, held, seqlen, run.ppl_windows, progress=True, desc="perplexity before quantization")
        log.info("held-out perplexity before quantization: %.3f", ppl_before)
    report = quantize_model(model, run.quant, windows, store_dtype=getattr(torch, run.calib_store)
                            if run.calib_store != "float32" else None)
    if ppl_before is not None:
        ppl_after = perplexity(model, held, seqlen, run.ppl_windows, progress=True,
                               desc="perplexity after quantization")
        log.info("held-out perplexity after quantization: %.3f", ppl_after)
    summary = {"model": run.model, "quantization": run.quant.to_dict(), "ppl_before": ppl_before,
               "ppl_after": ppl_after, "mean_rel_output_error": _mean(r.get("rel_output_error") for r in report),
               "mean_rel_weight_error": _mean(r["rel_weight_error"] for r in report),
               "seconds": time.perf_counter() - t0}
    return model, summary, report


def _save_outputs(run: QuantizeRun, model, tok, settings: dict, summary: dict, report: list[dict]) -> None:
    """``run.out`` in one atomic step (the model, the reports and the finished stamp), then the GPTQ export."""
    from ..quant import save_quantized

    files = {"layer_errors.json": json.dumps(report, indent=2) + "\n", "layer_errors.md": error_table(report) + "\n",
             STAMP: out_dir(run.out).stamp_text(settings, complete=True)}
    save_quantized(model, Path(run.out), run.quant, tokenizer=tok, source=run.model, extra={"summary": summary},
                   files=files, progress=True)
    if run.export_gptq:
        from ..quant.export import export_gptq

        try:  # overwrite: the directory was checked by _check_export_dir
            export_gptq(model, run.export_gptq, tokenizer=tok, overwrite=True, progress=True)
        except ValueError as e:
            raise ValueError(f"GPTQ export failed: {e}") from None
