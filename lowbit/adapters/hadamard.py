"""Walsh–Hadamard matrices of the orders LLaMA-class layers have, and the fast transform with them (used by QWHA,
:mod:`lowbit.adapters.qwha`).

A Hadamard matrix ``H`` of order ``d`` has ±1 entries and ``H Hᵀ = d·I``, so ``U = H/√d`` is orthogonal. Orders that
are not a power of two are written ``d = K·2^m`` and ``H_d = H_K ⊗ S_{2^m}`` (Kronecker product; ``S`` the Sylvester
matrix), as in QuaRot (Ashkboos et al. 2024, arXiv 2404.00456) and the QWHA reference code. The base orders ``K``:

- Paley I (Paley 1933): ``q`` prime, ``q ≡ 3 (mod 4)`` gives order ``q + 1`` from the Jacobsthal matrix
  ``Q_ij = χ(j − i)`` (``χ`` the quadratic character mod ``q``): ``H = [[1, 1ᵀ], [−1, Q + I]]``;
- Paley II: ``q`` prime, ``q ≡ 1 (mod 4)`` gives order ``2(q + 1)`` from the symmetric conference matrix
  ``C = [[0, 1ᵀ], [1, Q]]``: ``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]``;
- 172 (LLaMA-2-7B's 11008 = 172·64), which no Paley construction reaches, from the four symmetric circulant
  Williamson matrices of order 43 of N. J. A. Sloane's library of Hadamard matrices (``had.172.will``), stored
  below as their first rows, in the Williamson array.

For each odd part ``o`` the smallest ``K = o·2^a`` (``a ≥ 2``, ``K ≤ 256``) these reach is its base order
(:data:`BASE_ORDERS`); every supported order is checked to give ``H Hᵀ = d·I`` in the tests.

The transform ``x ↦ x Uᵀ`` is applied without forming ``U``: ``U = F_1 ⊗ … ⊗ F_k`` with ``F_1 = H_K/√K`` and Sylvester
factors of order ≤ 128, each applied as one dense multiply along its own axis of ``x`` viewed as ``(…, n_1, …, n_k)``
— the radix-``n`` form of the fast Walsh–Hadamard transform, ``O(d·Σn_i)`` per row instead of ``O(d²)``. On CPU the
two 64-point multiplies of a 4096-point transform ran 4–9× faster than butterfly passes (12 radix-2 passes, or 7
above a 32-point block; 512 rows on 2 cores), because each butterfly pass streams the whole tensor through memory.
"""

from __future__ import annotations

import functools

import torch

MAX_BASE = 256  # the largest base order K (a K×K multiply per K·2^m-point transform)
MAX_RADIX_LOG2 = 7  # Sylvester factors of order ≤ 128


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = χ(j − i)`` ``(q, q)`` for a prime ``q``: +1 for a non-zero square mod ``q``, −1 for a non-square, 0
    on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley1(q: int) -> torch.Tensor:
    """Paley's first construction: a Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q ≡ 3 (mod 4), got {q}")
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)  # skew-symmetric: Q is for q ≡ 3 (mod 4)
    return S + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Paley's second construction: a Hadamard matrix of order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q ≡ 1 (mod 4), got {q}")
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)  # symmetric conference matrix: C² = q·I
    on = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    off = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, on) + torch.kron(torch.eye(q + 1, dtype=torch.float64), off)


# First rows of the symmetric circulant Williamson matrices A, B, C, D of order 43 (Sloane's had.172.will):
# A² + B² + C² + D² = 172·I.
_WILLIAMSON_43 = (
    "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    "++-++++++----+-+--++-++-++--+-+----++++++-+",
    "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
    "++---++++-+--+--++--------++--+--+-++++---+",
)


def _circulant(row: str) -> torch.Tensor:
    """The circulant ``M_ij = r[(j − i) mod n]`` of a ``+``/``-`` string ``r``."""
    r = torch.tensor([1.0 if s == "+" else -1.0 for s in row], dtype=torch.float64)
    i = torch.arange(len(row))
    return r[(i[None, :] - i[:, None]) % len(row)]


def williamson172() -> torch.Tensor:
    """A Hadamard matrix of order 172: the Williamson array ``[[A, B, C, D], [−B, A, −D, C], [−C, D, A, −B],
    [−D, −C, B, A]]`` of the stored circulants."""
    A, B, C, D = (_circulant(row) for row in _WILLIAMSON_43)
    return torch.cat([torch.cat(r, 1) for r in ((A, B, C, D), (-B, A, -D, C), (-C, D, A, -B), (-D, -C, B, A))], 0)


def sylvester(n: int) -> torch.Tensor:
    """The Sylvester (Walsh) matrix of order ``n = 2^m``, ``S_2n = [[S_n, S_n], [S_n, −S_n]]``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester matrix has a power-of-two order, got {n}")
    S = torch.ones(1, 1, dtype=torch.float64)
    while S.shape[0] < n:
        S = torch.cat([torch.cat([S, S], 1), torch.cat([S, -S], 1)], 0)
    return S


