"""The per-architecture part of the calibration loop, as data: where the decoder layers live and which of their
linears form the sequential quantization groups; plus name resolution and module replacement helpers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder layers live and which of their linears form the sequential quantization groups."""

    layers: str
    groups: tuple[tuple[str, ...], ...]
    # Linears whose output is added unchanged to the decoder layer's output (the residual sum): when the last
    # group holds only these, its calibration pass also yields the next layer's inputs (no extra forward).
    residual: tuple[str, ...] = ()

    @property
    def linears(self) -> list[str]:
        """Relative linear names in group order (``self_attn.q_proj``, ...)."""
        return [n for grp in self.groups for n in grp]


_LLAMA = ArchSpec(
    layers="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    residual=("mlp.down_proj",),
)
# LLaMA-architecture families share module names; add an entry here for a new architecture.
ARCHITECTURES: dict[str, ArchSpec] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {sorted(ARCHITECTURES)} "
                         f"(add an ArchSpec to lowbit.quant.arch.ARCHITECTURES for a LLaMA-like model)")
    return ARCHITECTURES[model_type]


def _matches(rel: str, targets: list[str] | tuple[str, ...]) -> bool:
    return rel in targets or rel.split(".")[-1] in targets


def valid_target_names(spec: ArchSpec) -> list[str]:
    """Every name a target may use: relative names and their last parts (``q_proj``)."""
    return sorted(set(spec.linears) | {n.split(".")[-1] for n in spec.linears})


def check_targets(spec: ArchSpec, targets: list[str] | tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in valid_target_names(spec)]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown}; valid names: {valid_target_names(spec)}")


def target_groups(spec: ArchSpec, targets: list[str] | None) -> list[list[str]]:
    """The sequential groups restricted to ``targets`` (``None``: all), empty groups dropped."""
    if targets is not None:
        check_targets(spec, targets)
    groups = [[n for n in grp if targets is None or _matches(n, targets)] for grp in spec.groups]
    return [g for g in groups if g]


def resolve_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Full module names (``model.layers.3.self_attn.q_proj``) of the targets in every decoder layer."""
    spec = arch_spec(model)
    check_targets(spec, targets)
    layers = model.get_submodule(spec.layers)
    return [f"{spec.layers}.{i}.{n}" for i in range(len(layers)) for n in spec.linears if _matches(n, targets)]


def relative_name(spec: ArchSpec, full: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    return full[len(spec.layers) + 1:].split(".", 1)[1]


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``root`` by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
