"""GPTQ checkpoint export (lowbit.quant.export) against the layout and against GPTQModel itself.

- Round trip without GPTQModel: the exported ``qweight``/``qzeros``/``scales``/``g_idx`` are unpacked with
  :func:`lowbit.quant.packing.unpack` and ``scale * (q - z)`` (``z = stored + 1`` in v1) must equal
  ``QuantLinear.dequantize()`` bit for bit, for 2/3/4/8 bits, symmetric and asymmetric, with and without an
  act-order ``g_idx``; the remaining tensors, configs, tied embeddings and the atomic write are checked too.
- Refusals: v1 with a zero point of 0, NormalFloat codebooks, mixed bit widths, a non-empty output directory.
- GPTQModel 7.6 (TORCH backend, CPU, fp16): its dequantised weights equal ``QuantLinear.dequantize(float16)``
  exactly, and its logits match the lowbit model's within fp16 rounding.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lowbit.quant import QuantizedWeight, QuantLinear, gptq_quantize, nf_quantize, rtn_quantize  # noqa: E402
from lowbit.quant.export import export_gptq  # noqa: E402
from lowbit.quant.packing import unpack  # noqa: E402
from lowbit.quant.qweight import params_from_range, quantize_codes  # noqa: E402

LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
           ("mlp", ("gate_proj", "up_proj", "down_proj")))
VOCAB = 128
# Acceptance bound for GPTQModel (fp16 activations) vs lowbit (float32 on fp16-rounded parameters).
LOGIT_RTOL = 1e-2


# ---------------------------------------------------------------- helpers


def tiny_llama(tie: bool = False, bias: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=tie, attention_bias=bias,
                      mlp_bias=bias, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def rtn(bits: int, sym: bool):
    return lambda W: rtn_quantize(W, bits, group_size=32, sym=sym)


def act_order_gptq(bits: int, sym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def q(W: torch.Tensor):
        # Columns of very different scale so that act-order really permutes the groups.
        X = torch.randn(256, W.shape[1], generator=gen) * (0.1 + 3 * torch.rand(W.shape[1], generator=gen))
        return gptq_quantize(W, X.T @ X, bits, group_size=32, sym=sym, act_order=True)

    return q


def permuted_groups(bits: int, sym: bool, seed: int = 0):
    """Min-max quantization over randomly scattered 32-column groups: an act-order ``g_idx`` built by hand
    (fast; :func:`act_order_gptq` is the real thing, used where GPTQModel checks the result)."""
    gen = torch.Generator().manual_seed(seed)

    def q(W: torch.Tensor):
        out, n = W.shape
        perm = torch.randperm(n, generator=gen)
        g_idx = torch.empty(n, dtype=torch.long)
        g_idx[perm] = torch.arange(n) // 32  # group j holds columns perm[32j : 32j + 32]
        Wg = W[:, perm].reshape(out, n // 32, 32)
        scale, zero = params_from_range(Wg.amin(-1), Wg.amax(-1), bits, sym)
        codes = quantize_codes(W, scale[:, g_idx], zero[:, g_idx], bits)
        return QuantizedWeight(codes=codes, scales=scale, zeros=zero, bits=bits, group_size=32, g_idx=g_idx,
                               sym=sym)

    return q


def quantize(model, quantizer) -> dict[str, QuantLinear]:
    """Replace every decoder linear by ``QuantLinear.from_quantized(quantizer(W))``; returns them by name."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for parent_name, names in LINEARS:
            parent = getattr(layer, parent_name)
            for n in names:
                lin = getattr(parent, n)
                bias = lin.bias.data if lin.bias is not None else None
                q = QuantLinear.from_quantized(quantizer(lin.weight.data), bias=bias)
                setattr(parent, n, q)
                out[f"model.layers.{i}.{parent_name}.{n}"] = q
    return out


