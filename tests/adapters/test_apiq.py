"""ApiQ-bw (lowbit.adapters.apiq) against the block-wise objective of Liao et al. 2024 (arXiv 2402.05147).

- ``lwc_quantize`` with σ(γ) = σ(β) = 1 is lowbit's RTN min-max quantizer; smaller σ shrinks the grid to the
  clipped range ``[σ(β)·min(min w, 0), σ(γ)·max(max w, 0)]`` (up to half a step from the integer zero point);
  rounding is straight-through (gradient 1 inside the range, 0 where the code is clamped).
- ``lwc_to_quantized`` stores exactly what ``lwc_quantize`` computes.
- ``apiq_bw`` lowers ``MSE(fp_block(x), q_block(x))`` of the first block below its start (RTN-like base, B = 0)
  and brings the whole model's last hidden state closer to full precision, checked here by rebuilding the blocks
  by hand from the returned ``(Q, A, B)`` with ``W_eff = Q + (alpha/r)·B @ A``.
- ``lora_targets`` (the paper's setting: all projections quantized, LoRA on a subset): every target is returned
  quantized with learned clipping, only the LoRA targets carry ``A, B`` (``None`` elsewhere, ``W_eff = Q``), the
  block MSE still falls, and ``lora_targets`` outside ``targets`` is rejected.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import random_llama
from torch import nn

from lowbit.adapters.apiq import apiq_bw
from lowbit.adapters.lwc import lwc_quantize, lwc_to_quantized
from lowbit.quant.calibrate import capture_layer_inputs
from lowbit.quant.rtn import rtn_quantize

BITS, GROUP, RANK, ALPHA = 2, 32, 8, 16.0
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(out=16, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.02


def _logits(W, group_size, value):
    out, inp = W.shape
    n_groups = 1 if group_size == -1 else inp // group_size
    return torch.full((out, n_groups), float(value))


def _calib(n=8, seqlen=32, seed=0, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seqlen), generator=g)


# --------------------------------------------------------------------------------------------------------------
# lwc_quantize / lwc_to_quantized

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_unclipped_lwc_is_rtn(bits, group_size):
    W = _weight()
    # σ(30) == 1.0 in float32: no clipping at all.
    big = _logits(W, group_size, 30.0)
    Wq = lwc_quantize(W, big, big, bits, group_size)
    rtn = rtn_quantize(W, bits, group_size)
    step = rtn.scales.max()
    torch.testing.assert_close(Wq, rtn.dequantize(), rtol=0, atol=float(step) * 1e-3)


@pytest.mark.parametrize("group_size", [32, -1])
def test_lower_clipping_shrinks_the_grid(group_size):
    W = _weight(seed=1)
    bits, maxq = 2, 3
    g = W.shape[1] if group_size == -1 else group_size
    Wg = W.reshape(W.shape[0], -1, g)
    lo_raw, hi_raw = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    for logit in (4.0, 0.0, -1.0):
        s = torch.sigmoid(torch.tensor(logit))
        lo, hi = s * lo_raw, s * hi_raw
        step = (hi - lo) / maxq
        Wq = lwc_quantize(W, _logits(W, group_size, logit), _logits(W, group_size, logit), bits, group_size)
        Wqg = Wq.reshape_as(Wg)
        # Grid endpoints lie within half a step of the clipped range (integer zero point), plus fp16 scale rounding.
        tol = 0.5 * step + maxq * 1e-3 * step
        assert (Wqg.amax(-1) <= hi + tol).all() and (Wqg.amin(-1) >= lo - tol).all()
    full = lwc_quantize(W, _logits(W, group_size, 30), _logits(W, group_size, 30), bits, group_size)
    half = lwc_quantize(W, _logits(W, group_size, 0), _logits(W, group_size, 0), bits, group_size)
    span = lambda q: (q.reshape_as(Wg).amax(-1) - q.reshape_as(Wg).amin(-1))  # noqa: E731
    assert (span(half) < span(full)).all()


def test_gradients_reach_clipping_logits():
    W = _weight(seed=2)
    gamma = _logits(W, GROUP, 4.0).requires_grad_()
    beta = _logits(W, GROUP, 4.0).requires_grad_()
    target = W + 0.003 * torch.randn(W.shape, generator=torch.Generator().manual_seed(3))
    loss = ((lwc_quantize(W, gamma, beta, 2, GROUP) - target) ** 2).sum()
    loss.backward()
    for t in (gamma, beta):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert (t.grad != 0).float().mean() > 0.9
    # The STE gradient in closed form for group (0, 0): codes q are constants, round(w/s) has derivative w.r.t. s
    # of -w/s² inside the range (0 where clamped), so dŴ/ds = (q - z) - w/s (or q - z), and
    # ds/dγ = xmax·σ'(γ)/maxq, ds/dβ = -xmin·σ'(β)/maxq (the integer zero point z is piecewise constant).
    maxq = 3
    Q = lwc_to_quantized(W, gamma.detach(), beta.detach(), 2, GROUP)
    w, t = W[0, :GROUP].double(), target[0, :GROUP].double()
    sc, z = Q.scales[0, 0].double(), Q.zeros[0, 0].double()
    q = Q.codes[0, :GROUP].double()
    clamped = (torch.round(w / sc) + z < 0) | (torch.round(w / sc) + z > maxq)
    dw_ds = torch.where(clamped, q - z, q - z - w / sc)
    dl_ds = (2 * (sc * (q - z) - t) * dw_ds).sum()
    sig = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64))
    dl_dgamma = dl_ds * w.max().clamp(min=0) * sig * (1 - sig) / maxq
    dl_dbeta = -dl_ds * w.min().clamp(max=0) * sig * (1 - sig) / maxq
    assert math.isclose(float(gamma.grad[0, 0]), float(dl_dgamma), rel_tol=1e-3)
    assert math.isclose(float(beta.grad[0, 0]), float(dl_dbeta), rel_tol=1e-3)


def test_straight_through_gradient_wrt_weight():
    W = _weight(seed=4).requires_grad_()
    bits, maxq, logit = 2, 3, -1.0  # σ(-1) ≈ 0.27: many weights fall outside the clipped range
    Wq = lwc_quantize(W, _logits(W, GROUP, logit), _logits(W, GROUP, logit), bits, GROUP)
    Wq.sum().backward()
    Wg = W.detach().reshape(W.shape[0], -1, GROUP)
    s = torch.sigmoid(torch.tensor(logit))
    lo, hi = (s * Wg.amin(-1).clamp(max=0))[..., None], (s * Wg.amax(-1).clamp(min=0))[..., None]
    step = (hi - lo) / maxq
    grad = W.grad.reshape_as(Wg)
    inside = (Wg >= lo) & (Wg <= hi)
    outside = (Wg > hi + step) | (Wg < lo - step)
    assert inside.sum() > 0 and outside.sum() > 0
    assert (grad[inside] == 1).all()
    assert (grad[outside] == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_to_quantized_matches_fake_quant(bits, group_size):
    W = _weight(seed=5)
    g = torch.Generator().manual_seed(6)
    gamma = _logits(W, group_size, 0) + 3 * torch.randn(W.shape[0], 1 if group_size == -1 else 4, generator=g)
    beta = _logits(W, group_size, 0) + 3 * torch.randn(gamma.shape, generator=g)
    qw = lwc_to_quantized(W, gamma, beta, bits, group_size)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    assert qw.scales.shape == gamma.shape and qw.zeros.shape == gamma.shape and not qw.sym
    # Scales already fp16-representable, so storing them as fp16 changes nothing.
    assert torch.equal(qw.scales.half().float(), qw.scales)
    ref = lwc_quantize(W, gamma, beta, bits, group_size)
    torch.testing.assert_close(qw.dequantize(), ref, rtol=0, atol=float(qw.scales.max()) * 1e-3)


def test_lwc_shape_errors():
    W = _weight()
    with pytest.raises(ValueError, match=r"gamma must have shape \(16, 4\)"):
        lwc_quantize(W, torch.zeros(16, 2), torch.zeros(16, 4), 2, 32)
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 128"):
        lwc_quantize(W, torch.zeros(16, 2), torch.zeros(16, 2), 2, 48)
    with pytest.raises(ValueError, match="got 5"):
        lwc_to_quantized(W, torch.zeros(16, 4), torch.zeros(16, 4), 5, 32)


# --------------------------------------------------------------------------------------------------------------
# apiq_bw on a random tiny LLaMA (hidden 64, 2 layers, intermediate 128)

@pytest.fixture(scope="module")
def run():
    """One ApiQ-bw run at 2 bits: 8×32 calibration tokens, 20 epochs, batches of 2 (~2 s)."""
    model = random_llama(hidden=64, layers=2, intermediate=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _calib(n=8)
    out = apiq_bw(model, calib, bits=BITS, group_size=GROUP, rank=RANK, alpha=ALPHA, epochs=20, batch_size=2,
                  progress=False)
    return model, before, calib, out


def _effective(model, weights: dict[str, torch.Tensor]):
    """A copy of ``model`` whose named linears carry the given dense weights."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, W in weights.items():
            m.get_submodule(name).weight.copy_(W)
    return m


