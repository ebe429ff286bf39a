"""CUDA: QuantLinear equals its CPU reference, adapters stay FP32 under bf16 autocast, and a 2-layer LLaMA goes
quantize -> CLoQ / DiaBlo init -> 10 training steps -> evaluate on the GPU. Skipped without a CUDA device
(`scripts/gpu_check.sh` runs them on the GPU machine)."""

import pytest
import torch
from tiny_models import make_tokenizer, random_llama

from lowbit.quant import QuantLinear, nf_quantize, rtn_quantize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("quant", ["rtn4-g128", "rtn2-g64", "rtn3-g64", "nf4-g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_cuda_equals_cpu(quant, dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 256, generator=g) * 0.02
    kind, group = quant.split("-g")
    qw = nf_quantize(W, 4, int(group)) if kind == "nf4" else rtn_quantize(W, int(kind[-1]), int(group))
    cpu = QuantLinear.from_quantized(qw)
    gpu = QuantLinear.from_quantized(qw).to(CUDA)
    x = torch.randn(5, 256, generator=g).to(dtype)
    xc, xg = x.clone().requires_grad_(), x.to(CUDA).requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(yg.float().cpu(), yc.float(), rtol=tol, atol=tol * float(yc.abs().max()))
    gy = torch.randn_like(yc)
    yc.backward(gy)
    yg.backward(gy.to(CUDA))
    assert torch.allclose(xg.grad.float().cpu(), xc.grad.float(), rtol=tol, atol=tol * float(xc.grad.abs().max()))
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())  # the same codes, read the same way


@pytest.mark.parametrize("quant", ["rtn4-g128", "rtn3-g64", "nf4-g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_triton_matmul_equals_dequantise_then_gemm(quant, dtype):
    """QuantLinear with the fused Triton matmuls (forward and input gradient) equals the dense path on the GPU."""
    pytest.importorskip("triton")
    from lowbit.quant.qlinear import fused_matmul

    g = torch.Generator().manual_seed(1)
    W = torch.randn(200, 320, generator=g) * 0.02
    kind, group = quant.split("-g")
    qw = nf_quantize(W, 4, int(group)) if kind == "nf4" else rtn_quantize(W, int(kind[-1]), int(group))
    layer = QuantLinear.from_quantized(qw).to(CUDA)
    x = torch.randn(3, 37, 320, generator=g).to(CUDA, dtype)
    gy = torch.randn(3, 37, 200, generator=g).to(CUDA, dtype)
    out = {}
    for fused in (False, True):
        xi = x.clone().requires_grad_()
        with fused_matmul(fused):
            y = layer(xi)
            y.backward(gy)
        out[fused] = (y.detach().float(), xi.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(out[True], out[False]):
        assert (a - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("adapter", ["lora", "diablo"])
def test_adapters_stay_fp32_under_bf16_autocast(adapter):
    from lowbit.adapters import AdapterConfig, adapter_modules, apply_adapters
    from lowbit.quant import QuantConfig, quantize_model

    model = random_llama(hidden=64, layers=2, vocab_size=320).to(CUDA)
    quantize_model(model, QuantConfig(method="rtn", bits=2, group_size=32), progress=False)
    apply_adapters(model, AdapterConfig(adapter=adapter, rank=8, num_blocks=4, targets=["q_proj", "up_proj"]),
                   progress=False)
    ids = torch.randint(0, 320, (2, 16), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    params = [p for m in adapter_modules(model).values() for p in m.trainable_parameters()]
    assert params and all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                          for p in params)


@pytest.mark.parametrize("init,adapter", [("cloq", "lora"), ("calibrated", "diablo")])
def test_quantize_init_train_evaluate_on_cuda(init, adapter):
    from lowbit.adapters import AdapterConfig, apply_adapters
    from lowbit.eval.response_loss import response_loss
    from lowbit.quant import QuantConfig

    tok = make_tokenizer()
    model = random_llama(hidden=64, layers=2, vocab_size=len(tok)).to(CUDA)
    calib = torch.randint(0, len(tok), (8, 32))
    apply_adapters(model, AdapterConfig(adapter=adapter, init=init, rank=8, num_blocks=4), calibration=calib,
                   quant=QuantConfig(method="gptq", bits=2, group_size=32), progress=False)
    assert all(p.is_cuda for p in model.parameters())
    recs = [{"instruction": "Tom has 3 apples and buys 4 more.", "input": "", "output": "3 + 4 = 7. The answer is 7.",
             "answer": "7"}] * 4
    before = response_loss(model, tok, recs)["loss"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from lowbit.data.tokenize import CausalLMCollator, tokenize_example

    batch = {k: v.to(CUDA) for k, v in CausalLMCollator(tok)([tokenize_example(r, tok, 128) for r in recs]).items()}
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert response_loss(model, tok, recs)["loss"] < before
