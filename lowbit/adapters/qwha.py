"""QWHA: quantization-aware Walsh–Hadamard adaptation (Jeon et al. 2025, "QWHA: Quantization-Aware Walsh-Hadamard
Adaptation for Parameter-Efficient Fine-Tuning on Large Language Models", arXiv 2509.17428; reference code
vantaa89/qwha, where the method is called QHFT).

Objective: fine-tune ``N`` coefficients of the weight delta in the Walsh–Hadamard basis of the input dimension,
``ΔW = P·U`` with ``U = H/√in`` (``H`` the ±1 Hadamard matrix of order ``in``, :mod:`lowbit.adapters.hadamard`) and
``P`` ``(out, in)`` sparse: the trainable vector ``c`` ``(N,)`` sits at fixed positions ``(row, column)`` chosen by
the initialisation (:mod:`lowbit.adapters.qwha_init`; the zero ``default`` init draws them uniformly at random, as
the reference does without its init). ``N = r·(in + out)``, LoRA's parameter count at the config's ``rank``. The
forward pass never forms ``ΔW``: ``y = base(x) + (x Uᵀ) Pᵀ`` — the fast transform of the activations
(``O(in·log in)`` per token) followed by a sparse product (CSR), whose backward gives the input gradient
``(g P) U`` and the coefficient gradient ``c_k = Σ_tokens g_row(k) · t_col(k)`` (a sampled dense-dense product).

Scaling. The paper writes ``ΔW = s·P·H/(in·√out)`` with a tuned ``s`` (the reference trains LLaMA-3.2-3B with
``s = 4000``). lowbit fixes ``s = √(in·out)``, i.e. ``ΔW = P·U`` with ``U`` orthonormal: each coefficient is the
weight delta's component along one unit basis vector, so one learning rate means what it means for a dense fine-tune
or DiaBlo. Under Adam (``ε`` negligible, no weight decay) the update of ``c`` does not depend on the gradient's scale,
so ``s`` is only a learning-rate multiplier: the paper's ``(s, lr η)`` is lowbit's ``lr η·s/√(in·out)`` (for 4096×4096
at ``s = 4000``: ``0.98·η``; for 4096↔11008: ``0.60·η``).

Where lowbit differs from the released code, and why:

- the forward pass transforms the activations and applies the sparse ``P`` (the reference builds the dense ``ΔW``
  each step and multiplies by ``W + ΔW``): ``O(T·(in·log in + N))`` instead of ``O(T·in·out)``;
- orders that are not a power of two use lowbit's ``H_K ⊗ S_{2^m}`` with Paley / Williamson ``H_K`` (the reference
  stores Sloane's matrices for every ``K``): the same kind of orthogonal ±1 basis, not the same vectors, so
  checkpoints of the two are not interchangeable (the init chooses positions for whichever basis is used);
- the stored positions are sorted by (row, column); the random positions of the zero init come from lowbit's own
  generator (seed 0), the reference's from ``randperm`` with seed 777.

Saved in PEFT's directory layout with ``peft_type = "LOWBIT_QWHA"``: ``<module>.qwha_coefficients`` ``(N,)`` float32
and ``<module>.qwha_positions`` ``(2, N)`` int64 (rows, columns), the positions being part of the adapter.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import AdapterLayer, device_of, peft_targets
from .hadamard import hadamard_split, walsh_hadamard
from .registry import register_adapter


def qwha_budget(in_features: int, out_features: int, rank: int) -> int:
    """``N = rank·(in + out)`` coefficients for an ``out x in`` layer (LoRA's count at ``rank``), after checking
    that ``in`` has a Walsh–Hadamard matrix and that ``N`` fits in the layer's ``in·out`` entries."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"QWHA rank must be a positive integer (it sets N = rank·(in + out)), got {rank!r}")
    try:
        hadamard_split(in_features)
    except ValueError as e:
        raise ValueError(f"QWHA transforms the input dimension: in_features {in_features} is not supported ({e})"
                         ) from None
    n = rank * (in_features + out_features)
    if n > in_features * out_features:
        raise ValueError(f"QWHA rank {rank} gives N = {n} coefficients, more than the {in_features * out_features} "
                         f"entries of a {out_features}x{in_features} layer; choose rank <= "
                         f"{in_features * out_features // (in_features + out_features)}")
    return n


def random_positions(out_features: int, in_features: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct positions drawn uniformly from the ``out x in`` entries, ``(2, n)`` int64 (rows, columns)
    sorted row-major, reproducible from ``seed``. Distinct draws are collected by rejection (``O(n log n)``, no
    permutation of all ``in·out`` entries) unless ``n`` is more than half of them."""
    g = torch.Generator().manual_seed(seed)
    total = out_features * in_features
    if 2 * n > total:
        flat = torch.randperm(total, generator=g)[:n]
    else:
        flat = torch.empty(0, dtype=torch.int64)
        while flat.numel() < n:
            more = torch.randint(total, (n - flat.numel() + n // 8 + 16,), generator=g)
            flat = torch.unique(torch.cat([flat, more]))
        flat = flat[torch.randperm(flat.numel(), generator=g)[:n]]  # a uniform subset of a uniform random set
    flat = flat.sort().values
    return torch.stack([flat // in_features, flat % in_features])


def check_positions(positions: torch.Tensor, out_features: int, in_features: int, n: int) -> torch.Tensor:
    """``positions`` ``(2, n)`` as int64 on the CPU; raises ``ValueError`` unless every entry is inside the layer and
    no position repeats."""
    if tuple(positions.shape) != (2, n) or positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"QWHA positions must be an integer (2, {n}) tensor of (row, column) pairs, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    p = positions.detach().to("cpu", torch.int64)
    if bool((p < 0).any()) or bool((p[0] >= out_features).any()) or bool((p[1] >= in_features).any()):
        raise ValueError(f"QWHA positions fall outside the {out_features}x{in_features} layer")
    if torch.unique(p[0] * in_features + p[1]).numel() != n:
        raise ValueError("QWHA positions repeat an entry; each (row, column) may hold one coefficient")
    return p


def _csr(major: torch.Tensor, minor: torch.Tensor, n_major: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, order)``: the CSR indices of entries at ``(major, minor)`` and the permutation that sorts them."""
    order = torch.argsort(major * (int(minor.max()) + 1 if minor.numel() else 1) + minor, stable=True)
    crow = torch.zeros(n_major + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(major, minlength=n_major).cumsum(0)
    return crow, minor[order].contiguous(), order


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # The indices were built and checked once by the layer; torch's "CSR is beta" notice is not the user's concern.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _SparseSpectrum(torch.autograd.Function):
    """``y = t Pᵀ`` for ``t`` ``(T, in)`` and ``P`` ``(out, in)`` sparse with ``values`` at the CSR indices of
    ``layout``. Backward: ``g P`` (the transposed CSR) and ``[gᵀ t]`` at the positions of ``P`` (SDDMM)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, values: torch.Tensor, layout: dict) -> torch.Tensor:
        P = _csr_tensor(layout["crow"], layout["col"], values, layout["size"])
        ctx.save_for_backward(t, values)
        ctx.layout = layout
        return torch.sparse.mm(P, t.t()).t()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        t, values = ctx.saved_tensors
        lay = ctx.layout
        gT = g.t().contiguous()  # (out, T)
        grad_t = grad_v = None
        if ctx.needs_input_grad[0]:
            Pt = _csr_tensor(lay["crow_t"], lay["col_t"], values[lay["perm_t"]], lay["size"][::-1])
            grad_t = torch.sparse.mm(Pt, gT).t()
        if ctx.needs_input_grad[1]:
            pattern = _csr_tensor(lay["crow"], lay["col"], values.detach(), lay["size"])
            grad_v = torch.sparse.sampled_addmm(pattern, gT, t, beta=0.0).values()
        return grad_t, grad_v, None


@register_adapter("qwha")
class QWHALinear(AdapterLayer):
    """``base`` (``nn.Linear`` or ``QuantLinear``, frozen) plus ``ΔW = P·U``: FP32 ``coefficients`` ``(N,)`` at the
    buffer ``positions`` ``(2, N)`` (rows, columns; sorted row-major), ``U`` the orthonormal Walsh–Hadamard matrix
    of order ``in``. Zero coefficients at :func:`random_positions` until an init sets them (:meth:`set_spectrum`).
    """

    title = "QWHA"
    stored_params = {"qwha_coefficients": "coefficients"}
    stored_buffers = {"qwha_positions": "positions"}
    peft_type = "LOWBIT_QWHA"

    def __init__(self, base: nn.Module, rank: int, dropout: float = 0.0) -> None:
        super().__init__(base, dropout)
        n = qwha_budget(self.in_features, self.out_features, rank)
        self.rank = rank
        dev = device_of(base)
        self.coefficients = nn.Parameter(torch.zeros(n, dtype=torch.float32, device=dev))
        self.register_buffer("positions", torch.empty(2, n, dtype=torch.int64, device=dev))
        for name in ("csr_crow", "csr_col", "csr_t_crow", "csr_t_col", "csr_t_perm"):
            self.register_buffer(name, torch.empty(0, dtype=torch.int64, device=dev), persistent=False)
        self._set_positions(random_positions(self.out_features, self.in_features, n))

    @classmethod
    def from_config(cls, base: nn.Module, cfg) -> QWHALinear:
        return cls(base, cfg.rank, cfg.dropout)

    @classmethod
    def state_shapes(cls, in_features: int, out_features: int, cfg) -> dict[str, tuple[int, ...]]:
        n = qwha_budget(in_features, out_features, cfg.rank)
        return {"qwha_coefficients": (n,), "qwha_positions": (2, n)}

    @classmethod
    def summary(cls, cfg) -> str:
        return f"qwha r={cfg.rank}"

    @classmethod
    def peft_config(cls, cfg, base_name: str | None) -> dict:
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "rank": cfg.rank,
                "coefficients_per_module": "rank * (in_features + out_features)",
                "delta_weight": "P @ H / sqrt(in_features), P sparse (out, in), H the Walsh-Hadamard matrix",
                "dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "base_model_name_or_path": base_name}

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        return {"rank": int(peft["rank"]), "dropout": float(peft.get("dropout", 0.0)),
                "targets": peft_targets(peft)}

    # ---- positions and coefficients ----------------------------------------------------------------------------

    def _set_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Store checked CPU ``positions`` sorted row-major (and the CSR indices of ``P`` and ``Pᵀ``); returns the
        permutation applied, for the coefficients given with them."""
        rows, cols = positions
        crow, col, order = _csr(rows, cols, self.out_features)
        crow_t, col_t, perm_t = _csr(cols[order], rows[order], self.in_features)
        dev = self.coefficients.device
        with torch.no_grad():
            self.positions.copy_(torch.stack([rows[order], cols[order]]).to(dev))
        self.csr_crow, self.csr_col = crow.to(dev), col.to(dev)
        self.csr_t_crow, self.csr_t_col, self.csr_t_perm = crow_t.to(dev), col_t.to(dev), perm_t.to(dev)
        return order

    def set_spectrum(self, positions: torch.Tensor, coefficients: torch.Tensor) -> None:
        """Load ``coefficients`` ``(N,)`` at ``positions`` ``(2, N)`` (rows, columns; any order, no repeats)."""
        n = self.coefficients.numel()
        p = check_positions(positions, self.out_features, self.in_features, n)
        if tuple(coefficients.shape) != (n,):
            raise ValueError(f"QWHA coefficients must have shape ({n},) for this layer, got "
                             f"{tuple(coefficients.shape)}")
        order = self._set_positions(p)
        with torch.no_grad():
            self.coefficients.copy_(coefficients.detach().float().cpu()[order])

    def load_adapter_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """The stored coefficients at the stored positions; raises ``ValueError`` (nothing copied) on a missing key,
        a shape mismatch or positions outside the layer."""
        keys = {k: f"{prefix}.{k}" for k in self.stored_keys()}
        missing = [key for key in keys.values() if key not in state]
        if missing:
            raise ValueError(f"{missing[0]} is missing")
        self.set_spectrum(state[keys["qwha_positions"]], state[keys["qwha_coefficients"]])

    # ---- the adapter ---------------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {"crow": self.csr_crow, "col": self.csr_col, "crow_t": self.csr_t_crow, "col_t": self.csr_t_col,
                "perm_t": self.csr_t_perm, "size": (self.out_features, self.in_features)}

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x Uᵀ) Pᵀ`` for ``x`` ``(..., in)`` → ``(..., out)`` float32."""
        lead = x.shape[:-1]
        t = walsh_hadamard(x.reshape(-1, self.in_features).to(self.coefficients.dtype))  # (T, in) = x Uᵀ
        y = _SparseSpectrum.apply(t, self.coefficients, self._layout())
        return y.reshape(*lead, self.out_features)

    def dense_spectrum(self) -> torch.Tensor:
        """``P`` ``(out, in)`` float32: the coefficients at their positions, zero elsewhere."""
        P = torch.zeros(self.out_features, self.in_features, dtype=self.coefficients.dtype,
                        device=self.coefficients.device)
        return P.index_put((self.positions[0], self.positions[1]), self.coefficients)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = P·U`` ``(out, in)`` float32 (each row of ``P`` transformed by the adjoint)."""
        return walsh_hadamard(self.dense_spectrum(), adjoint=True)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, coefficients={self.coefficients.numel()}, in={self.in_features}"
