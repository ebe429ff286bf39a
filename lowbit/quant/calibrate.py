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


def _chunks(hidden: list[torch.Tensor], kwargs_list: list[dict], batch_size: int, layer: nn.Module):
    """``(batch, kwargs, n_samples)`` calls covering every captured sample: equal-shape samples are concatenated
    (unpadded windows of equal length share masks and rotary embeddings), others go one by one; in the layer's
    dtype (samples may be stored in a narrower one)."""
    dtype = next(p.dtype for p in layer.parameters() if p.is_floating_point())
    for s in range(0, len(hidden), batch_size):
        chunk = hidden[s: s + batch_size]
        if any(h.shape != chunk[0].shape for h in chunk):
            for h, kw in zip(chunk, kwargs_list[s: s + batch_size]):
                yield h.to(dtype), kw, 1
        else:
            yield torch.cat(chunk).to(dtype), kwargs_list[s], len(chunk)


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs_list: list[dict], batch_size: int = 8
              ) -> list[torch.Tensor]:
    """Run ``layer`` on every captured sample, ``batch_size`` samples per call; returns per-sample outputs."""
    outs = []
    with torch.no_grad():
        for x, kw, k in _chunks(hidden, kwargs_list, batch_size, layer):
            o = layer(x, **kw)
            o = o[0] if isinstance(o, tuple) else o
            outs += list(o.split(o.shape[0] // k))
    return outs


def collect_hessians(layer: nn.Module, linears: dict[str, nn.Module], hidden: list[torch.Tensor],
                     kwargs_list: list[dict], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{name: H}`` with ``H = Σ xᵀx`` (float32, ``(in, in)``) over the inputs ``x`` each linear of ``layer``
    receives when the layer runs on the captured samples.

    Each call of the layer stops as soon as every linear in ``linears`` has seen its input: the rest of the layer
    (attention and MLP after ``q/k/v``, say) does not affect these inputs. Linears fed the same tensor (``q/k/v``,
    ``gate/up``) share one ``xᵀx`` product per call.
    """
    return _hessian_pass(layer, linears, hidden, kwargs_list, batch_size, keep=False)[0]


def collect_hessians_and_outputs(layer: nn.Module, linears: dict[str, nn.Module], hidden: list[torch.Tensor],
                                 kwargs_list: list[dict], batch_size: int = 8):
    """Like :func:`collect_hessians`, but the layer runs to the end: returns ``(Hs, calls)`` where ``calls`` holds,
    per layer call, ``(output, k, {name: (x, y)})``: the layer output of ``k`` concatenated samples and each linear's
    input and output. With :func:`replace_outputs` this spares a second pass when the linears' outputs enter the
    layer output by a plain residual sum."""
    return _hessian_pass(layer, linears, hidden, kwargs_list, batch_size, keep=True)


def replace_outputs(calls: list, modules: dict[str, nn.Module]) -> list[torch.Tensor]:
    """Per-sample layer outputs after replacing linears whose outputs are *added* to the layer output:
    ``out - y + new(x)`` for each of ``modules`` (``{name: new module}``), from :func:`collect_hessians_and_outputs`."""
    outs = []
    with torch.no_grad():
        for out, k, io in calls:
            for name, new in modules.items():
                x, y = io[name]
                out = out - y + new(x).to(out.dtype)
            outs += list(out.split(out.shape[0] // k))
    return outs


def _hessian_pass(layer, linears, hidden, kwargs_list, batch_size, keep: bool):
    Hs = {name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)
          for name, lin in linears.items()}
    seen: set[str] = set()
    last: dict = {"x": None, "prod": None}
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    calls = []

    def hook(module, inputs, output, name):
        x = inputs[0].detach()
        if last["x"] is not x:
            xf = x.reshape(-1, x.shape[-1]).float()
            last["x"], last["prod"] = x, xf.t() @ xf
        Hs[name].add_(last["prod"])
        seen.add(name)
        if keep:
            io[name] = (x, output.detach())
        elif len(seen) == len(linears):
            raise _StopForward

    handles = [lin.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
               for name, lin in linears.items()]
    try:
        with torch.no_grad():
            for x, kw, k in _chunks(hidden, kwargs_list, batch_size, layer):
                seen.clear()
                try:
                    o = layer(x, **kw)
                    calls.append((o[0] if isinstance(o, tuple) else o, k, dict(io)))
                except _StopForward:
                    pass
                if len(seen) != len(linears):
                    missing = sorted(set(linears) - seen)
                    raise RuntimeError(f"linears {missing} were not called by the layer's forward")
                last["x"] = last["prod"] = None
                io.clear()
    finally:
        for h in handles:
            h.remove()
    return Hs, calls
