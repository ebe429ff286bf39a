"""Trainable-parameter tables for adapter configurations on any LLaMA-architecture config, built on the meta
device (no weights are allocated, so LLaMA-2-7B costs nothing) — the counts of the DiaBlo paper's comparison with
LoRA (Gurses et al. 2025, arXiv 2506.03230)."""

from __future__ import annotations

from ..adapters import AdapterConfig
from ..adapters.model import apply_adapters, count_parameters
from ..adapters.registry import ADAPTERS

QKV_UP_DOWN = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama2_7b_config():
    """The ``LlamaConfig`` of LLaMA-2-7B (hidden 4096, 32 layers, intermediate 11008, vocab 32000)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def param_table(hf_config, rank: int = 64, num_blocks: int = 64) -> list[dict]:
    """Rows ``{adapter, targets, trainable, base_params, percent}`` for DiaBlo ``N`` and LoRA ``r`` on
    q,k,v,up,down and on all seven projections."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = []
    for label, targets in (("q,k,v,up,down", QKV_UP_DOWN), ("all seven", ALL_SEVEN)):
        for adapter in ("diablo", "lora"):
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config)
            cfg = AdapterConfig(adapter=adapter, rank=rank, num_blocks=num_blocks, targets=targets)
            apply_adapters(model, cfg, progress=False)
            counts = count_parameters(model)
            rows.append({"adapter": ADAPTERS[adapter].summary(cfg), "targets": label, **counts})
    return rows


def params_report(model: str | None = None, rank: int = 64, num_blocks: int = 64) -> str:
    """``lowbit params``: the markdown table of :func:`param_table` on ``model``'s config (an alias, directory or hub
    id; ``None``: LLaMA-2-7B)."""
    if model:
        from .loading import read_model_config

        try:
            hf_config, label = read_model_config(model), model
        except FileNotFoundError as e:  # `lowbit params` reports ValueError as its one-line error
            raise ValueError(str(e)) from None
    else:
        hf_config, label = llama2_7b_config(), "LLaMA-2-7B"
    lines = [f"trainable parameters on {label} (built on the meta device)\n",
             "| adapter | targets | trainable | % of base |\n|---|---|---:|---:|"]
    lines += [f"| {r['adapter']} | {r['targets']} | {r['trainable']:,} | {r['percent']:.3f}% |"
              for r in param_table(hf_config, rank=rank, num_blocks=num_blocks)]
    return "\n".join(lines)
