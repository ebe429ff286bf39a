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
    with pytest.raises(FileNotFoundError, match="built-in recipes"):
        load_recipe("no-such-recipe")


def test_numbers_without_a_dot_and_bad_numbers():
    cfg = load_recipe(None, ["train.lr=3e-3", "train.epochs=2", "adapter.alpha=16"])
    assert cfg.train.lr == 3e-3 and isinstance(cfg.train.epochs, float) and cfg.adapter.alpha == 16.0
    with pytest.raises(ValueError, match="train.lr must be a number"):
        load_recipe(None, ["train.lr=fast"])
