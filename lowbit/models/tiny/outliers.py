"""Outlier input channels for a LLaMA model, added without changing the function it computes.

Large LLaMA-class models carry a few input channels whose weights are far larger than the rest (Dettmers et al.,
*LLM.int8()*, 2022; Xiao et al., *SmoothQuant*, 2023; Lin et al., *AWQ*, 2024): they set the range of every
quantization group they fall into, so min–max round-to-nearest at 2 bits wastes most of its four levels and the
model collapses, while GPTQ, MagR and calibrated adapters can partly repair it. A 3.6M-parameter model pre-trained
for 25 CPU minutes does not develop them (measured: its weights are near-Gaussian and 2-bit RTN raises its
held-out perplexity by only 3%), so lowbit gives its embedded tiny model such channels explicitly, with the
inverse of SmoothQuant's/AWQ's per-channel scaling. For every decoder layer and a random ``fraction`` of channels
``j`` of each linear input, ``c_j = factor`` (else 1):

- ``q, k, v`` columns ``× c``, ``input_layernorm`` gain ``÷ c`` (the norm's output feeds only q, k, v);
- ``gate, up`` columns ``× c``, ``post_attention_layernorm`` gain ``÷ c``;
- ``o`` columns ``× c``, the matching ``v`` rows (and bias) ``÷ c`` (attention mixes ``v`` linearly, per channel);
- ``down`` columns ``× c``, the matching ``up`` rows (and bias) ``÷ c`` (``silu(gate) · up`` is linear in ``up``).

Each pair multiplies to the original product, so the network computes the same function; with a power-of-two
``factor`` every rescaled number is exact in binary floating point (barring overflow, and fp16 values divided into
the subnormal range, below 2^-14), so float32 logits are bit-identical. The embeddings and ``lm_head`` are left
alone (lowbit does not quantize them).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def outlier_scales(n: int, fraction: float, factor: float, gen: torch.Generator) -> torch.Tensor:
    """``(n,)`` float64 scales: ``factor`` on ``round(fraction · n)`` (at least one) random channels, else 1.
    Draws one ``randperm(n)`` from ``gen`` (also used by :mod:`lowbit.models.random_llama`)."""
    c = torch.ones(n, dtype=torch.float64)
    k = max(1, round(fraction * n))
    c[torch.randperm(n, generator=gen)[:k]] = factor
    return c


def expand_kv_scales(c_v: torch.Tensor, head_dim: int, n_rep: int) -> torch.Tensor:
    """``(kv_heads · head_dim,)`` scales of ``v``'s rows -> ``(kv_heads · n_rep · head_dim,)`` scales of ``o``'s input
    columns: ``o``'s column of attention head ``a``, dim ``d`` reads ``v`` row ``(a // n_rep) · head_dim + d``
    (grouped-query attention repeats each key/value head ``n_rep`` times)."""
    return c_v.view(-1, 1, head_dim).expand(-1, n_rep, head_dim).reshape(-1)


@torch.no_grad()
def _scale(linear: nn.Linear, c: torch.Tensor, dim: int) -> None:
    """Multiply ``linear.weight`` ``(out, in)`` by ``c`` along ``dim`` (1: input columns, 0: output rows + bias)."""
    w = linear.weight
    shape = (1, -1) if dim == 1 else (-1, 1)
    w.copy_((w.double() * c.view(shape)).to(w.dtype))
    if dim == 0 and linear.bias is not None:
        linear.bias.copy_((linear.bias.double() * c).to(linear.bias.dtype))


@torch.no_grad()
def add_outlier_channels(model: nn.Module, fraction: float = 0.02, factor: float = 8.0, seed: int = 0) -> dict:
    """Give every decoder linear of a LLaMA ``model`` outlier input channels, in place, preserving its function.

    ``model`` is a ``LlamaForCausalLM`` (or anything with ``model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj}``; grouped-query attention is handled). Returns a record of
    the settings and the scaled channel indices per layer, for the model card.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive finite number, got {factor}")
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: add_outlier_channels expects a LLaMA model")
    gen = torch.Generator().manual_seed(seed)
    record: dict = {"fraction": fraction, "factor": factor, "seed": seed, "layers": []}
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, name), "weight"):
                raise ValueError(f"layer.{name} has no gain to absorb the channel scales")
        c_attn = outlier_scales(attn.q_proj.in_features, fraction, factor, gen)
        for p in (attn.q_proj, attn.k_proj, attn.v_proj):
            _scale(p, c_attn, 1)
        g = layer.input_layernorm.weight
        g.copy_((g.double() / c_attn).to(g.dtype))

        c_mlp = outlier_scales(mlp.up_proj.in_features, fraction, factor, gen)
        for p in (mlp.gate_proj, mlp.up_proj):
            _scale(p, c_mlp, 1)
        g = layer.post_attention_layernorm.weight
        g.copy_((g.double() / c_mlp).to(g.dtype))

        c_v = outlier_scales(attn.v_proj.out_features, fraction, factor, gen)
        head_dim = attn.head_dim
        n_heads = attn.o_proj.in_features // head_dim
        n_rep = n_heads // (attn.v_proj.out_features // head_dim)
        c_o = expand_kv_scales(c_v, head_dim, n_rep)
        _scale(attn.v_proj, 1.0 / c_v, 0)
        _scale(attn.o_proj, c_o, 1)

        c_down = outlier_scales(mlp.down_proj.in_features, fraction, factor, gen)
        _scale(mlp.up_proj, 1.0 / c_down, 0)
        _scale(mlp.down_proj, c_down, 1)
        record["layers"].append({k: torch.nonzero(c != 1).flatten().tolist()
                                 for k, c in (("qkv_in", c_attn), ("gate_up_in", c_mlp), ("v_rows_o_in", c_v),
                                              ("down_in", c_down))})
    return record
