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
