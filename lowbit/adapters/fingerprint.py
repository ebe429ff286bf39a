"""The fingerprint of the frozen base an adapter was trained on, recorded by ``save_adapter`` and checked by
``load_adapter``, so that an adapter is not silently attached to another base (a float model, another bit width,
another quantization run of the same model).

It is computed from the ``nn.Module`` alone, with any adapter wrappers stripped (their frozen bases count, their
trainable tensors do not), so it is the same for the model during training and for the base reloaded later:

- whether the model is quantized and, for its ``QuantLinear`` layers, the bit widths, group sizes and code kinds
  (``uniform`` / ``nf`` codebook); the quantization method, where the model records it, only names the base in
  messages;
- ``codes_sha256``: SHA-256 over every integer tensor (the packed codes ``qweight``, act-order ``g_idx``) with its
  name and shape, in name order. Packed codes survive saving and loading bit for bit and no dtype cast touches
  them, so the hash is exact; hashing them whole runs at about 1.3 GB/s on one CPU core (31 ms for a 2-bit
  SmolLM2-135M, about 1.5 s for a 2-bit 7B model, measured);
- ``probe``: every floating tensor (embeddings, norms, float linears, scales, zeros) sampled at fixed, evenly
  spaced positions (``PROBE_TOTAL`` values in all, at most 64 per tensor). Values are compared with a relative
  tolerance of ``2^-7`` plus ``1e-7``, which accepts the same checkpoint loaded in float32, float16 or bfloat16
  (rounding changes a value by at most ``2^-8`` relatively) and rejects any base whose sampled weights differ by
  more (another checkpoint; a quantized weight against the float one). A float base that differs from the
  training base only below that tolerance is not told apart.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..quant.qlinear import QuantLinear
from .base import AdapterLayer

FINGERPRINT_VERSION = 1
PROBE_TOTAL = 1024
PROBE_MAX_PER_TENSOR = 64
RTOL = 2.0**-7
ATOL = 1e-7


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every adapter wrapper replaced by its base: ``<module>.base.<t>`` becomes
    ``<module>.<t>`` and the wrapper's own (trainable) tensors are left out."""
    wrappers = sorted((n for n, m in model.named_modules() if isinstance(m, AdapterLayer)), key=len, reverse=True)
    out = {}
    for key, t in model.state_dict().items():
        owner = next((w for w in wrappers if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = t
        elif key.startswith(owner + ".base."):
            out[owner + key[len(owner) + len(".base"):]] = t
    return out


def _probe(t: torch.Tensor, k: int) -> list[float]:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return []
    k = min(k, n)
    # The middle of each of k equal strides: fixed by the shape alone, spread over the whole tensor.
    idx = (torch.arange(k, dtype=torch.int64) * n) // k + n // (2 * k)
    vals = flat[idx.clamp(max=n - 1).to(flat.device)].float().cpu().tolist()
    return [float(f"{v:.8g}") for v in vals]


def base_fingerprint(model: nn.Module) -> dict:
    """The fingerprint (a JSON-ready dict, see the module docstring) of ``model``'s frozen base."""
    qmods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    state = base_state(model)
    h = hashlib.sha256()
    floats = {}
    for key in sorted(state):
        t = state[key]
        if t.is_floating_point():
            floats[key] = t
            continue
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy())
    per = max(1, min(PROBE_MAX_PER_TENSOR, PROBE_TOTAL // max(1, len(floats))))
    qcfg = getattr(model, "lowbit_quant_config", None)
    return {
        "version": FINGERPRINT_VERSION,
        "quantized": bool(qmods),
        "bits": sorted({m.bits for m in qmods}),
        "group_sizes": sorted({m.group_size for m in qmods}),
        "kinds": sorted({"nf" if m.codebook is not None else "uniform" for m in qmods}),
        "method": getattr(qcfg, "method", None) if qmods else None,
        "codes_sha256": h.hexdigest(),
        "probe": {k: _probe(t, per) for k, t in floats.items()},
    }


def describe_base(fp: dict) -> str:
    """``float`` or e.g. ``2-bit gptq (group 64)``."""
    if not fp.get("quantized"):
        return "float"
    bits = "/".join(str(b) for b in fp.get("bits", []))
    kind = fp.get("method") or "/".join(fp.get("kinds", [])) or "quantized"
    groups = "/".join("per-channel" if g == -1 else str(g) for g in fp.get("group_sizes", []))
    return f"{bits}-bit {kind} (group {groups})"


def base_difference(saved: dict, current: dict) -> str | None:
    """How the base an adapter was trained on (``saved``) differs from ``current``: one sentence, or ``None``."""
    def phrase(fp: dict) -> str:
        d = describe_base(fp)
        return f"{'an' if d.startswith('8') else 'a'} {d} base"

    this = "float" if not current.get("quantized") else phrase(current)
    for key in ("quantized", "bits", "group_sizes", "kinds"):
        if saved.get(key) != current.get(key):
            return f"the adapter was trained on {phrase(saved)}, this model is {this}"
    if saved.get("codes_sha256") != current.get("codes_sha256"):
        if saved.get("quantized"):
            return (f"this model is {this} as the adapter's was, but its quantized weights differ (another "
                    f"quantization run: other calibration data or method, or an init such as LoftQ or ApiQ-bw that "
                    f"re-quantizes the base)")
        return "the base's integer tensors differ"
    sp, cp = saved.get("probe", {}), current.get("probe", {})
    if set(sp) != set(cp):
        extra, missing = sorted(set(cp) - set(sp)), sorted(set(sp) - set(cp))
        return (f"the base's tensors differ (this model has {extra[:2]} that the adapter's base lacks, lacks "
                f"{missing[:2]})")
    bad, total, first = 0, 0, None
    for key in sorted(sp):
        for i, (x, y) in enumerate(zip(sp[key], cp[key])):
            total += 1
            if not abs(x - y) <= RTOL * max(abs(x), abs(y)) + ATOL:
                bad += 1
                first = first or (key, i, x, y)
        if len(sp[key]) != len(cp[key]):
            return f"the base's tensor {key} has another size"
    if bad:
        key, i, x, y = first
        return (f"this model's weights differ from the adapter's base ({bad} of {total} sampled values differ by "
                f"more than dtype rounding, first in {key}: {x:.6g} there, {y:.6g} here)")
    return None
