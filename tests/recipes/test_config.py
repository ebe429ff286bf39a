import pytest

from lowbit.recipes.config import CONFIG_DIR, load_recipe


def test_every_builtin_recipe_is_valid_and_named():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    for method in ("qlora", "gptq-lora", "loftq", "apiq-bw", "cloq", "diablo", "diablo-calibrated"):
        for bits in (2, 4):
            assert f"tiny-{method}-{bits}bit" in names
            assert f"llama2-7b-{method}-{bits}bit" in names
    for n in names:
        cfg = load_recipe(CONFIG_DIR / f"{n}.yaml")
        assert cfg.method


def test_published_settings_of_the_7b_rows():
    d = load_recipe("llama2-7b-diablo-2bit")
    assert (d.adapter.adapter, d.adapter.num_blocks, d.train.lr, d.train.weight_decay) == ("diablo", 64, 7e-4, 1.0)
    assert (d.train.epochs, d.train.batch_size, d.data.max_length, d.quant.method) == (3, 16, 512, "magr-gptq")
    q = load_recipe("llama2-7b-qlora-4bit")
    assert (q.quant.method, q.adapter.rank) == ("nf", 64)


def test_overrides_and_errors():
    cfg = load_recipe("tiny-diablo-2bit", ["train.max_steps=20", "output_dir=/tmp/run", "adapter.targets=[q_proj]"])
    assert cfg.train.max_steps == 20 and cfg.output_dir == "/tmp/run" and cfg.adapter.targets == ["q_proj"]
    with pytest.raises(ValueError, match=r"train.maxsteps.*valid keys under train: \[.*max_steps"):
        load_recipe("tiny-diablo-2bit", ["train.maxsteps=3"])
    with pytest.raises(ValueError, match="unknown recipe section 'trian'"):
        load_recipe(None, ["trian.lr=1"])
    with pytest.raises(ValueError, match="not key=value"):
        load_recipe(None, ["train.lr"])
    with pytest.raises(ValueError, match="schedule"):
        load_recipe(None, ["train.schedule=cosinus"])
    with pytest.raises(FileNotFoundError, match="no built-in recipe named 'no-such-recipe'"):
        load_recipe("no-such-recipe")


def test_numbers_without_a_dot_and_bad_numbers():
    cfg = load_recipe(None, ["train.lr=3e-3", "train.epochs=2", "adapter.alpha=16"])
    assert cfg.train.lr == 3e-3 and isinstance(cfg.train.epochs, float) and cfg.adapter.alpha == 16.0
    with pytest.raises(ValueError, match="train.lr must be a number"):
        load_recipe(None, ["train.lr=fast"])


def _subset(small, big, where=""):
    """Every key of ``small`` is in ``big`` with an equal value (recursively); -> the keys that differ."""
    if isinstance(small, dict) and isinstance(big, dict):
        return [d for k, v in small.items() for d in ([f"{where}{k} missing"] if k not in big else
                                                       _subset(v, big[k], f"{where}{k}."))]
    return [] if small == big else [f"{where.rstrip('.')}: {small!r} != {big!r}"]


def test_every_recipe_round_trips_yaml_config_yaml():
    """YAML -> config -> YAML keeps every key and value written in the file, and config -> YAML -> config is the
    identity (every section is the library's own dataclass, nothing dropped or renamed)."""
    import yaml

    from lowbit.recipes.config import RecipeConfig, build_config, dump_recipe

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        cfg = load_recipe(path)
        dumped = yaml.safe_load(dump_recipe(cfg))
        assert _subset(raw, dumped) == [], path.name
        assert build_config(RecipeConfig, dumped) == cfg, path.name
        assert dump_recipe(build_config(RecipeConfig, dumped)) == dump_recipe(cfg), path.name


def test_every_quantization_setting_is_reachable_and_null_sections():
    from lowbit.quant import QuantConfig

    cfg = load_recipe("tiny-cloq-2bit", ["quant.options.magr_iters=50", "quant.options.static_groups=true",
                                         "quant.targets=[q_proj]", "quant.options.block_size=64",
                                         "quant.options.magr_alpha=1e-3"])
    assert isinstance(cfg.quant, QuantConfig)
    o = cfg.quant.options
    assert (o.magr_iters, o.static_groups, cfg.quant.targets, o.block_size, o.magr_alpha) == \
        (50, True, ["q_proj"], 64, 1e-3)
    fp = load_recipe("tiny-lora-fp")
    assert fp.quant is None and load_recipe("tiny-lora-fp", ["eval=null"]).eval is None


