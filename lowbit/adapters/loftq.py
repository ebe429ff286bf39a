"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al. 2023, arXiv 2310.08659).

Objective: ``min_{Q, A, B} ‖W - Q - B A‖_F`` with ``Q`` on the quantizer's grid and ``B A`` of rank ``r``, by
alternating ``T`` times: ``Q = deq(quant(W - B A))``; SVD ``W - Q = U S V^T``; ``B = U_r S_r^{1/2}``,
``A = S_r^{1/2} V_r^T`` (``B A = 0`` before the first step). Data-free. Quantizers are lowbit's own: NormalFloat
(``"nf"``, NF4/NF2 as in the paper) or uniform min-max (``"uniform"``, RTN, asymmetric unless ``sym``, optionally
with the MSE clip search); as a registered initialisation (``init="loftq"``) the quantizer is ``quant.method``
(``nf`` or ``rtn``) with all its settings (``bits``, ``group_size``, and for ``rtn`` ``sym`` and ``clip_search``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant import QuantConfig, quantize_model
from ..quant.arch import arch_spec, relative_name, resolve_targets, set_submodule
from ..quant.nf import nf_quantize
from ..quant.qweight import QuantizedWeight, check_weight
from ..quant.rtn import rtn_quantize
from .base import quantized_linear
from .lora import check_rank
from .registry import make_adapter, register_base_init

QUANTIZERS = ("nf", "uniform")


def _alternate(W: torch.Tensor, quantize: Callable[[torch.Tensor], QuantizedWeight], rank: int, iters: int,
               history: list[float] | None) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """The LoftQ iterations on float32 ``W``; returns ``(Q, A, B)`` with ``Q + B A ≈ W``."""
    lowrank = torch.zeros_like(W)
    for _ in range(iters):
        qw = quantize(W - lowrank)
        E = W - qw.dequantize().float()
        U, S, Vh = torch.linalg.svd(E.double(), full_matrices=False)
        root = S[:rank].sqrt()
        B = (U[:, :rank] * root[None, :]).float()
        A = (root[:, None] * Vh[:rank]).float()
        lowrank = B @ A
        if history is not None:
            history.append(float((E - lowrank).norm()))
    return qw, A, B


def loftq_init(W: torch.Tensor, bits: int, rank: int, iters: int = 5, quantizer: str = "nf", group_size: int = 64,
               scaling: float = 1.0, history: list[float] | None = None, sym: bool = False,
               clip_search: bool = False) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """LoftQ for ``W`` ``(out, in)``.

    Returns the quantized weight, ``A`` ``(rank, in)`` and ``B`` ``(out, rank)`` (float32) with
    ``Q + scaling · B A ≈ W``: both factors are divided by ``sqrt(scaling)`` so that a LoRA layer with that scaling
    reproduces the approximation. If ``history`` is a list, ``‖W - Q_t - B_t A_t‖_F`` of every iteration is
    appended to it. ``sym`` and ``clip_search`` set the ``"uniform"`` quantizer's grid (as in
    :func:`~lowbit.quant.rtn.rtn_quantize`); the NormalFloat codebook has neither, so they raise there.
    """
    check_weight(W)
    out, inp = W.shape
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown LoftQ quantizer {quantizer!r}; choose one of {QUANTIZERS}")
    if quantizer == "nf" and bits not in (2, 4):
        raise ValueError(f"the NormalFloat quantizer supports bits 2 and 4, got {bits}; use quantizer='uniform'")
    if quantizer == "nf" and (sym or clip_search):
        raise ValueError("the NormalFloat quantizer has a fixed absmax-scaled codebook: sym and clip_search apply "
                         "only to quantizer='uniform'")
    check_rank(rank, inp, out)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if scaling <= 0:
        raise ValueError(f"LoRA scaling must be > 0, got {scaling}")

    def quantize(M: torch.Tensor) -> QuantizedWeight:
        if quantizer == "nf":
            return nf_quantize(M, bits, block_size=group_size)
        return rtn_quantize(M, bits, group_size=group_size, sym=sym, clip_search=clip_search)

    qw, A, B = _alternate(W.float(), quantize, rank, iters, history)
    s = scaling ** 0.5
    return qw, (A / s).contiguous(), (B / s).contiguous()


@dataclass(frozen=True)
class LoftQOptions:
    """``adapter.init_options`` of ``init=loftq``."""

    loftq_iters: int = field(default=5, metadata={"help": "LoftQ alternations (quantize, SVD)"})

    def __post_init__(self) -> None:
        if not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be an integer >= 1, got {self.loftq_iters!r}")


@register_base_init("loftq", adapters=("lora",), quantizers=("nf", "rtn"), options=LoftQOptions)
def _loftq(model: nn.Module, names: list[str], cfg, options: LoftQOptions, quant: QuantConfig, calibration,
           progress: bool) -> list[dict]:
    """Every adapted linear gets LoftQ's quantized base and factors. The linears ``quant`` covers without an adapter
    get the same quantizer (LoftQ with ``B A = 0``), so that every method of a comparison runs on a fully quantized
    base. Report: ``{module, loftq_error}`` per adapted linear."""
    from tqdm.auto import tqdm

    report = []
    for name in tqdm(names, desc=f"LoftQ {quant.bits}-bit", disable=not progress):
        lin = model.get_submodule(name)
        hist: list[float] = []
        qw, A, B = _alternate(lin.weight.detach().float(), lambda M: quant.quantize(M, None), cfg.rank,
                              options.loftq_iters, hist)
        w = make_adapter(quantized_linear(qw, lin), cfg)
        w.set_delta(A, B)
        set_submodule(model, name, w)
        report.append({"module": name, "loftq_error": hist})
    rest = _unadapted(model, quant, set(names))
    if rest:
        quantize_model(model, dataclasses.replace(quant, targets=rest), progress=progress)
    return report


def _unadapted(model: nn.Module, quant: QuantConfig, adapted: set[str]) -> list[str]:
    """Relative names (``self_attn.o_proj``) of the linears ``quant`` covers that carry no adapter."""
    spec = arch_spec(model)
    wanted = quant.targets or spec.linears
    return sorted({relative_name(spec, n) for n in resolve_targets(model, wanted) if n not in adapted})
