"""Extending lowbit is one registration: a toy adapter and a toy initialisation (``tests/toy_adapter.py``, no file in
lowbit), registered here in the test, are usable from a recipe YAML with no other edit — quantize, initialise,
train, save."""

import json

import pytest
import yaml
from safetensors.torch import load_file
from toy_adapter import ToyDiag, toy_init

from lowbit.adapters.registry import register_adapter, register_init, scoped_registrations
from lowbit.recipes.config import load_recipe
from lowbit.recipes.finetune import finetune


@pytest.fixture
def toy_registered():
    with scoped_registrations():
        register_adapter("toy-scale")(ToyDiag)
        register_init("diag-error", adapters=("toy-scale",), needs_float_weights=True)(toy_init)
        yield


def test_toy_adapter_and_init_run_from_a_recipe_yaml(tmp_path, toy_registered):
    recipe = {
        "method": "toy", "output_dir": str(tmp_path / "run"), "model": {"name": "tiny"},
        "quant": {"method": "rtn", "bits": 2, "group_size": 64},
        "calibration": {"sources": ["tiny"], "nsamples": 4, "seqlen": 64},
        "adapter": {"adapter": "toy-scale", "init": "diag-error", "targets": ["q_proj", "v_proj", "o_proj"]},
        "data": {"source": "synthetic", "num_examples": 24, "max_length": 256},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "logging_steps": 1, "save_steps": 100, "threads": 2},
        "eval": None,
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = finetune(load_recipe(path))

    hidden, layers = 256, 4  # the embedded tiny model: q, v, o are 256 x 256
    assert summary["trainable_params"] == 3 * layers * hidden and summary["steps"] == 3
    state = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert len(state) == 3 * layers and all(k.endswith(".toy_diag") for k in state)
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LOWBIT_TOY"
    # The init ran: the scales start at diag(W - Q) of a 2-bit base, so they are far from zero after 3 small steps.
    assert min(t.abs().sum().item() for t in state.values()) > 0


# An initialisation with a setting of its own, as a user would add it: one new file holding its options dataclass and
# its registration. Nothing else changes (AdapterConfig included); the option is reached from a recipe override.
SCALE_INIT = '''
"""A per-linear LoRA init: A filled with `scale`, B zero (a zero delta; the option is visible in A)."""
from dataclasses import dataclass

import torch

from lowbit.adapters.registry import register_init

SEEN = []


@dataclass(frozen=True)
class ScaleOptions:
    scale: float = 0.5

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


@register_init("scaled-a", adapters=("lora",), options=ScaleOptions)
def scaled_a(wrapper, W, Q, H, cfg, options):
    SEEN.append(options)
    with torch.no_grad():
        wrapper.lora_A.fill_(options.scale)
        wrapper.lora_B.zero_()
'''


def _load_module(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_init", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_init_with_its_own_option_is_one_file_and_one_registration(tmp_path):
    from lowbit.adapters.registry import INITS

    (tmp_path / "scale_init.py").write_text(SCALE_INIT)
    run = ["train.max_steps=2", "train.batch_size=2", "data.num_examples=4", "eval=null",
           f"output_dir={tmp_path / 'run'}"]
    with scoped_registrations():
        mod = _load_module(tmp_path / "scale_init.py")
        cfg = load_recipe("tiny-lora-fp", ["adapter.init=scaled-a", "adapter.init_options.scale=0.25", *run])
        assert cfg.adapter.init_options == mod.ScaleOptions(scale=0.25)
        assert cfg.to_dict()["adapter"]["init_options"] == {"scale": 0.25}
        summary = finetune(cfg)
        assert summary["steps"] == 2
        # the init ran once per adapted linear (5 projections x 4 layers) with the recipe's option
        assert mod.SEEN == [mod.ScaleOptions(scale=0.25)] * 20
        state = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
        a = [t for k, t in state.items() if "lora_A" in k]
        assert len(a) == 20
        # A started at 0.25 everywhere; two Adam steps of lr <= 5e-3 move an entry by about 1e-2 at most
        assert all((t - 0.25).abs().max() < 0.03 for t in a)
        assert load_recipe("tiny-lora-fp", ["adapter.init=scaled-a"]).adapter.init_options.scale == 0.5
        with pytest.raises(ValueError, match=r"unknown option 'scal' for init 'scaled-a'; its options: \['scale'\]"):
            load_recipe("tiny-lora-fp", ["adapter.init=scaled-a", "adapter.init_options.scal=0.25"])
        with pytest.raises(ValueError, match="option 'loftq_iters' belongs to init 'loftq', not to init 'scaled-a'"):
            load_recipe("tiny-lora-fp", ["adapter.init=scaled-a", "adapter.init_options.loftq_iters=2"])
        with pytest.raises(ValueError, match="scale must be > 0"):
            load_recipe("tiny-lora-fp", ["adapter.init=scaled-a", "adapter.init_options.scale=0"])
    assert "scaled-a" not in INITS
