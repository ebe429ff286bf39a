"""QWHA (Jeon et al. 2025, arXiv 2509.17428) checked against its mathematics: the adapter's output and gradients
against the paper's dense ``ΔW = s·P·H/(in·√out)`` in float64 (lowbit's ``s = √(in·out)``), its budget against
LoRA's count, its init against brute-force least squares on the chosen support and against the zero init on every
layer of the 2-bit tiny model; save/load, merge, registration and the recipes."""

import copy

import pytest
import torch
from tiny_models import random_llama
from torch import nn

from lowbit.adapters import (
    AdapterConfig,
    LoRALinear,
    QWHALinear,
    apply_adapters,
    expected_trainable,
    load_adapter,
    qwha_init_spectrum,
    save_adapter,
    set_adapter_weights,
)
from lowbit.adapters.hadamard import hadamard_matrix
from lowbit.adapters.linalg import DampOptions
from lowbit.adapters.merge import merge_to_float
from lowbit.adapters.model import adapter_modules, count_parameters
from lowbit.adapters.qwha import random_positions
from lowbit.adapters.qwha_init import allocate_budget
from lowbit.adapters.registry import ADAPTERS, INITS, register_init, scoped_registrations
from lowbit.quant import QuantConfig, QuantLinear, quantize_model, rtn_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

def _dense_delta(positions, coefficients, inp, out):
    """The paper's ``ΔW = s·P·H/(in·√out)`` in float64 with lowbit's fixed ``s = √(in·out)``."""
    P = torch.zeros(out, inp, dtype=torch.float64)
    P[positions[0], positions[1]] = coefficients.double()
    s = (inp * out) ** 0.5
    return s * P @ hadamard_matrix(inp) / (inp * out**0.5)