def quant_model(bits: int = 4, sym: bool = True, act_order: bool = False, tie: bool = False,
                bias: bool = False, lm_head: bool = False, real_gptq: bool = True):
    model = tiny_llama(tie=tie, bias=bias)
    if act_order:
        quantizer = act_order_gptq(bits, sym) if real_gptq else permuted_groups(bits, sym)
    else:
        quantizer = rtn(bits, sym)
    qmods = quantize(model, quantizer)
    if lm_head:
        head = QuantLinear.from_quantized(rtn(bits, sym)(model.lm_head.weight.data))
        model.lm_head = qmods["lm_head"] = head
    return model, qmods


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def read_export(out: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    return tensors, cfg, json.loads((out / "quantize_config.json").read_text())


def dequant_from_export(t: dict[str, torch.Tensor], name: str, q: QuantLinear, fmt: str) -> torch.Tensor:
    """``(out, in)`` float32 weight rebuilt from the GPTQ tensors of module ``name``."""
    bits, n_in, n_out = q.bits, q.in_features, q.out_features
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    n_groups = q.scales.shape[1]
    assert qweight.dtype == torch.int32 and qweight.shape == (-(-n_in // 32) * bits, n_out)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, -(-n_out // 32) * bits)
    assert scales.dtype == torch.float16 and scales.shape == (n_groups, n_out)
    assert g_idx.dtype == torch.int32 and g_idx.shape == (n_in,)
    codes = unpack(qweight, bits, n_in, dim=0).float()  # (in, out)
    zeros = unpack(qzeros, bits, n_out, dim=1).float() + (1 if fmt == "gptq" else 0)  # (G, out)
    gi = g_idx.long()
    return (scales.float()[gi] * (codes - zeros[gi])).t()


# ---------------------------------------------------------------- (a) round trip, no GPTQModel


@pytest.mark.parametrize("act_order", [False, True], ids=["rtn", "actorder"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_exact(tmp_path, bits, sym, act_order):
    model, qmods = quant_model(bits, sym, act_order=act_order, bias=True, real_gptq=False)
    g_idx_present = all(q.g_idx is not None for q in qmods.values())
    assert g_idx_present == act_order
    formats = ["gptq", "gptq_v2", "auto"]
    for fmt in formats:
        out = export_gptq(model, tmp_path / fmt, checkpoint_format=fmt)
        t, cfg, qcfg = read_export(out)
        resolved = qcfg["checkpoint_format"]
        assert resolved == (fmt if fmt != "auto" else ("gptq" if sym else "gptq_v2"))
        for name, q in qmods.items():
            W = dequant_from_export(t, name, q, resolved)
            assert torch.equal(W, q.dequantize()), (fmt, name)
            assert torch.equal(t[f"{name}.bias"], q.bias.half())
            if not act_order:
                assert torch.equal(t[f"{name}.g_idx"].long(), torch.arange(q.in_features) // 32)
            else:
                assert torch.equal(t[f"{name}.g_idx"], q.g_idx)
        # Everything else is there, in fp16, under its state-dict name; no lowbit buffers leak out.
        sd = model.state_dict()
        others = {k for k in sd if k.rpartition(".")[0] not in qmods}
        gptq = {f"{n}.{k}" for n in qmods for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        assert set(t) == others | gptq
        for k in others:
            assert t[k].dtype == torch.float16 and torch.equal(t[k], sd[k].half()), k
        expect = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": act_order, "sym": sym,
                  "checkpoint_format": resolved, "format": resolved, "true_sequential": True,
                  "damp_percent": 0.01, "static_groups": False, "pack_dtype": "int32", "lm_head": False}
        assert {k: qcfg[k] for k in expect} == expect
        assert cfg["quantization_config"] == qcfg
        assert cfg["model_type"] == "llama" and cfg["dtype"] == "float16"
        assert (out / "generation_config.json").is_file()


def test_stored_zero_points(tmp_path):
    """v1 stores zero - 1 and v2 the zero itself, packed along the output dimension."""
    model, qmods = quant_model(4, sym=False)
    name, q = next(iter(qmods.items()))
    for fmt, offset in (("gptq", 1), ("gptq_v2", 0)):
        t, _, _ = read_export(export_gptq(model, tmp_path / fmt, checkpoint_format=fmt))
        stored = unpack(t[f"{name}.qzeros"], 4, q.out_features, dim=1)
        assert torch.equal(stored.long(), q.zeros.t().long() - offset)


def test_per_row_group(tmp_path):
    model = tiny_llama()
    qmods = quantize(model, lambda W: rtn_quantize(W, 4, group_size=-1, sym=True))
    t, _, qcfg = read_export(export_gptq(model, tmp_path / "out"))
    assert qcfg["group_size"] == -1 and not qcfg["desc_act"]
    for name, q in qmods.items():
        assert t[f"{name}.scales"].shape == (1, q.out_features)
        assert torch.equal(t[f"{name}.g_idx"], torch.zeros(q.in_features, dtype=torch.int32))
        assert torch.equal(dequant_from_export(t, name, q, "gptq"), q.dequantize())


def test_tied_embeddings_saved_once(tmp_path):
    model, _ = quant_model(4, sym=True, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    t, cfg, _ = read_export(export_gptq(model, tmp_path / "out"))
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t
    assert cfg["tie_word_embeddings"] is True


def test_partially_quantized_model_excludes_fp_linears(tmp_path):
    model, qmods = quant_model(4, sym=True)
    lin = torch.nn.Linear(64, 64, bias=False)
    model.model.layers[1].self_attn.k_proj = lin
    t, _, qcfg = read_export(export_gptq(model, tmp_path / "out"))
    assert torch.equal(t["model.layers.1.self_attn.k_proj.weight"], lin.weight.data.half())
    assert "model.layers.1.self_attn.k_proj.qweight" not in t
    assert qcfg["dynamic"] == {r"-:^model\.layers\.1\.self_attn\.k_proj$": {}}


def test_tokenizer_and_output_dir(tmp_path):
    model, _ = quant_model(4, sym=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = export_gptq(model, empty, tokenizer=tiny_tokenizer())  # an existing empty directory is fine
    assert out == empty and (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="not an empty directory"):
        export_gptq(model, out)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    target = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        export_gptq(model, target, tokenizer=BrokenTokenizer())
    # Nothing half-written is left: neither the target nor a temporary sibling.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ---------------------------------------------------------------- (b) refusals


def test_v1_refuses_zero_point_zero(tmp_path):
    model = tiny_llama()
    # A group with no negative weight gets the asymmetric zero point 0.
    model.model.layers[0].self_attn.q_proj.weight.data[3, :32].abs_()
    qmods = quantize(model, rtn(4, sym=False))
    assert float(qmods["model.layers.0.self_attn.q_proj"].zeros.min()) == 0
    with pytest.raises(ValueError, match="gptq_v2"):
        export_gptq(model, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    _, _, qcfg = read_export(export_gptq(model, tmp_path / "auto"))
    assert qcfg["checkpoint_format"] == "gptq_v2"


def test_refuses_normalfloat(tmp_path):
    model = tiny_llama()
    quantize(model, lambda W: nf_quantize(W, 4, block_size=32))
    with pytest.raises(ValueError, match="NormalFloat"):
        export_gptq(model, tmp_path / "out")


def test_refuses_mixed_bits_and_bad_arguments(tmp_path):
    model, _ = quant_model(4, sym=True)
    lin = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = QuantLinear.from_quantized(
        rtn_quantize(lin.dequantize(), 3, group_size=32, sym=True))
    with pytest.raises(ValueError, match="mixed"):
        export_gptq(model, tmp_path / "out")
    with pytest.raises(ValueError, match="checkpoint_format"):
        export_gptq(quant_model(4)[0], tmp_path / "out", checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="no QuantLinear"):
        export_gptq(tiny_llama(), tmp_path / "out")


# ---------------------------------------------------------------- (c) GPTQModel loads it


@pytest.fixture(scope="module")
def gptqmodel_api():
    gptqmodel = pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return gptqmodel.GPTQModel, gptqmodel.BACKEND, TorchLinear


def fp16_rounded(model):
    """The lowbit model with every float tensor the export stores as fp16 rounded to fp16 (kept float32)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.bias is not None:
                m.bias.copy_(m.bias.half().float())
    return model


def load_with_gptqmodel(api, path: Path):
    GPTQModel, BACKEND, _ = api
    # TorchLinear torch.compile()s its dequantisation; inductor on CPU takes ~30 s to build, so run eagerly.
    with torch._dynamo.config.patch(disable=True):
        return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)


GPTQMODEL_CASES = {
    # id: (bits, sym, act_order, tie, bias, lm_head, checkpoint_format, expected stored format)
    "4bit-sym-v1": (4, True, False, False, False, False, "auto", "gptq"),
    "4bit-asym-v2": (4, False, False, False, False, False, "auto", "gptq_v2"),
    "3bit-sym-actorder-tied-bias-v1": (3, True, True, True, True, False, "gptq", "gptq"),
    "2bit-asym-actorder-v2": (2, False, True, False, False, False, "gptq_v2", "gptq_v2"),
    "8bit-sym-lmhead-v2": (8, True, False, False, False, True, "gptq_v2", "gptq_v2"),
}


@pytest.mark.parametrize("case", list(GPTQMODEL_CASES))
def test_gptqmodel_matches_lowbit(tmp_path, gptqmodel_api, case):
    bits, sym, act_order, tie, bias, lm_head, fmt, stored = GPTQMODEL_CASES[case]
    _, _, TorchLinear = gptqmodel_api
    model, qmods = quant_model(bits, sym, act_order=act_order, tie=tie, bias=bias, lm_head=lm_head)
    out = export_gptq(model, tmp_path / "gptq", checkpoint_format=fmt, tokenizer=tiny_tokenizer())
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["checkpoint_format"] == stored and qcfg["lm_head"] == lm_head
    loaded = load_with_gptqmodel(gptqmodel_api, out).model

    # The weights GPTQModel dequantises are exactly lowbit's (computed in the same fp16 arithmetic).
    kernels = {n: m for n, m in loaded.named_modules() if isinstance(m, TorchLinear)}
    assert set(kernels) == set(qmods)
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        for name, q in qmods.items():
            assert torch.equal(kernels[name].dequantize_weight().t(), q.dequantize(torch.float16)), name

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    fp16_rounded(model)
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        ref = model(ids).logits.float()
        got = loaded(ids).logits.float()
    rel = float((got - ref).abs().max() / ref.abs().max())
    print(f"{case}: max|logit diff| / max|logit| = {rel:.2e}")
    assert rel <= LOGIT_RTOL


def test_gptqmodel_refuses_asymmetric_v1(tmp_path, gptqmodel_api):
    """Why ``auto`` writes asymmetric models as v2: GPTQModel 7.6 rejects asymmetric v1 checkpoints unless
    their ``meta.quantizer`` names GPTQModel >= 0.9 itself (models/loader.py). If this starts failing,
    GPTQModel changed: revisit ``auto``."""
    model, qmods = quant_model(4, sym=False)
    assert min(float(q.zeros.min()) for q in qmods.values()) >= 1  # representable in v1
    out = export_gptq(model, tmp_path / "gptq", checkpoint_format="gptq", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="sym=False"):
        load_with_gptqmodel(gptqmodel_api, out)


@pytest.mark.parametrize("act_order", [False, True], ids=["rtn", "actorder"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lowbit_reads_its_gptq_export_back_exactly(tmp_path, bits, sym, act_order):
    """`load_gptq_checkpoint` (what `lowbit evaluate --model EXPORT` uses) rebuilds every QuantLinear bit for bit
    and the logits of the exported model (its float tensors as stored, fp16) exactly."""
    from lowbit.quant.gptq_import import load_gptq_checkpoint

    model, qmods = quant_model(bits, sym, act_order=act_order, bias=True, real_gptq=False)
    out = export_gptq(model, tmp_path / "gptq")
    loaded = load_gptq_checkpoint(out)
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(got) == set(qmods)
    for n, q in qmods.items():
        assert torch.equal(got[n].dequantize(), q.dequantize()), n
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    fp16_rounded(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
