"""`pretrain_tiny` end to end on a minute configuration: deterministic, loadable, config validated."""

import pytest
import torch

from lowbit.recipes.pretrain_tiny import PretrainConfig, pretrain_tiny


def _cfg(**kw):
    base = dict(hidden=64, layers=1, heads=2, intermediate=128, vocab_size=448, seqlen=64, batch_size=4, steps=3,
                warmup_steps=1, corpus_docs=400, seed=0)
    return PretrainConfig(**{**base, **kw})


def test_pretrain_is_deterministic_and_loadable(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = pretrain_tiny(tmp_path / "a", _cfg(), progress=False)
    pretrain_tiny(tmp_path / "b", _cfg(), progress=False)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["loss_every_50"][0] > 0 and a["heldout_ppl"] > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert model.config.vocab_size == 448 and len(tok) <= 448


@pytest.mark.parametrize("kw,match", [({"hidden": 100}, "divisible by 64"), ({"steps": 0}, "steps")])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)