def _random_adapter(inp, out, rank=2, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(inp, out)
    m = QWHALinear(base, rank)
    with torch.no_grad():
        m.coefficients.normal_()
    return base, m


@pytest.mark.parametrize("inp,out", [(64, 48), (96, 40), (768, 256)])  # 96 = 12·8, 768 = 12·64 (tiny down_proj)
def test_output_and_gradients_equal_the_dense_reference(inp, out):
    base, m = _random_adapter(inp, out)
    x = torch.randn(3, 5, inp, requires_grad=True)
    g = torch.randn(3, 5, out)
    y = m(x)
    y.backward(g)
    # float64 reference: the same loss <g, base(x) + x ΔWᵀ> through the dense formula, differentiated by autograd
    c = m.coefficients.detach().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    dW = _dense_delta(m.positions, c, inp, out)
    ref = xd @ (base.weight.double() + dW).T + base.bias.double()
    (ref * g.double()).sum().backward()
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert rel(y.detach(), ref.detach()) < 1e-6
    assert rel(x.grad, xd.grad) < 1e-6
    assert rel(m.coefficients.grad, c.grad) < 1e-6
    assert rel(m.delta_weight().detach(), dW.detach()) < 1e-6
    assert base.weight.grad is None


def test_budget_is_loras_count_and_zero_init_is_the_base():
    base = nn.Linear(256, 768)
    for r in (1, 16, 64):
        m = QWHALinear(base, r)
        lora = LoRALinear(base, r, 16.0)
        assert m.coefficients.numel() == lora.lora_A.numel() + lora.lora_B.numel() == r * (256 + 768)
        assert [p for p in m.parameters() if p.requires_grad] == [m.coefficients]
    shapes = [(256, 256), (256, 768), (768, 256)]
    assert expected_trainable(shapes, "qwha", rank=8) == expected_trainable(shapes, "lora", rank=8)
    m = QWHALinear(base, 16)
    flat = m.positions[0] * 256 + m.positions[1]
    assert torch.unique(flat).numel() == flat.numel() and torch.equal(flat, flat.sort().values)
    x = torch.randn(4, 256)
    assert not m.coefficients.any() and torch.equal(m(x), base(x))


def test_unsupported_sizes_and_budgets_are_refused():
    with pytest.raises(ValueError, match=r"in_features 52 is not supported .*K·2\^m with K in \[12, 20"):
        QWHALinear(nn.Linear(52, 64), 2)
    QWHALinear(nn.Linear(64, 52), 2)  # only the input dimension is transformed
    with pytest.raises(ValueError, match="choose rank <= 32"):
        QWHALinear(nn.Linear(64, 64), 33)
    with pytest.raises(ValueError, match="choose one of"):
        AdapterConfig(adapter="qwha", init="cloq")
    m = QWHALinear(nn.Linear(64, 48), 1)
    pos = m.positions.clone()
    pos[:, 1] = pos[:, 0]
    with pytest.raises(ValueError, match="repeat"):
        m.set_spectrum(pos, torch.zeros(112))
    with pytest.raises(ValueError, match="outside"):
        m.set_spectrum(m.positions + 64, torch.zeros(112))


def _problem(out=40, inp=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Q = rtn_quantize(W.float(), 2, 16).dequantize().double()
    X = torch.randn(300, inp, generator=g, dtype=torch.float64) * torch.logspace(0, -2, inp, dtype=torch.float64)
    return W, Q, X.T @ X


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_init_is_the_least_squares_optimum_on_its_support(damp):
    W, Q, H = _problem()
    E = W - Q
    positions, c = qwha_init_spectrum(W, Q, H, 2, damp=damp)
    assert positions.shape == (2, 2 * 88) and c.dtype == torch.float64
    G = H + damp * H.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    R = torch.linalg.cholesky(G).T  # RᵀR = G: the objective is ‖R (E_i − ΔW_i)ᵀ‖² per row
    U = hadamard_matrix(48) / 48**0.5
    C, g = E @ U.T, ((U @ G) * U).sum(1)  # E's coefficients; u_j G u_jᵀ
    for i in range(40):
        S = positions[1][positions[0] == i]
        brute = torch.linalg.lstsq(R @ U[S].T, R @ E[i], driver="gelsd").solution
        assert float((c[positions[0] == i] - brute).norm() / brute.norm()) <= 1e-6
        score = C[i] ** 2 * g
        others = torch.ones(48, dtype=torch.bool)
        others[S] = False
        assert score[S].min() >= score[others].max()  # the support is the k_i largest scores
    counts = torch.bincount(positions[0], minlength=40)
    assert torch.equal(counts, allocate_budget(E.norm(dim=1), 176, 48))


def test_rank_deficient_h_gives_a_finite_least_squares_answer():
    """``damp = 0`` with 2 calibration rows for 48 inputs: every row's normal equations (``k_i ≥ 4`` unknowns) are
    singular; the minimum-norm solution is used — finite, small, and the weighted error is the least possible on
    the support (what brute-force least squares reaches)."""
    W, Q, _ = _problem()
    X = torch.randn(2, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = X.T @ X
    positions, c = qwha_init_spectrum(W, Q, H, 2, damp=0.0)
    assert torch.isfinite(c).all() and c.abs().max() < 10 * (W - Q).abs().max() * 48**0.5
    E = W - Q
    U = hadamard_matrix(48) / 48**0.5
    for i in range(40):
        S = positions[1][positions[0] == i]
        brute = torch.linalg.lstsq(X @ U[S].T, X @ E[i], driver="gelsd").solution
        got, best = X @ (E[i] - c[positions[0] == i] @ U[S]), X @ (E[i] - brute @ U[S])
        assert float(got.norm()) <= float(best.norm()) * (1 + 1e-6) + 1e-9


def test_budget_allocation():
    assert allocate_budget(torch.tensor([1.0, 1, 2, 4]), 16, 10).tolist() == [2, 2, 4, 8]
    # floors [0, 0, 11] capped to 5; 7 left: 3 to each open row, the last one to the smallest (the first)
    assert allocate_budget(torch.tensor([1.0, 1, 100]), 12, 5).tolist() == [4, 3, 5]
    assert allocate_budget(torch.zeros(4), 10, 8).tolist() == [3, 3, 2, 2]
    k = allocate_budget(torch.rand(500, generator=torch.Generator().manual_seed(0)) ** 4, 20000, 48)
    assert int(k.sum()) == 20000 and int(k.max()) <= 48
    with pytest.raises(ValueError, match="does not fit"):
        allocate_budget(torch.ones(3), 31, 10)


def test_init_beats_zero_on_every_layer_of_the_2bit_tiny_model():
    """Every linear of the embedded tiny model, 2-bit: ``tr((E − ΔW) H (E − ΔW)ᵀ) < tr(E H Eᵀ)`` with the
    undamped ``H`` of its calibration inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.tiny import calibration_ids, tiny_model_dir

    seen = []

    def probe(wrapper, W, Q, H, cfg, options):
        INITS["qwha"].fn(wrapper, W, Q, H, cfg, options)
        seen.append((W - Q, H, wrapper.delta_weight().detach()))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    ids = calibration_ids(AutoTokenizer.from_pretrained(tiny_model_dir()), nsamples=8, seqlen=128)
    with scoped_registrations():
        register_init("qwha-probe", adapters=("qwha",), needs_calibration=True, needs_float_weights=True,
                      options=DampOptions)(probe)
        cfg = AdapterConfig(adapter="qwha", init="qwha-probe", rank=16)
        apply_adapters(model, cfg, calibration=ids, quant=QuantConfig(method="rtn", bits=2, group_size=64),
                       progress=False)
    assert len(seen) == 4 * 7
    for E, H, D in seen:
        E, H, D = E.double(), H.double(), D.double()
        assert ((E - D) @ H * (E - D)).sum() < 0.9 * (E @ H * E).sum()


@pytest.fixture(scope="module")
def fp_model():
    return random_llama(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=320, seed=0)


QUANT = QuantConfig(method="rtn", bits=2, group_size=32)


def test_save_load_round_trip_and_merge(fp_model, tmp_path):
    m = copy.deepcopy(fp_model)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    cfg = AdapterConfig(adapter="qwha", init="qwha", rank=4)
    rep = apply_adapters(m, cfg, calibration=ids, quant=QUANT, progress=False)
    mods = adapter_modules(m)
    per_layer = 4 * (4 * (64 + 64) + 3 * (64 + 128))  # LoRA's r(in + out) at r = 4 on q, k, v, o, gate, up, down
    assert rep["trainable"] == count_parameters(m)["trainable"] == 2 * per_layer
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    save_adapter(m, tmp_path / "ad")
    fresh = copy.deepcopy(fp_model)
    quantize_model(fresh, QUANT, progress=False)
    load_adapter(fresh, tmp_path / "ad")
    for name, w in adapter_modules(fresh).items():
        assert torch.equal(w.positions, mods[name].positions)
        assert torch.equal(w.coefficients, mods[name].coefficients)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, ref)
    # resuming copies both the coefficients and their positions into the attached adapters
    for w in adapter_modules(fresh).values():
        n = w.coefficients.numel()
        w.set_spectrum(random_positions(w.out_features, w.in_features, n, seed=1), torch.zeros(n))
    set_adapter_weights(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, ref)
        merge_to_float(fresh)  # delta_weight folded into float weights computes the same logits
        assert float((fresh(input_ids=ids).logits - ref).abs().max() / ref.abs().max()) < 1e-5


def test_merge_equals_the_forward_difference():
    base, m = _random_adapter(96, 40)
    x = torch.randn(6, 96)
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(y - base(x), x @ m.delta_weight().T, atol=1e-5)
        W0 = base.weight.clone()
        m.merge()
        assert torch.allclose(m(x), y, atol=1e-5)
        m.unmerge()
        assert torch.allclose(base.weight, W0, atol=1e-6)
    q = QWHALinear(QuantLinear.from_quantized(rtn_quantize(torch.randn(40, 96), 4, 32)), 2)
    with pytest.raises(TypeError, match="quantized"):
        q.merge()


def test_registration_and_recipes():
    from lowbit.recipes.config import load_recipe

    assert ADAPTERS["qwha"] is QWHALinear
    init = INITS["qwha"]
    assert init.supports("qwha") and not init.supports("lora")
    assert init.needs_calibration and init.needs_float_weights and init.options is DampOptions
    for bits in (2, 4):
        cfg = load_recipe(f"tiny-qwha-{bits}bit")
        assert (cfg.adapter.adapter, cfg.adapter.init, cfg.quant.method, cfg.quant.bits) == \
            ("qwha", "qwha", "magr-gptq", bits)
        assert cfg.train == load_recipe(f"tiny-cloq-{bits}bit").train
