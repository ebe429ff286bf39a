"""write_random_llama: a sharded checkpoint transformers loads with every key, finite logits through many layers,
outliers that preserve the function, an index listing every tensor once, and one tensor in memory at a time."""

import gc
import json
import weakref

import pytest
import torch

from lowbit.models import random_llama
from lowbit.models.random_llama import LlamaShape, write_random_llama

SMALL = dict(layers=2, hidden=64, intermediate=160, heads=4, vocab=512)
SHARD_GB = 60e3 / 1e9  # 60 kB: a few tensors per shard


def _load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def _logits(path, ids):
    with torch.no_grad():
        return _load(path)[0](ids).logits


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("rl") / "m", shard_gb=SHARD_GB, progress=False, **SMALL)


def test_loads_with_every_key_and_finite_logits(small):
    from transformers import AutoTokenizer

    model, info = _load(small)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 512 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 4096 and cfg["tie_word_embeddings"] is False
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    tok = AutoTokenizer.from_pretrained(small)
    ids = tok(["12 + 7 = 19 and 3 * 4 = 12"], return_tensors="pt").input_ids
    assert int(ids.max()) < 512
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and 0.1 < float(logits.std()) < 10


def test_index_lists_every_tensor_once(small):
    from safetensors import safe_open

    index = json.loads((small / "model.safetensors.index.json").read_text())
    plan = LlamaShape(**SMALL).tensor_plan()
    assert sorted(index["weight_map"]) == sorted(n for n, _ in plan)
    shards = sorted(small.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    seen, total = [], 0
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == p.name
                t = f.get_tensor(k)
                assert t.dtype == torch.float16
                seen.append(k)
                total += t.numel() * t.element_size()
    assert sorted(seen) == sorted(index["weight_map"]) and total == index["metadata"]["total_size"]


def test_activations_stay_order_one_through_32_layers(tmp_path):
    """1/sqrt(fan_in) weights: the logits of a 32-layer model are finite and O(1)."""
    path = write_random_llama(tmp_path / "deep", **{**SMALL, "layers": 32}, progress=False)
    logits = _logits(path, torch.randint(0, 512, (1, 32)))
    assert torch.isfinite(logits).all() and 0.1 < float(logits.std()) < 10


def test_outliers_preserve_the_function(tmp_path):
    """Same seed, with and without outlier channels (a power-of-two factor): the same base weights, and float32
    logits equal to 1e-5 relative; the scaled columns really grew."""
    kw = dict(**SMALL, kv_heads=2, progress=False, seed=3)
    plain = write_random_llama(tmp_path / "plain", outlier_fraction=0.0, **kw)
    spiky = write_random_llama(tmp_path / "spiky", outlier_fraction=0.05, outlier_factor=8.0, **kw)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = _logits(plain, ids), _logits(spiky, ids)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    qa = _load(plain)[0].model.layers[1].self_attn.q_proj.weight
    qb = _load(spiky)[0].model.layers[1].self_attn.q_proj.weight
    ratio = (qb / qa)[0]
    grown = torch.nonzero(ratio != 1).flatten()
    assert len(grown) == round(0.05 * 64) and torch.equal(ratio[grown], torch.full((len(grown),), 8.0))


def test_one_tensor_in_memory_at_a_time(tmp_path, monkeypatch):
    """While a tensor is drawn, every tensor yielded before the previous one has been freed: the writer never holds
    a layer, let alone the model."""
    real = random_llama.checkpoint_tensors
    refs, most_alive = [], [0]

    def watched(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            gc.collect()  # only reference cycles could keep a tensor alive past its last use; there are none
            refs.append(weakref.ref(t))
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in refs))
            yield name, t
            del t

    monkeypatch.setattr(random_llama, "checkpoint_tensors", watched)
    write_random_llama(tmp_path / "m", **{**SMALL, "layers": 4}, shard_gb=SHARD_GB, progress=False)
    assert len(refs) == len(LlamaShape(**{**SMALL, "layers": 4}).tensor_plan())
    assert most_alive[0] <= 2  # the one just drawn and the one being written before it


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_random_llama(tmp_path / "a", **{**SMALL, "vocab": 100}, progress=False)
    with pytest.raises(ValueError, match="multiple of heads"):
        write_random_llama(tmp_path / "b", **{**SMALL, "heads": 5}, progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        write_random_llama(tmp_path / "c", **SMALL, progress=False)
    assert not list((tmp_path).glob(".a.*")) and not (tmp_path / "a").exists()  # nothing half-written left


def test_cli(tmp_path):
    out = random_llama.main(["--out", str(tmp_path / "m"), "--layers", "1", "--hidden", "64", "--intermediate", "128",
                             "--heads", "4", "--vocab", "512", "--outlier-fraction", "0"])
    assert json.loads((out / "random_llama.json").read_text())["outlier_fraction"] == 0.0
    assert not _load(out)[1]["missing_keys"]