def test_method_and_init_options_from_a_recipe():
    cfg = load_recipe("tiny-apiq-bw-2bit", ["adapter.init_options.apiq_lr_clip=1e-2"])
    o = cfg.adapter.init_options
    assert (o.apiq_epochs, o.apiq_lr_clip, o.apiq_lr_lora) == (5, 1e-2, 5e-4)  # the recipe's 5, the default lr
    assert load_recipe("smollm2-cloq-2bit").quant.options.magr_iters == 50
    assert load_recipe("tiny-cloq-2bit", ["adapter.init_options.damp=0"]).adapter.init_options.damp == 0.0
    with pytest.raises(ValueError, match="option 'magr_iters' belongs to method 'magr-gptq' / 'magr-rtn', not to "
                                         "method 'gptq'"):
        load_recipe("tiny-cloq-2bit", ["quant.method=gptq", "quant.options.magr_iters=10"])
    with pytest.raises(ValueError, match="option 'damp' belongs to init 'calibrated' / 'cloq' / 'qwha', not to init "
                                         "'loftq'"):
        load_recipe("tiny-loftq-2bit", ["adapter.init_options.damp=0.1"])


@pytest.mark.parametrize("override, moved", [
    ("quant.magr_iters=10", "quant.magr_iters moved to quant.options.magr_iters"),
    ("quant.act_order=false", "quant.act_order moved to quant.options.act_order"),
    ("adapter.apiq_epochs=1", "adapter.apiq_epochs moved to adapter.init_options.apiq_epochs"),
    ("adapter.loftq_iters=1", "adapter.loftq_iters moved to adapter.init_options.loftq_iters"),
    ("adapter.damp=0.1", "adapter.damp moved to adapter.init_options.damp")])
def test_an_old_key_is_refused_naming_the_new_one(override, moved, tmp_path):
    with pytest.raises(ValueError, match=moved):
        load_recipe("tiny-cloq-2bit", [override])
    # the same key in a recipe file
    section, rest = override.split(".", 1)
    key, value = rest.split("=")
    path = tmp_path / "old.yaml"
    path.write_text(f"quant: {{method: magr-gptq, bits: 2}}\n{section}:\n  {key}: {value}\n")
    with pytest.raises(ValueError, match=moved):
        load_recipe(path)


def test_old_flat_adapter_config_loads_into_init_options():
    from lowbit.adapters import AdapterConfig

    old = {"adapter": "lora", "init": "loftq", "rank": 8, "alpha": 16.0, "rslora": False, "num_blocks": 64,
           "dropout": 0.0, "targets": ["q_proj"], "damp": 0.01, "loftq_iters": 3, "apiq_epochs": 20,
           "apiq_lr_lora": 5e-4, "apiq_lr_clip": 5e-3, "apiq_weight_decay": 0.1}
    new = AdapterConfig(init="loftq", rank=8, targets=["q_proj"], init_options={"loftq_iters": 3})
    assert AdapterConfig.from_dict(old) == new and AdapterConfig.from_dict(new.to_dict()) == new
    assert AdapterConfig.from_dict({**old, "init": "default"}).init_options is None


@pytest.mark.parametrize("override, where", [
    ("quant.bitz=2", "quant"), ("adapter.rnak=4", "adapter"), ("eval.limt=3", "eval"), ("model.nmae=x", "model"),
    ("calibration.nsample=3", "calibration"), ("data.sorce=x", "data"), ("outptu_dir=x", None)])
def test_unknown_keys_anywhere_list_the_valid_ones(override, where):
    import dataclasses

    from lowbit.recipes import config as C

    key = override.split("=")[0]
    with pytest.raises(ValueError) as e:
        load_recipe("tiny-cloq-2bit", [override])
    msg = str(e.value)
    assert key in msg and "valid keys" in msg
    cls = {"quant": C.QuantConfig, "adapter": C.AdapterConfig, "eval": C.EvalConfig, "model": C.ModelConfig,
           "calibration": C.CalibrationConfig, "data": C.DataConfig, None: C.RecipeConfig}[where]
    for f in dataclasses.fields(cls):
        assert f"'{f.name}'" in msg


def test_eval_prompt_must_match_training_prompt():
    with pytest.raises(ValueError, match="eval.variant 'llm-adapters'.*data.prompt 'apiq'"):
        load_recipe("tiny-cloq-2bit", ["eval.variant=llm-adapters"])
