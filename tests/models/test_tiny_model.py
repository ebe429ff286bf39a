"""The embedded tiny arithmetic LLaMA: loadable with plain transformers, small, and quantization-sensitive in the
way the comparison needs (4-bit GPTQ ~lossless, 2-bit RTN badly damaged)."""

import json

import pytest
import torch
from torch import nn

from lowbit.models.tiny import TINY_MODEL_DIR, calibration_ids, heldout_text_ids, tiny_model_dir


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir()
    return AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def test_checkpoint_is_small_fp16_and_documented():
    files = list(TINY_MODEL_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20
    from safetensors import safe_open

    with safe_open(TINY_MODEL_DIR / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    info = json.loads((TINY_MODEL_DIR / "pretrain.json").read_text())
    assert "lowbit pretrain-tiny" in info["command"] and info["config"]["seed"] == 0


def test_loads_with_plain_transformers_and_dims_divisible_by_64(tiny):
    tok, model = tiny
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.in_features % 64 == 0 and m.out_features % 64 == 0, name
    ids = tok("Ann has 12 apples.", return_tensors="pt")["input_ids"]
    # Digits are single tokens.
    assert [t for t in tok.convert_ids_to_tokens(ids[0]) if t.strip("Ġ").isdigit()] in (["1", "2"], ["Ġ1", "2"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_outlier_channels_are_in_the_weights(tiny):
    """pretrain.json records the channels models.tiny.outliers scaled; they are the large columns of the weights."""
    _, model = tiny
    info = json.loads((TINY_MODEL_DIR / "pretrain.json").read_text())["outliers"]
    assert info["factor"] == 8.0 and len(info["layers"]) == len(model.model.layers)
    for layer, rec in zip(model.model.layers, info["layers"]):
        for w, cols in ((layer.self_attn.q_proj.weight, rec["qkv_in"]), (layer.mlp.down_proj.weight, rec["down_in"])):
            norms = w.norm(dim=0)
            mask = torch.zeros_like(norms, dtype=torch.bool)
            mask[cols] = True
            assert norms[mask].min() > 2 * norms[~mask].median()


def test_quantization_quality(tiny):
    """The tiny model's quantization targets: 4-bit GPTQ within 10% of full-precision held-out ppl; 2-bit RTN
    (group 64, min-max) at least triples it (measured 5.96x), while 2-bit GPTQ repairs most of that damage."""
    import copy

    from lowbit.eval.perplexity import perplexity
    from lowbit.quant import QuantConfig, quantize_model

    tok, model = tiny
    calib = calibration_ids(tok, nsamples=32, seqlen=256)
    held = heldout_text_ids(tok, n_docs=600)
    fp = perplexity(model, held, 256, max_windows=12)
    g4 = copy.deepcopy(model)
    quantize_model(g4, QuantConfig(method="gptq", bits=4, group_size=64), calib, progress=False)
    r2 = copy.deepcopy(model)
    quantize_model(r2, QuantConfig(method="rtn", bits=2, group_size=64), None, progress=False)
    g2 = copy.deepcopy(model)
    quantize_model(g2, QuantConfig(method="gptq", bits=2, group_size=64), calib, progress=False)
    p4, p2, pg2 = (perplexity(m, held, 256, max_windows=12) for m in (g4, r2, g2))
    assert p4 <= 1.10 * fp, (fp, p4)
    assert p2 >= 3.0 * fp, (fp, p2)
    assert pg2 < 0.5 * p2, (pg2, p2)