def _apiq_weights(out):
    return {n: Q.dequantize() + (0 if A is None else (ALPHA / RANK) * B @ A) for n, (Q, A, B) in out.items()}


def _baseline_weights(model, kind):
    ws = {}
    for i in range(len(model.model.layers)):
        for p in PROJ:
            name = f"model.layers.{i}.{p}"
            W = model.get_submodule(name).weight.detach()
            if kind == "rtn":
                ws[name] = rtn_quantize(W, BITS, GROUP).dequantize()
            else:  # the ApiQ start: clipping logits 4, B = 0
                init = _logits(W, GROUP, 4.0)
                ws[name] = lwc_to_quantized(W, init, init, BITS, GROUP).dequantize()
    return ws


def _block0_mse(model, weights, calib):
    x, kws = capture_layer_inputs(model, model.model.layers, calib)
    fp_block = model.model.layers[0]
    q_block = _effective(model, weights).model.layers[0]
    with torch.no_grad():
        err = [((q_block(h, **kw) - fp_block(h, **kw)) ** 2).mean() for h, kw in zip(x, kws)]
    return float(torch.stack(err).mean())


def _last_layer_mse(model, weights, ids):
    """MSE between the last decoder layer's outputs ``(n, seqlen, hidden)`` of the adapted and the fp model."""
    outs = []
    for m in (model, _effective(model, weights)):
        hook = m.model.layers[-1].register_forward_hook(
            lambda mod, args, o: outs.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(input_ids=ids)
        hook.remove()
    return float(((outs[1] - outs[0]) ** 2).mean())


def test_returns_every_projection_with_lora_shapes(run):
    model, _, _, out = run
    assert sorted(out) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in PROJ)
    for name, (Q, A, B) in out.items():
        o, i = model.get_submodule(name).weight.shape
        assert Q.shape == (o, i) and Q.bits == BITS and Q.group_size == GROUP
        assert A.shape == (RANK, i) and B.shape == (o, RANK)
        assert B.abs().max() > 0  # LoRA was trained


