"""``lowbit export RUN --format gptq-lora``: the run's low-bit base and its LoRA adapter as the pair serving engines
load, with nothing merged and nothing re-quantized.

``DIR/base`` is the run's quantized base written in the GPTQ layout (:func:`lowbit.quant.export.export_gptq`: the
same integer codes, fp16 scales and zero points, and the other tensors in the base's own dtype, so every weight is
lowbit's bit for bit); ``DIR/adapter`` is the
PEFT LoRA adapter whose module names resolve on that base (``adapter_config.json`` and
``adapter_model.safetensors``; ``base_model_name_or_path`` points at ``DIR/base``). transformers + PEFT
(``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter)``) and vLLM
(``vllm serve DIR/base --enable-lora --lora-modules NAME=DIR/adapter``) apply the adapter at run time, so what
fine-tuning learned is not rounded away as a merge into a 2-bit grid rounds it (``--format gptq``).

Only the LoRA family qualifies (LoRA, CLoQ, LoftQ, ApiQ-bw, GPTQ-LoRA: ``W x + B A x · α/r``) on a uniform-grid base;
DiaBlo's block-diagonal update and NormalFloat bases have no runtime support in those engines, and are refused
before any weight is read, naming the formats that serve them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ..io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

LORA_FAMILY = ("lora",)  # run.json "adapter" values whose update is B @ A (every init of the LoRA adapter)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_gptq_lora(info: dict, spec: dict | None, bits: int | None, group_size: int | None) -> None:
    """Refuse, before any weight is read, a run the pair cannot serve: a non-LoRA adapter, a float or NormalFloat
    base, or a requested bit width / group size (the base is kept as it is)."""
    kind = info.get("adapter")
    if kind not in LORA_FAMILY:
        raise ValueError(f"--format gptq-lora serves a LoRA adapter at run time, and this run trained a {kind!r} "
                         f"adapter ({info.get('method')}), which vLLM and PEFT cannot apply to a GPTQ base; export it "
                         f"merged: --format gptq (re-quantized) or --format float")
    if spec is None:
        raise ValueError(f"the run's base {info['base']} is a float model, so there is no low-bit base to keep: "
                         f"serve the float model with the run's adapter/ as it is, or export --format float / gptq")
    if spec.get("method") == "nf" or spec.get("codebook") is not None:
        raise ValueError(f"the run's base {info['base']} is NormalFloat-quantized ({spec.get('bits')}-bit), which "
                         f"the GPTQ layout cannot hold; export --format gptq (re-quantized on a uniform grid) or "
                         f"--format float")
    if bits is not None or group_size is not None:
        raise ValueError("--bits/--group-size re-quantize the base, and --format gptq-lora keeps it bit for bit; "
                         "leave them out (or use --format gptq)")


def write_gptq_lora(base: str, adapter: Path, out: Path, provenance: dict) -> None:
    """Write ``out/base`` (GPTQ layout of ``base``) and ``out/adapter`` (the PEFT files) atomically, with the
    provenance in ``out/lowbit_export.json``."""
    from ..quant.export import export_gptq
    from .loading import load_model

    t0 = time.perf_counter()
    model, tok, _ = load_model(base, device="cpu", dtype="float32")
    final_base = out.expanduser().resolve() / "base"
    with atomic_dir(out) as tmp:
        # Embeddings, norms and head as the base stores them (float32), not the GPTQ convention's fp16: bit for bit.
        export_gptq(model, tmp / "base", tokenizer=tok, progress=True, float_dtype=None)
        (tmp / "adapter").mkdir()
        for name in ADAPTER_FILES:
            shutil.copyfile(adapter / name, tmp / "adapter" / name)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(final_base)  # AutoPeftModel finds the base through it
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        serve = {"transformers+peft": f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                                      f"'{final_base}'), '{final_base.parent / 'adapter'}')",
                 "vllm": f"vllm serve {final_base} --enable-lora --lora-modules "
                         f"{provenance.get('method') or 'adapter'}={final_base.parent / 'adapter'}"}
        atomic_write_json(tmp / "lowbit_export.json",
                          provenance | {"serve": serve, "seconds": time.perf_counter() - t0}, seal=True)
    log.info("GPTQ base + LoRA adapter -> %s (serve: %s)", out, serve["vllm"])
