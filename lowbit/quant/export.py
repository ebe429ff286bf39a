"""Export a model with :class:`~lowbit.quant.QuantLinear` layers as a GPTQ checkpoint (GPTQModel / HF layout).

Directory written by :func:`export_gptq`:

- ``model.safetensors``. For every ``QuantLinear`` at module path ``p`` (weight ``(out, in)``, ``G`` groups):

  - ``p.qweight`` int32 ``[ceil(in/32)*bits, out]``: the codes transposed to ``(in, out)`` and packed along
    ``in`` with :func:`lowbit.quant.packing.pack` — the GPTQ bitstream (``32/bits`` codes per word, lowest
    code in the lowest bits; for 3 bits, 32 codes per 3 words with codes 10 and 21 straddling words);
  - ``p.qzeros`` int32 ``[G, ceil(out/32)*bits]``: the integer zero points ``(G, out)`` packed along ``out``
    the same way, stored as ``zero - 1`` in the legacy ``"gptq"`` (v1) format and as ``zero`` in
    ``"gptq_v2"``;
  - ``p.scales`` fp16 ``[G, out]``;
  - ``p.g_idx`` int32 ``[in]``: the group of each input column (the act-order permutation's groups, else
    ``arange(in) // group_size``);
  - ``p.bias`` fp16, if the layer has one.

  Every other tensor of the state dict (embeddings, norms, ``lm_head``, unquantized linears) is stored under
  its own name, floating-point ones as fp16. A tensor tied to another (``lm_head.weight`` sharing the input
  embedding) is written once, as ``transformers.save_pretrained`` does; the loader re-ties it.

  Dequantisation in either format is ``W[o, c] = scales[g_idx[c], o] * (q[c, o] - z[g_idx[c], o])`` with
  ``z = stored + 1`` (v1) or ``z = stored`` (v2): exactly :meth:`QuantLinear.dequantize`.

- ``config.json``: the Hugging Face config (``dtype`` float16) plus a ``quantization_config`` entry, and
  ``quantize_config.json`` with the same fields (GPTQModel reads ``quantize_config.json`` first, transformers
  reads ``config.json``): ``quant_method="gptq"``, ``bits``, ``group_size`` (``-1``: per row), ``desc_act``
  (true iff some layer has a non-trivial act-order ``g_idx``), ``sym`` (true iff every zero point is
  ``2^(bits-1)``), ``checkpoint_format`` and ``format`` (the name GPTQModel 7.6 and transformers'
  ``GPTQConfig`` use now; both are read), ``pack_dtype="int32"``, ``lm_head`` (whether the output embedding
  is quantized too), ``true_sequential``, ``damp_percent``, ``static_groups``, ``dynamic`` (negative
  ``"-:^name$"`` rules for linears left unquantized, so GPTQModel keeps them dense) and ``meta.quantizer``
  (``["lowbit:<version>"]``).
- ``generation_config.json`` if the model has one; the tokenizer's files if one is given (``GPTQModel.load``
  needs a tokenizer in the directory).

Formats. ``"gptq"`` (v1) is the format most GPTQ kernels and loaders read; it stores ``zero - 1`` and so
cannot hold a zero point of 0 (only asymmetric grids produce one). ``"gptq_v2"`` (GPTQModel >= 0.9) stores
the zero point as is. GPTQModel converts v1 to v2 on load by adding 1 to every packed zero point
(``convert_gptq_v1_to_v2_format``); its TORCH kernel computes with v2. ``"auto"`` chooses ``"gptq"`` for
symmetric quantization and ``"gptq_v2"`` otherwise: GPTQModel 7.6 (``models/loader.py``) refuses to load an
asymmetric v1 checkpoint unless its ``meta.quantizer`` names GPTQModel >= 0.9 itself. An asymmetric model can
still be exported as v1 explicitly (for other loaders) when none of its zero points is 0.

NormalFloat (codebook) layers have no GPTQ representation, and the export uses one bit width and group size
for all layers; both raise ``ValueError``.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_dir, atomic_write_json, check_new_dir
from .packing import pack
from .qlinear import QuantLinear
from .qweight import default_group_index

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
QUANTIZE_CONFIG = "quantize_config.json"
CHECKPOINT_FORMATS = ("auto", "gptq", "gptq_v2")
DAMP_PERCENT = 0.01


def _lowbit_version() -> str:
    try:
        from importlib.metadata import version

        return version("lowbit")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "0.0.0"


def _uniform_spec(qmods: dict[str, QuantLinear]) -> tuple[int, int]:
    """The common ``(bits, group_size)`` of all ``qmods``; raises if they are not uniform and alike."""
    nf = [n for n, m in qmods.items() if m.zeros is None]
    if nf:
        raise ValueError(f"{len(nf)} QuantLinear module(s) hold NormalFloat codebook codes (e.g. "
                         f"{nf[0]!r}); a GPTQ checkpoint can only represent uniform codes scale*(q - zero). "
                         f"Quantize with a uniform method (rtn, gptq, magr+gptq) to export, or save with "
                         f"lowbit.quant.serialization.save_quantized instead")
    specs: dict[tuple[int, int], list[str]] = {}
    for n, m in qmods.items():
        specs.setdefault((m.bits, m.group_size), []).append(n)
    if len(specs) > 1:
        desc = "; ".join(f"bits={b}, group_size={g}: {len(ns)} module(s), e.g. {ns[0]!r}"
                         for (b, g), ns in specs.items())
        raise ValueError(f"all QuantLinear modules must share one bit width and group size for a GPTQ export "
                         f"(mixed settings are not supported), got {desc}")
    return next(iter(specs))


def _int_zeros(name: str, m: QuantLinear) -> torch.Tensor:
    """The zero points ``(out, G)`` as int64, checked to be integers in ``[0, 2^bits)``."""
    z = m.zeros.float()
    maxq = 2**m.bits - 1
    if not torch.isfinite(z).all() or not torch.equal(z, z.round()) or z.min() < 0 or z.max() > maxq:
        raise ValueError(f"{name}: zero points must be integers in [0, {maxq}] to be stored in GPTQ "
                         f"format, got values in [{float(z.min())}, {float(z.max())}] (non-integer zero "
                         f"points cannot be exported)")
    return z.long()


def _default_g_idx(m: QuantLinear) -> torch.Tensor:
    return default_group_index(m.in_features, m.group_size, m.qweight.device)


def _resolve_format(checkpoint_format: str, min_zero: int, sym: bool) -> str:
    if checkpoint_format == "auto":
        return "gptq" if sym else "gptq_v2"
    if checkpoint_format == "gptq" and min_zero < 1:
        raise ValueError("the legacy 'gptq' (v1) checkpoint format stores zero - 1 and cannot represent a "
                         "zero point of 0, which this asymmetric model has; export with "
                         "checkpoint_format='gptq_v2' (or 'auto'), or quantize symmetrically (sym=True)")
    if checkpoint_format == "gptq" and not sym:
        log.warning("exporting an asymmetric model as 'gptq' (v1): GPTQModel refuses to load asymmetric v1 "
                    "checkpoints it did not produce itself; use 'gptq_v2' for GPTQModel")
    return checkpoint_format


def _gptq_tensors(name: str, m: QuantLinear, zeros: torch.Tensor, zero_offset: int
                  ) -> dict[str, torch.Tensor]:
    codes = m.to_quantized().codes  # (out, in) uint8, original column order
    g_idx = m.g_idx.to(torch.int32) if m.g_idx is not None else _default_g_idx(m).to(torch.int32)
    t = {
        f"{name}.qweight": pack(codes.t(), m.bits, dim=0),
        f"{name}.qzeros": pack((zeros - zero_offset).t(), m.bits, dim=1),
        f"{name}.scales": m.scales.to(torch.float16).t(),
        f"{name}.g_idx": g_idx,
    }
    if m.bias is not None:
        t[f"{name}.bias"] = m.bias.detach().to(torch.float16)
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}


def _other_tensors(model: nn.Module, qnames: set[str], float_dtype: torch.dtype | None = torch.float16
                   ) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the QuantLinear modules, floats in ``float_dtype`` (``None``: as they are);
    tied duplicates dropped."""
    tied_keys: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        mod = k.rpartition(".")[0]
        if mod in qnames:
            continue
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
               tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            if k in tied_keys or seen[key] in tied_keys:
                log.debug("not saving %s: tied to %s", k, seen[key])
                continue
            log.warning("%s shares storage with %s but is not declared tied; saving a copy", k, seen[key])
        else:
            seen[key] = k
        # Always a copy: a tensor shared with another name must not reach safetensors as a shared tensor.
        dtype = float_dtype if v.is_floating_point() and float_dtype is not None else v.dtype
        out[k] = v.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    for target, source in tied_keys.items():
        if target in out and source in out and not torch.equal(out[target], out[source]):
            log.warning("%s is declared tied to %s but holds different values; transformers will re-tie them "
                        "when loading", target, source)
    return out


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _untouched_linears(model: nn.Module, qnames: set[str]) -> list[str]:
    out_emb = _output_embeddings(model)
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n not in qnames and m is not out_emb]


