"""The calibration pass's mechanics: capture the inputs of decoder layer 0, run a decoder layer on captured inputs,
and accumulate ``H = Σ xᵀx`` for linears with forward hooks. Shared by the quantization loop
(:func:`lowbit.quant.model.quantize_model`) and block-wise initialisations (ApiQ-bw)."""

from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    pass


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calibration: torch.Tensor
                         ) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model up to decoder layer 0 on each calibration row ``(n, seqlen)``; returns the hidden states
    ``[(1, seqlen, hidden)]`` and the keyword arguments (rotary embeddings, masks) the layer received."""
    hidden, kwargs_list = [], []

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(hs.detach())
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        kwargs_list.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        with torch.no_grad():
            for row in calibration:
                try:
                    model(input_ids=row[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs_list: list[dict], batch_size: int = 8
               ) -> list[torch.Tensor]:
    """Run ``layer`` on every captured sample, ``batch_size`` samples per call (the samples are unpadded windows
    of equal length, so they share masks and rotary embeddings); returns per-sample outputs."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(hidden), batch_size):
            chunk = hidden[s: s + batch_size]
            if any(h.shape != chunk[0].shape for h in chunk):
                chunk_out = [layer(h, **kw) for h, kw in zip(chunk, kwargs_list[s: s + batch_size])]
                outs += [o[0] if isinstance(o, tuple) else o for o in chunk_out]
                continue
            o = layer(torch.cat(chunk), **kwargs_list[s])
            o = o[0] if isinstance(o, tuple) else o
            outs += list(o.split(chunk[0].shape[0]))
    return outs


def hessian_hooks(linears: dict[str, nn.Module]):
    """Forward hooks accumulating ``H = Σ x^T x`` (float32) for each linear; returns ({name: [H]}, handles)."""
    Hs: dict[str, list] = {}
    handles = []
    for name, lin in linears.items():
        n = lin.in_features
        acc = [torch.zeros(n, n, dtype=torch.float32, device=lin.weight.device)]
        Hs[name] = acc

        def hook(module, inputs, output, acc=acc, n=n):
            x = inputs[0].detach().reshape(-1, n).float()
            acc[0].addmm_(x.t(), x)

        handles.append(lin.register_forward_hook(hook))
    return Hs, handles
