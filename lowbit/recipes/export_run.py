"""``lowbit export RUN_DIR --out DIR``: a fine-tuned low-bit run as one servable checkpoint.

- ``--format float``: the base dequantised plus the merged adapter (``W' = deq(Q) + ΔW``,
  :func:`lowbit.adapters.merge.merge_to_float`), saved as an ordinary Hugging Face checkpoint in bf16/fp16/fp32.
- ``--format gptq`` (default): the merged float model re-quantized layer by layer with GPTQ against the calibration
  Hessians **of the merged model** (inputs propagated through the layers already re-quantized, exactly as
  :func:`lowbit.quant.quantize_model` quantizes any model), written in the GPTQ layout GPTQModel and transformers
  load (:func:`lowbit.quant.export.export_gptq`). ``--requant rtn`` re-quantizes by round-to-nearest instead: the
  dequantise-add-requantise merge users of other tools get, kept for comparison.

Bits and group size default to the base's; the run's recipe (``RUN_DIR/config.yaml``) supplies the calibration
settings. Everything is checked before the model loads (a run without a complete adapter, a base that cannot be
found, bits the GPTQ format cannot express); the output directory is written atomically and records its provenance
in ``lowbit_export.json``. The result loads with ``lowbit evaluate --model DIR`` like any model.

The run's state is stated first. Training must be finished: ``run.json`` written and the stamp
(:mod:`lowbit.rundir`) marked finished; a run resumed and still training (its ``adapter/`` is the previous
finish's) is refused. An evaluation the recipe asks for that has not finished (no ``summary.json``, or one not
``complete``) is a warning naming the sets missing: the final adapter is exported anyway.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io import DamagedFileError, atomic_dir, atomic_write_json, read_json, recover_dir
from ..rundir import STAMP, RunDir
from .export_lora import check_gptq_lora, write_gptq_lora

log = logging.getLogger(__name__)

FORMATS = ("gptq", "float", "gptq-lora")
REQUANT = ("gptq", "rtn")
DTYPES = ("bfloat16", "float16", "float32")
GPTQ_BITS = (2, 3, 4, 8)
PROVENANCE = "lowbit_export.json"


@dataclass
class ExportRun:
    """run_dir: a ``lowbit finetune`` output directory. out: the new checkpoint directory. format: ``gptq``,
    ``float`` or ``gptq-lora`` (the base and the LoRA adapter unmerged, :mod:`lowbit.recipes.export_lora`).
    requant: ``gptq`` (calibrated) or ``rtn`` (round-to-nearest), for ``format=gptq``. bits /
    group_size: of the re-quantized model (default: the base's; 128 for a float base). dtype: of a ``float``
    export. calib_samples: calibration windows (default: the recipe's). overwrite: replace an existing ``out``
    (atomically)."""

    run_dir: str
    out: str
    format: str = "gptq"
    requant: str = "gptq"
    bits: int | None = None
    group_size: int | None = None
    dtype: str = "float16"
    calib_samples: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.requant not in REQUANT:
            raise ValueError(f"--requant must be one of {', '.join(REQUANT)}, got {self.requant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.format == "float" and (self.bits is not None or self.group_size is not None):
            raise ValueError("--bits/--group-size apply to --format gptq; a float export keeps every weight in "
                             "--dtype")
        if self.bits is not None and self.bits not in GPTQ_BITS:
            raise ValueError(f"--bits {self.bits}: the GPTQ checkpoint format stores {', '.join(map(str, GPTQ_BITS))} "
                             f"bits; choose one of them")
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"--group-size must be a positive integer or -1, got {self.group_size}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ValueError(f"--calib-samples must be >= 1, got {self.calib_samples}")


def _check_run(run_dir: Path) -> tuple[Path, dict]:
    """``(adapter dir, run.json)``; raises naming what is missing and how to get it."""
    if not recover_dir(run_dir).is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist; pass the output_dir of `lowbit finetune`")
    for f in ("config.yaml", "run.json"):
        if not (run_dir / f).is_file():
            raise ValueError(f"{run_dir} has no {f}: it is not a finished `lowbit finetune` run (finish it, or "
                             f"resume it with `lowbit finetune RECIPE output_dir={run_dir} --resume`)")
    stamp = RunDir(run_dir, "finetune").read_stamp()  # None: a run of an older lowbit, judged by run.json alone
    if stamp is not None and not stamp.get("complete"):
        raise ValueError(f"{run_dir}: its training is not finished ({STAMP} marks it unfinished: the run was resumed "
                         f"and is still training, or was killed), so its adapter/ is not the final one. Finish it "
                         f"(`lowbit finetune {run_dir / 'config.yaml'} output_dir={run_dir} --resume`), then export")
    adapter = run_dir / "adapter"
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "lowbit_adapter.json")
               if not (recover_dir(adapter) / f).is_file()]
    if missing:
        raise ValueError(f"{run_dir} has no complete adapter ({adapter} lacks {', '.join(missing)}); it is written "
                         f"when training finishes: finish or resume the run first")
    info = read_json(run_dir / "run.json", "re-run the fine-tuning that wrote it")
    return adapter, info


def _state_evaluation(run_dir: Path, recipe, info: dict) -> None:
    """Log the run's state: training finished (checked by :func:`_check_run`), and its evaluation finished, not
    asked for, or (a warning naming what is missing) not finished yet."""
    trained = f"{run_dir}: training finished ({info.get('steps')} steps of {info.get('method')})"
    if recipe.eval is None:
        log.info("%s; the recipe asks for no evaluation", trained)
        return
    wanted = list(dict.fromkeys(n.strip().lower() for n in recipe.eval.datasets if n.strip()))
    try:
        summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    except DamagedFileError as e:
        log.warning("%s; %s", trained, e.reason)
        summary = None
    done = list((summary or {}).get("datasets") or {}) if isinstance(summary, dict) else []
    if isinstance(summary, dict) and summary.get("complete"):
        avg = summary.get("average")
        log.info("%s; evaluation finished (%s%s)", trained, ", ".join(done),
                 f": average accuracy {avg:.1f}%" if isinstance(avg, (int, float)) else "")
        return
    what = ("no summary.json yet" if summary is None else
            f"summary.json has {', '.join(done) or 'no set'}, not {', '.join(n for n in wanted if n not in done)}")
    log.warning("%s, but its evaluation has not finished (%s: still running, or killed). Exporting the final "
                "adapter anyway: the export does not depend on the evaluation", trained, what)


def _base_spec(base: str) -> dict | None:
    """The base's quantization (``None`` for a float base); raises when the base cannot be found."""
    from .loading import resolve_model

    try:
        path, quantized = resolve_model(base)
    except (ValueError, OSError) as e:
        raise ValueError(f"the run's base {base!r} (run.json 'base') cannot be found: {e}. Restore it, or re-create "
                         f"it with `lowbit quantize` at that path") from None
    if not quantized:
        return None
    from ..quant import read_quant_meta

    return read_quant_meta(path)["quantization"]


def export_run(cfg: ExportRun) -> Path:
    """Write the export; returns its directory (``lowbit_export.json`` holds its provenance, ``lowbit_run.json`` its
    stamp, written last)."""
    run_dir, out = Path(cfg.run_dir).expanduser(), Path(cfg.out).expanduser()
    adapter, info = _check_run(run_dir)
    spec = _base_spec(info["base"])
    if cfg.format == "gptq-lora":
        check_gptq_lora(info, spec, cfg.bits, cfg.group_size)
    bits, group = _export_bits(cfg, info, spec)
    settings = _settings(cfg, run_dir, bits, group)
    RunDir(out, "export", what="export").check(settings, overwrite=cfg.overwrite, resume=False)
    from .config import load_recipe

    recipe = load_recipe(str(run_dir / "config.yaml"))
    _state_evaluation(run_dir, recipe, info)
    t0 = time.perf_counter()
    provenance = {"run_dir": str(run_dir.resolve()), "base": info["base"], "base_quantization": spec,
                  "adapter": str(adapter.resolve()), "method": info.get("method"), "adapter_kind": info.get("adapter"),
                  "init": info.get("init"), "export": asdict(cfg) | {"bits": bits, "group_size": group}}
    if cfg.format == "gptq-lora":
        write_gptq_lora(info["base"], adapter, out, provenance)
        RunDir(out, "export").finish(settings)
        return out
    model, tok = _merged_model(info["base"], adapter)
    if cfg.format == "float":
        _write_float(cfg, model, tok, out, provenance, t0)
    else:
        _write_gptq(cfg, recipe, model, tok, out, provenance, bits, group, t0)
    RunDir(out, "export").finish(settings)
    return out


def _export_bits(cfg: ExportRun, info: dict, spec: dict | None) -> tuple[int | None, int]:
    """Bits and group size of the export (default: the base's); a GPTQ export needs bits the format stores."""
    bits = cfg.bits or (spec or {}).get("bits")
    group = cfg.group_size or (spec or {}).get("group_size", 128)
    if cfg.format in ("gptq", "gptq-lora"):
        if bits is None:
            raise ValueError(f"the run's base {info['base']} is a float model: pass --bits (one of "
                             f"{', '.join(map(str, GPTQ_BITS))}) for a GPTQ export, or --format float")
        if bits not in GPTQ_BITS:
            raise ValueError(f"the base stores {bits} bits, which the GPTQ format cannot express; pass --bits "
                             f"(one of {', '.join(map(str, GPTQ_BITS))})")
    return bits, group


def _settings(cfg: ExportRun, run_dir: Path, bits: int | None, group: int) -> dict:
    """The export's stamp: the run exported and how (where it goes and ``overwrite`` are no settings of it)."""
    export = {k: v for k, v in asdict(cfg).items() if k not in ("run_dir", "out", "overwrite")}
    return {"run_dir": str(run_dir.resolve()), **export, "bits": bits, "group_size": group}


def _merged_model(base: str, adapter: Path):
    """The base with the adapter merged into float weights (every other quantized layer dequantised)."""
    from ..adapters.merge import merge_to_float
    from .loading import load_model

    model, tok, _ = load_model(base, adapter=str(adapter), device="cpu", dtype="float32")
    counts = merge_to_float(model)
    log.info("merged %d adapter layers, dequantised %d other quantized layers", counts["merged"],
             counts["dequantized"])
    return model, tok


def _write_float(cfg: ExportRun, model, tok, out: Path, provenance: dict, t0: float) -> None:
    import torch

    model.to(getattr(torch, cfg.dtype))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / PROVENANCE, provenance | {"seconds": time.perf_counter() - t0}, seal=True)
    log.info("float export (%s) -> %s", cfg.dtype, out)


def _write_gptq(cfg: ExportRun, recipe, model, tok, out: Path, provenance: dict, bits: int, group: int,
                t0: float) -> None:
    """Re-quantize the merged model (GPTQ against its own calibration Hessians, or RTN) and write it in the GPTQ
    layout."""
    from ..quant import QuantConfig, quantize_model
    from ..quant.export import export_gptq
    from .quantize import calibration_windows

    calib_cfg = recipe.calibration
    if cfg.calib_samples is not None:
        calib_cfg.nsamples = cfg.calib_samples
    qcfg = QuantConfig(method=cfg.requant, bits=bits, group_size=group)
    calib = calibration_windows(calib_cfg, tok)[0] if qcfg.needs_calibration else None
    quantize_model(model, qcfg, calib, progress=False)
    provenance["requant"] = qcfg.to_dict()
    provenance["calibration"] = calib_cfg.__dict__ if calib is not None else None
    export_gptq(model, out, tokenizer=tok, overwrite=True)
    atomic_write_json(out / PROVENANCE, provenance | {"seconds": time.perf_counter() - t0}, seal=True)
    log.info("GPTQ export (%d-bit g%d, %s re-quantization) -> %s", bits, group, cfg.requant, out)
