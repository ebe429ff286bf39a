"""Layer streaming: quantize a model larger than memory by reading one decoder layer at a time from its safetensors.

GPTQ's calibration loop already works layer by layer (GPTQ paper §4: the inputs of layer ``i + 1`` are the outputs
of the quantized layer ``i``), so nothing but the current layer needs its float weights. :func:`load_streaming`
builds the model's skeleton on the meta device (no memory), reads the parts outside the decoder layers (embeddings,
final norm, head: the calibration pass and the packed model need them), and attaches a :class:`LayerLoader` that
:func:`~lowbit.quant.model.quantize_model` calls when layer ``i``'s turn comes. The layer's float weights live only
until its linears are replaced by their packed :class:`~lowbit.quant.qlinear.QuantLinear` (GPTQModel and
llm-compressor call the same idea "sequential onloading"). The tensors read are cast exactly as
``from_pretrained(path, dtype=...)`` casts them, so the result is bit-identical to quantizing the whole float model
(tested on the tiny model and SmolLM2-135M).

Peak memory is then one float layer + the calibration activations + the packed layers so far + embeddings and head,
instead of the whole float model (LLaMA-2-7B: ≈ 27 GB in float32).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from . import calibrate as cal
from .arch import arch_spec

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a Hugging Face safetensors checkpoint directory, read by name on demand (memory-mapped: only
    the tensors asked for are read)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if (self.path / INDEX).is_file():
            self.where = dict(json.loads((self.path / INDEX).read_text())["weight_map"])
        elif (self.path / SINGLE).is_file():
            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                self.where = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path} holds no {SINGLE} or {INDEX}: layer streaming reads safetensors "
                                    f"files; convert the checkpoint (save_pretrained(..., safe_serialization=True)) "
                                    f"or quantize the whole model at once (--no-stream / quant streaming off)")
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` as stored, cast to ``dtype``. Raises ``KeyError`` naming the file when it is absent."""
        from safetensors import safe_open

        if name not in self.where:
            raise KeyError(f"{self.path} has no tensor {name!r}: the checkpoint does not match its config.json")
        file = self.where[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.path / file), framework="pt")
        return self._open[file].get_tensor(name).to(dtype, copy=True)  # never a view of the memory map

    def close(self) -> None:
        """Release the open files (their memory maps): the tensors read are copies and stay valid."""
        self._open.clear()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` (dotted, under ``module``) by ``value``, frozen as loaded weights are."""
    owner, _, leaf = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    m._parameters[leaf] = nn.Parameter(value, requires_grad=m._parameters[leaf].requires_grad)


class LayerLoader:
    """Materialises decoder layer ``i`` of a :func:`load_streaming` model from its checkpoint, and puts it back on
    the meta device (:meth:`unload`) when a pass only needs to run it."""

    def __init__(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype, device: torch.device) -> None:
        self.ckpt, self.prefix, self.dtype, self.device = ckpt, prefix, dtype, device

    def __call__(self, i: int, layer: nn.Module) -> None:
        for name, p in list(layer.named_parameters()):
            if not p.is_meta:
                continue
            full = f"{self.prefix}.{i}.{name}"
            t = self.ckpt.read(full, self.dtype).to(self.device)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{full} holds NaN/Inf weights; the checkpoint is corrupt — reload or fix it before "
                                 f"quantizing")
            _set(layer, name, t)
        self.ckpt.close()  # file pages mapped while reading would otherwise count in RSS until the end

    @staticmethod
    def unload(layer: nn.Module) -> None:
        for name, p in list(layer.named_parameters()):
            _set(layer, name, torch.empty_like(p, device="meta"))


def load_streaming(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                   ) -> nn.Module:
    """A causal LM from the Hugging Face directory ``path`` whose decoder layers stay on the meta device until
    :func:`~lowbit.quant.model.quantize_model` loads them one at a time (``model.lowbit_layer_loader``); embeddings,
    final norm and head are read now, in ``dtype``. The model is in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    ckpt = Checkpoint(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)  # a directory: no hub
    with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = arch_spec(model).layers
    tied = getattr(config, "tie_word_embeddings", False)
    for name, _ in list(model.named_parameters()):
        if name.startswith(prefix + "."):
            continue
        if name not in ckpt and tied and model.get_output_embeddings() is not None and name.endswith("lm_head.weight"):
            continue  # tied: the input embeddings are read and shared below
        _set(model, name, ckpt.read(name, dtype).to(device))
    ckpt.close()
    if tied:
        model.tie_weights()
    for name, b in model.named_buffers():
        if b.device != device:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(device)
    model.lowbit_layer_loader = LayerLoader(ckpt, prefix, dtype, device)
    return model.eval()


def is_streaming(model: nn.Module) -> bool:
    return getattr(model, "lowbit_layer_loader", None) is not None


def finish_streaming(model: nn.Module) -> None:
    """After quantization: every weight must be real now (a layer left on meta would compute garbage), and the
    loader's open files are released."""
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"layer streaming left {len(left)} weights unloaded (first: {left[0]}); quantize_model "
                           f"must load every decoder layer")
    model.lowbit_layer_loader.ckpt.close()
    model.lowbit_layer_loader = None


@torch.no_grad()
def streamed_perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                        progress: bool = False, desc: str = "perplexity") -> float:
    """:func:`lowbit.eval.perplexity.perplexity` of a :func:`load_streaming` model's float weights, run layer by
    layer (each decoder layer read, run on every window, and unloaded): the same windows, one window per call.
    ``progress``: a bar over the layers (the long part), named ``desc``."""
    from tqdm.auto import tqdm

    ids = ids.flatten().long()
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 held-out tokens for perplexity, got {ids.numel()}")
    windows = [w for w in (ids[i: i + seqlen] for i in range(0, ids.numel(), seqlen)) if w.numel() >= 2]
    windows = windows[:max_windows] if max_windows is not None else windows
    loader = model.lowbit_layer_loader
    layers = model.get_submodule(loader.prefix)
    hidden, kwargs = [], []
    for w in windows:  # windows differ in length (the tail): captured one by one
        h, kw = cal.capture_layer_inputs(model, layers, w[None])
        hidden += h
        kwargs += kw
    for i, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress)):
        loader(i, layer)
        hidden = cal.run_layer(layer, hidden, kwargs, batch_size=1)
        loader.unload(layer)
    norm, head = getattr(model.get_decoder(), "norm", None), model.get_output_embeddings()
    if norm is None or head is None:
        raise ValueError(f"{type(model).__name__} has no final norm / output embeddings for streamed perplexity")
    nll, count = 0.0, 0
    for h, w in zip(hidden, windows):
        logits = head(norm(h)).float()
        x = w[None].to(logits.device)
        nll += float(nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    return math.exp(nll / count)