def export_gptq(model: nn.Module, out_dir: str | Path, checkpoint_format: str = "auto",
                tokenizer: Any = None, overwrite: bool = False, progress: bool = False,
                float_dtype: torch.dtype | None = torch.float16) -> Path:
    """Write ``model`` (a Hugging Face causal LM with ``QuantLinear`` layers) as a GPTQ checkpoint.

    Args:
        model: e.g. a ``LlamaForCausalLM`` whose linears were replaced by uniform ``QuantLinear`` modules, all
            with the same ``bits`` and ``group_size``.
        out_dir: a new (or empty) directory; written atomically through a temporary sibling.
        checkpoint_format: ``"gptq"`` (v1, stores ``zero - 1``), ``"gptq_v2"`` (stores ``zero``) or ``"auto"``
            (``"gptq"`` when symmetric, else ``"gptq_v2"``; see the module docstring).
        tokenizer: saved alongside if given.
        overwrite: replace an existing ``out_dir`` (atomically: it names the old export or the new one, never a
            mix).
        progress: a bar over the weight bytes as they are written (each step is logged either way).
        float_dtype: dtype of the tensors outside the quantized layers (embeddings, norms, head); ``None`` keeps
            the model's own, so that a float32 model's export reads back bit for bit.

    Returns the output directory. Raises ``ValueError`` for NormalFloat layers, mixed bit widths or group
    sizes, a zero point of 0 with ``"gptq"``, or a non-empty ``out_dir`` (unless ``overwrite``).
    """
    from ..safetensors_io import save_file_streamed, write_progress

    out_dir = Path(out_dir)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {list(CHECKPOINT_FORMATS)}, "
                         f"got {checkpoint_format!r}")
    if not overwrite:
        check_new_dir(out_dir, "export directory")
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qmods:
        raise ValueError("model holds no QuantLinear modules: quantize it first "
                         "(lowbit.quant.quantize_model)")
    bits, group_size = _uniform_spec(qmods)
    zeros = {n: _int_zeros(n, m) for n, m in qmods.items()}
    min_zero = min(int(z.min()) for z in zeros.values())
    sym = all(bool((z == 2 ** (bits - 1)).all()) for z in zeros.values())
    desc_act = any(m.g_idx is not None and not torch.equal(m.g_idx.long(), _default_g_idx(m))
                   for m in qmods.values())
    fmt = _resolve_format(checkpoint_format, min_zero, sym)
    zero_offset = 1 if fmt == "gptq" else 0

    log.info("GPTQ export to %s: converting %d quantized modules", out_dir, len(qmods))
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, m in qmods.items():
            tensors.update(_gptq_tensors(n, m, zeros[n], zero_offset))
        qnames = set(qmods)
        for k, v in _other_tensors(model, qnames, float_dtype).items():
            if k in tensors:
                raise ValueError(f"state-dict tensor {k!r} collides with a GPTQ tensor name")
            tensors[k] = v

    skipped = _untouched_linears(model, qnames)
    if skipped:
        log.info("%d linear module(s) left unquantized (stored in fp16, excluded via `dynamic`), e.g. %s",
                 len(skipped), skipped[0])
    qcfg: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": fmt,
        "format": fmt,
        "pack_dtype": "int32",
        "lm_head": isinstance(_output_embeddings(model), QuantLinear),
        "true_sequential": True,
        "damp_percent": DAMP_PERCENT,
        "static_groups": False,
        "meta": {"quantizer": [f"lowbit:{_lowbit_version()}"]},
    }
    if skipped:
        qcfg["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in skipped}

    hf_config = getattr(model, "config", None)
    with atomic_dir(out_dir) as tmp:
        # Streamed: safetensors' save_file would hold a second copy of every tensor's bytes while writing.
        with write_progress(tensors, f"saving GPTQ {WEIGHTS}", progress) as bar:
            save_file_streamed(tensors, tmp / WEIGHTS, metadata={"format": "pt"}, progress=bar)
        if hf_config is not None:
            cfg = copy.deepcopy(hf_config)
            cfg.quantization_config = dict(qcfg)
            cfg.dtype = torch.float16
            cfg.save_pretrained(tmp)
        atomic_write_json(tmp / QUANTIZE_CONFIG, qcfg)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception as e:  # an invalid generation config must not lose the export
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not overwrite:
            check_new_dir(out_dir, "export directory")  # nothing appeared there meanwhile (atomic_dir would replace it)
    log.info("exported %d quantized modules (%d-bit, group_size %d, %s, sym=%s, desc_act=%s) to %s",
             len(qmods), bits, group_size, fmt, sym, desc_act, out_dir)
    return out_dir
