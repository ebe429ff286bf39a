"""Reading a GPTQ checkpoint (the layout :func:`lowbit.quant.export.export_gptq` writes, GPTQModel's ``gptq`` /
``gptq_v2``) back into lowbit's :class:`QuantLinear` layers, without GPTQModel or optimum.

The inverse of the export: for a module ``p`` with ``p.qweight`` ``[ceil(in/32)·bits, out]``, the codes are
``unpack(qweight, bits, in, dim=0)ᵀ``, the zero points ``unpack(qzeros, bits, out, dim=1)ᵀ`` (plus 1 in the v1
format), the scales ``scalesᵀ`` and ``g_idx`` kept only when it is not ``arange(in) // group_size``. Every other
tensor is loaded into a model built from ``config.json``. The weights are then bit-identical to the exporter's, so
``lowbit evaluate --model EXPORT_DIR`` scores exactly the model that was exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .arch import set_submodule
from .packing import unpack
from .qlinear import QuantLinear
from .qweight import QuantizedWeight, default_group_index


def gptq_settings(path: str | Path) -> dict | None:
    """The ``quantization_config`` of a GPTQ checkpoint directory (``quant_method == "gptq"``), else ``None``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return q if q.get("quant_method") == "gptq" else None


def load_gptq_checkpoint(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A GPTQ checkpoint directory -> a Hugging Face causal LM whose quantized linears are ``QuantLinear``
    (other tensors in ``dtype``). Raises ``ValueError`` for another format or a tensor that does not fit."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    q = gptq_settings(path)
    if q is None:
        raise ValueError(f"{path} is not a GPTQ checkpoint (config.json has no quantization_config with "
                         f"quant_method 'gptq')")
    fmt = q.get("checkpoint_format") or q.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: checkpoint format {fmt!r} is not read by lowbit (gptq, gptq_v2)")
    bits, group = int(q["bits"]), int(q["group_size"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    config = AutoConfig.from_pretrained(path, local_files_only=True)  # a directory: no hub
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    prefixes = [k.removesuffix(".qweight") for k in state if k.endswith(".qweight")]
    for p in prefixes:
        qweight, scales = state.pop(f"{p}.qweight"), state.pop(f"{p}.scales")
        qzeros, g_idx = state.pop(f"{p}.qzeros"), state.pop(f"{p}.g_idx", None)
        bias = state.pop(f"{p}.bias", None)
        out = qweight.shape[1]
        inp = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
        codes = unpack(qweight, bits, inp, dim=0).t().contiguous()  # (out, in)
        zeros = unpack(qzeros, bits, out, dim=1).t().float() + (1.0 if fmt == "gptq" else 0.0)  # (out, G)
        g = inp if group == -1 else group
        gi = None
        if g_idx is not None and not torch.equal(g_idx.long(), default_group_index(inp, g, g_idx.device).long()):
            gi = g_idx.long()
        qw = QuantizedWeight(codes=codes, scales=scales.float().t().contiguous(), zeros=zeros.contiguous(),
                             bits=bits, group_size=group, g_idx=gi, codebook=None, sym=bool(q.get("sym", False)),
                             method="gptq")
        ql = QuantLinear.from_quantized(qw, bias=bias.to(dtype) if bias is not None else None)
        set_submodule(model, p, ql.to(device))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors {unexpected[:4]} have no place in the model built from config.json")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k.rpartition(".")[0] not in prefixes and k not in tied]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:4]}; it is incomplete")
    model.tie_weights()
    return model.eval()