def test_first_block_mse_drops(run):
    model, _, calib, out = run
    start = _block0_mse(model, _baseline_weights(model, "init"), calib)
    rtn = _block0_mse(model, _baseline_weights(model, "rtn"), calib)
    apiq = _block0_mse(model, _apiq_weights(out), calib)
    print(f"block 0 MSE: RTN {rtn:.3e}  ApiQ start {start:.3e}  ApiQ-bw {apiq:.3e}")
    assert apiq < 0.5 * start and apiq < 0.5 * rtn


def test_whole_model_closer_to_full_precision(run):
    model, _, calib, out = run
    # Held-out random tokens share little with 8×32 calibration tokens of a 320-word random model, so the
    # generalisation margin is modest (measured ~20% lower); on the calibration tokens it is ~10x.
    for ids, label, factor in ((calib, "calibration", 0.5), (_calib(n=8, seed=99), "held-out", 0.9)):
        start = _last_layer_mse(model, _baseline_weights(model, "init"), ids)
        rtn = _last_layer_mse(model, _baseline_weights(model, "rtn"), ids)
        apiq = _last_layer_mse(model, _apiq_weights(out), ids)
        print(f"last-layer output MSE ({label}): RTN {rtn:.3e}  ApiQ start {start:.3e}  ApiQ-bw {apiq:.3e}")
        assert apiq < factor * start and apiq < factor * rtn


