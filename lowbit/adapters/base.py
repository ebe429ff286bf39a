"""What every adapter wrapper shares: the frozen base it wraps, the FP32 adapter branch, merging, and the
per-module state in the PEFT key layout.

An adapter wraps one linear layer (``nn.Linear`` or lowbit's ``QuantLinear``) as ``y = base(x) + delta(x)``. A new
adapter subclasses :class:`AdapterLayer`, implements the few methods marked below, and registers itself with
:func:`lowbit.adapters.registry.register_adapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..quant.qlinear import QuantLinear
from ..quant.qweight import QuantizedWeight

if TYPE_CHECKING:
    from .config import AdapterConfig


def base_shape(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``QuantLinear`` (anything with those attributes)."""
    inp, out = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not isinstance(inp, int) or not isinstance(out, int):
        raise TypeError(f"adapter base must be a linear layer with in_features/out_features (nn.Linear or "
                        f"QuantLinear), got {type(base).__name__}")
    return inp, out


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base's dense ``(out, in)`` float32 weight (dequantised for a ``QuantLinear``)."""
    if hasattr(base, "dequantize"):
        return base.dequantize(torch.float32)
    return base.weight.detach().float()


def freeze(base: nn.Module) -> None:
    for p in base.parameters():
        p.requires_grad_(False)


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for an empty module)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def quantized_linear(qw: QuantizedWeight, linear: nn.Linear) -> QuantLinear:
    """A ``QuantLinear`` holding ``qw`` with ``linear``'s bias, on ``linear``'s device (for inits that quantize)."""
    bias = linear.bias.detach() if linear.bias is not None else None
    return QuantLinear.from_quantized(qw, bias=bias).to(linear.weight.device)


def peft_targets(peft: dict) -> list[str]:
    """``target_modules`` of a PEFT adapter config as a list (PEFT also writes a single name as a string)."""
    targets = peft["target_modules"]
    return [targets] if isinstance(targets, str) else list(targets)


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class AdapterLayer(nn.Module):
    """``y = base(x) + delta(dropout(x))`` with ``base`` frozen and the adapter branch computed in float32 (even under
    bf16/fp16 autocast of the base) and cast back to the base output's dtype once.

    Subclasses set :attr:`stored_params` and implement :meth:`from_config`, :meth:`state_shapes`,
    :meth:`peft_config`, :meth:`adapter_forward` and :meth:`delta_weight`;
    :func:`~lowbit.adapters.registry.register_adapter` sets :attr:`name`. Everything else (forward, merge, state in
    the PEFT layout) is shared.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # how messages name the adapter (``LoRA``); defaults to ``name``
    peft_type: ClassVar[str] = ""  # ``peft_type`` written to adapter_config.json
    # Key suffix of each saved tensor -> the parameter attribute holding it (the trainable tensors), e.g.
    # ``{"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}``.
    stored_params: ClassVar[dict[str, str]] = {}
    # Key suffix of each saved tensor that is not trained -> the buffer holding it (QWHA's coefficient positions,
    # chosen by its init): saved and loaded beside the parameters, in its own dtype, never given to the optimizer.
    stored_buffers: ClassVar[dict[str, str]] = {}

    def __init__(self, base: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        inp, out = base_shape(base)
        check_dropout(dropout)
        self.base = base
        freeze(base)
        self.in_features, self.out_features = inp, out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # ---- to implement -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, base: nn.Module, cfg: AdapterConfig) -> AdapterLayer:
        """A new wrapper of ``base`` with the settings of ``cfg``."""
        raise NotImplementedError

    @classmethod
    def state_shapes(cls, in_features: int, out_features: int, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
        """``{key suffix: shape}`` of the stored tensors for an ``out x in`` layer, in the order of
        :attr:`stored_params` then :attr:`stored_buffers`; raises ``ValueError`` when ``cfg`` does not fit the
        layer. Its :attr:`stored_params` entries are the source of :func:`~lowbit.adapters.expected_trainable`."""
        raise NotImplementedError

    @classmethod
    def peft_config(cls, cfg: AdapterConfig, base_name: str | None) -> dict:
        """The ``adapter_config.json`` written beside the weights."""
        raise NotImplementedError

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        """:class:`AdapterConfig` keyword arguments read from another tool's ``adapter_config.json``."""
        raise ValueError(f"{cls.title or cls.name} adapters are only read from directories written by lowbit")

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch on float32 ``x`` ``(..., in)`` -> ``(..., out)`` float32."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense ``(out, in)`` float32 weight delta."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------------------------

    @classmethod
    def summary(cls, cfg: AdapterConfig) -> str:
        """A short label of the configuration (``lora r=64``)."""
        return cls.name

    @classmethod
    def check_base(cls, name: str, base: nn.Module, cfg: AdapterConfig) -> None:
        """Raise ``ValueError`` (naming the module) when ``cfg`` cannot wrap ``base``."""
        inp, out = base_shape(base)
        try:
            cls.state_shapes(inp, out, cfg)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    @classmethod
    def stored_keys(cls) -> tuple[str, ...]:
        """The key suffixes of every saved tensor: :attr:`stored_params` then :attr:`stored_buffers`."""
        return (*cls.stored_params, *cls.stored_buffers)

    def state_params(self) -> dict[str, nn.Parameter]:
        """``{key suffix: parameter}`` (:attr:`stored_params` resolved)."""
        return {k: getattr(self, attr) for k, attr in self.stored_params.items()}

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """``{key suffix: buffer}`` (:attr:`stored_buffers` resolved)."""
        return {k: getattr(self, attr) for k, attr in self.stored_buffers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.state_params().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        with torch.autocast(x.device.type, enabled=False):
            z = self.adapter_forward(self.dropout(x).float())
        return y + z.to(y.dtype)

    def adapter_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix.suffix: CPU tensor}`` (``prefix`` = ``base_model.model.<module>``): the parameters in float32,
        the stored buffers in their own dtype."""
        state = {f"{prefix}.{k}": p.detach().float().contiguous().cpu() for k, p in self.state_params().items()}
        state.update({f"{prefix}.{k}": b.detach().contiguous().cpu() for k, b in self.state_buffers().items()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Copy ``state[prefix.suffix]`` into the parameters and stored buffers; raises ``ValueError`` (nothing
        copied) on a missing key or a shape mismatch."""
        params = {**self.state_params(), **self.state_buffers()}
        for k, p in params.items():
            key = f"{prefix}.{k}"
            if key not in state:
                raise ValueError(f"{key} is missing")
            if tuple(state[key].shape) != tuple(p.shape):
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, the adapter needs {tuple(p.shape)}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[f"{prefix}.{k}"])

    def as_dense(self) -> torch.Tensor:
        """Effective dense weight ``W_base + delta`` ``(out, in)`` float32 (the base dequantised if quantized)."""
        W = base_weight(self.base)
        return W if self.merged else W + self.delta_weight().detach()

    def merge(self) -> None:
        """Fold the adapter into a float base weight (``W += delta``); not possible for a quantized base."""
        self._check_float_base("merge")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        self._check_float_base("unmerge")
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def _check_float_base(self, what: str) -> None:
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot {what} an adapter into a {type(self.base).__name__} base: only float nn.Linear "
                            f"weights can absorb it (a quantized base would have to be re-quantized)")