def _construction(K: int):
    """How base order ``K`` is built: ``(function, argument)``, or ``None`` when none of the three reaches it."""
    if K == 172:
        return williamson172, None
    if _is_prime(K - 1) and (K - 1) % 4 == 3:
        return paley1, K - 1
    if K % 2 == 0 and _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        return paley2, K // 2 - 1
    return None


def _base_orders() -> dict[int, int]:
    """``{odd part o: base order K}``: the smallest constructible ``K = o·2^a``, ``a ≥ 2``, ``K ≤ MAX_BASE``."""
    out = {}
    for o in range(3, MAX_BASE // 4 + 1, 2):
        K = 4 * o
        while K <= MAX_BASE and _construction(K) is None:
            K *= 2
        if K <= MAX_BASE:
            out[o] = K
    return out


BASE_ORDERS: dict[int, int] = _base_orders()


def supported_form() -> str:
    """The orders this module builds, in words (for error messages)."""
    return f"2^m or K·2^m with K in {sorted(BASE_ORDERS.values())}"


def hadamard_split(d: int) -> tuple[int, int]:
    """``(K, m)`` with ``d = K·2^m`` (``K = 1`` for a power of two); raises ``ValueError`` listing the supported
    orders when no Hadamard matrix of order ``d`` is built here."""
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"a Hadamard order must be a positive integer, got {d!r}")
    m = (d & -d).bit_length() - 1
    odd = d >> m
    if odd == 1:
        return 1, m
    K = BASE_ORDERS.get(odd)
    if K is None or d % K:
        raise ValueError(f"no Walsh–Hadamard matrix of order {d} is built in: supported orders are "
                         f"{supported_form()}")
    return K, (d // K).bit_length() - 1


@functools.cache
def base_matrix(K: int) -> torch.Tensor:
    """The stored or constructed Hadamard matrix of base order ``K`` ``(K, K)`` float64 (``K = 1``: ``[[1]]``)."""
    if K == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    how = _construction(K)
    if how is None:
        raise ValueError(f"{K} is not a base order; supported orders are {supported_form()}")
    fn, q = how
    return fn() if q is None else fn(q)


def hadamard_matrix(d: int) -> torch.Tensor:
    """The dense ±1 Hadamard matrix ``H_d = H_K ⊗ S_{2^m}`` ``(d, d)`` float64 that :func:`walsh_hadamard` applies
    (as ``H_d/√d``) — for references and tests; the adapter never forms it."""
    K, m = hadamard_split(d)
    return torch.kron(base_matrix(K), sylvester(2**m))


@functools.cache
def _factors_cpu(d: int) -> tuple[torch.Tensor, ...]:
    """The orthonormal Kronecker factors of ``U = H_d/√d``, outermost axis first."""
    K, m = hadamard_split(d)
    parts = -(-m // MAX_RADIX_LOG2)
    logs = [m // parts + (1 if i < m % parts else 0) for i in range(parts)] if m else []
    mats = ([base_matrix(K)] if K > 1 else []) + [sylvester(2**k) for k in logs]
    return tuple((F / F.shape[0] ** 0.5).contiguous() for F in mats) or (torch.ones(1, 1, dtype=torch.float64),)


_DEVICE_FACTORS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _factors(d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    key = (d, dtype, str(device))
    if key not in _DEVICE_FACTORS:
        _DEVICE_FACTORS[key] = tuple(F.to(device=device, dtype=dtype) for F in _factors_cpu(d))
    return _DEVICE_FACTORS[key]


def _apply(x: torch.Tensor, factors: tuple[torch.Tensor, ...], adjoint: bool) -> torch.Tensor:
    """``x Uᵀ`` (``adjoint``: ``x U``) for ``x`` ``(R, d)``, one factor per axis of ``x`` as ``(R, n_1, …, n_k)``."""
    R, d = x.shape
    pre, post, y = R, d, x
    for F in factors:
        n = F.shape[0]
        post //= n
        F = F.t() if adjoint else F
        if post == 1:  # the last axis: one matrix multiply over every row
            y = y.reshape(pre, n) @ F.t()
        else:  # y[r, b, c] = Σ_a F[b, a] y[r, a, c]
            y = torch.matmul(F, y.reshape(pre, n, post))
        pre *= n
    return y.reshape(R, d)


class _WalshHadamard(torch.autograd.Function):
    """``x ↦ x Uᵀ`` with the adjoint ``g ↦ g U`` as its backward (linear: nothing is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        ctx.adjoint = adjoint
        return _apply(x, _factors(x.shape[-1], x.dtype, x.device), adjoint)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _apply(g.contiguous(), _factors(g.shape[-1], g.dtype, g.device), not ctx.adjoint), None


def walsh_hadamard(x: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """The orthonormal Walsh–Hadamard transform along the last axis: ``x`` ``(..., d)`` → ``x Uᵀ`` ``(..., d)`` with
    ``U = H_d/√d`` (``adjoint=True``: ``x U``, the inverse). Differentiable; raises ``ValueError`` for an order
    that is not built here."""
    d = x.shape[-1]
    hadamard_split(d)
    lead = x.shape[:-1]
    return _WalshHadamard.apply(x.reshape(-1, d), adjoint).reshape(*lead, d)