def test_model_is_unchanged(run):
    model, before, _, _ = run
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.{p}"), nn.Linear) for i in range(2) for p in PROJ)
    assert not model.training


# --------------------------------------------------------------------------------------------------------------
# lora_targets: quantize every projection, LoRA only on some (the DiaBlo table's "ApiQ-bw 112M" setting)

LORA_SUBSET = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def run_subset():
    """ApiQ-bw with targets=None, lora_targets=q/v: 8×32 calibration tokens, 20 epochs, batches of 4."""
    model = random_llama(hidden=64, layers=2, intermediate=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _calib(n=8)
    out = apiq_bw(model, calib, bits=BITS, group_size=GROUP, rank=RANK, alpha=ALPHA, epochs=20, batch_size=4,
                  progress=False, targets=None, lora_targets=LORA_SUBSET)
    return model, before, calib, out


def test_lora_subset_quantizes_everything_adapts_only_the_subset(run_subset):
    model, _, _, out = run_subset
    assert sorted(out) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in PROJ)
    for name, (Q, A, B) in out.items():
        W = model.get_submodule(name).weight.detach()
        o, i = W.shape
        assert Q.shape == (o, i) and Q.bits == BITS and Q.group_size == GROUP and Q.method == "apiq"
        if name.split(".")[-1] in LORA_SUBSET:
            assert A.shape == (RANK, i) and B.shape == (o, RANK)
            assert B.abs().max() > 0  # LoRA was trained
        else:
            assert A is None and B is None
        # The clipping of every quantized linear, with or without LoRA, was trained: the scales left the start.
        init = _logits(W, GROUP, 4.0)
        assert not torch.equal(Q.scales, lwc_to_quantized(W, init, init, BITS, GROUP).scales)


def test_lora_subset_output_mse_drops(run_subset):
    model, _, calib, out = run_subset
    # Measured over model seeds 0-2: block 0 ≈ 0.6× the start, last layer ≈ 0.4× (LoRA on all seven: < 0.5×, 0.1×).
    start = _block0_mse(model, _baseline_weights(model, "init"), calib)
    apiq = _block0_mse(model, _apiq_weights(out), calib)
    print(f"block 0 MSE, LoRA on {LORA_SUBSET}: ApiQ start {start:.3e}  ApiQ-bw {apiq:.3e}")
    assert apiq < 0.8 * start
    start = _last_layer_mse(model, _baseline_weights(model, "init"), calib)
    apiq = _last_layer_mse(model, _apiq_weights(out), calib)
    print(f"last-layer output MSE, LoRA on {LORA_SUBSET}: ApiQ start {start:.3e}  ApiQ-bw {apiq:.3e}")
    assert apiq < 0.7 * start


def test_lora_subset_model_is_unchanged(run_subset):
    model, before, _, _ = run_subset
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.{p}"), nn.Linear) for i in range(2) for p in PROJ)


def test_lora_targets_none_means_targets():
    """``lora_targets=None`` and ``lora_targets=targets`` (here written with full names) give identical results."""
    model = random_llama(hidden=64, layers=1, intermediate=128)
    args = dict(bits=2, group_size=32, rank=4, targets=["q_proj", "down_proj"], epochs=2, batch_size=2,
                progress=False)
    a = apiq_bw(model, _calib(n=2, seqlen=8), **args)
    b = apiq_bw(model, _calib(n=2, seqlen=8), lora_targets=["self_attn.q_proj", "mlp.down_proj"], **args)
    assert a.keys() == b.keys()
    for name in a:
        (Qa, Aa, Ba), (Qb, Ab, Bb) = a[name], b[name]
        assert torch.equal(Qa.codes, Qb.codes) and torch.equal(Qa.scales, Qb.scales)
        assert torch.equal(Aa, Ab) and torch.equal(Ba, Bb)


def test_zero_epochs_is_the_start_point():
    """No training: Q is the σ(4)-clipped quantizer, B = 0 and A is PEFT's Kaiming-uniform draw (|A| ≤ 1/√in)."""
    model = random_llama(hidden=64, layers=1, intermediate=128)
    out = apiq_bw(model, _calib(n=2, seqlen=8), bits=3, group_size=-1, rank=4, targets=["v_proj", "down_proj"],
                  epochs=0, progress=False)
    assert sorted(out) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    for name, (Q, A, B) in out.items():
        W = model.get_submodule(name).weight.detach()
        init = _logits(W, -1, 4.0)
        assert torch.equal(Q.dequantize(), lwc_to_quantized(W, init, init, 3, -1).dequantize())
        assert torch.equal(B, torch.zeros_like(B))
        bound = 1 / math.sqrt(W.shape[1])
        assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound


def test_batches_with_a_remainder():
    model = random_llama(hidden=64, layers=1, intermediate=128)
    out = apiq_bw(model, _calib(n=3, seqlen=8), bits=4, group_size=64, rank=4, targets=["self_attn.q_proj"],
                  epochs=1, batch_size=2, progress=False)
    (Q, A, B), = out.values()
    assert torch.isfinite(Q.dequantize()).all() and torch.isfinite(A).all() and torch.isfinite(B).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5}, "got 5"),
    ({"rank": 64}, "rank 64 must be < min"),
    ({"rank": 0}, "got 0"),
    ({"group_size": 48}, "group_size 48 does not divide in_features 64"),
    ({"targets": ["q_proj", "foo_proj"]}, r"unknown target module\(s\) \['foo_proj'\].*q_proj"),
    ({"targets": "q_proj"}, "list of module names, got the string 'q_proj'"),
    ({"calibration": torch.arange(10)}, r"calibration must be .*got \(10,\)"),
    ({"calibration": torch.zeros(2, 0, dtype=torch.long)}, r"got \(2, 0\)"),
    ({"calibration": torch.zeros(2, 4)}, "dtype torch.float32"),
    ({"epochs": -1}, "got -1"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"targets": ["q_proj", "o_proj"], "lora_targets": ["q_proj", "v_proj", "mlp.up_proj"]},
     r"lora_targets must be a subset of targets.*\['v_proj', 'mlp.up_proj'\] not in targets=\['q_proj', 'o_proj'\]"
     r".*valid lora_targets names: \['o_proj', 'q_proj', 'self_attn.o_proj', 'self_attn.q_proj'\]"),
    ({"lora_targets": ["q_proj", "foo_proj"]}, r"unknown target module\(s\) \['foo_proj'\].*q_proj"),
    ({"lora_targets": "q_proj"}, "lora_targets must be a list of module names, got the string 'q_proj'"),
])
def test_bad_input_raises(kwargs, message):
    model = random_llama(hidden=64, layers=1, intermediate=128)
    args = {"calibration": _calib(n=2, seqlen=8), "bits": 2, "group_size": 32, "rank": 8, "progress": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        apiq_bw(model, **args)
