"""Bad input to the recipe drivers fails loudly and early, never by a silent fallback: a missing training file,
a recipe path or name that does not exist, an empty or broken recipe YAML, an architecture lowbit cannot handle,
``--resume`` without a checkpoint. Each error names the value and the fix, and comes before any model is loaded
(the model loaders are patched to fail if called); ``run.json`` records the training set and the base."""

import json
import shutil
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.data import load_gsm8k_jsonl
from lowbit.recipes.config import CONFIG_DIR, dump_recipe, load_recipe

# Registers a test's expected errors for docs/BAD_INPUTS.md (tests/reliability/conftest.py).
bad_input = pytest.mark.bad_input

TRAIN_FAST = ["train.max_steps=2", "train.batch_size=4", "train.logging_steps=1", "train.warmup_ratio=0.0",
              "train.threads=2", "eval=null"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    import lowbit.recipes.finetune as ft

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(ft, "build_model", refuse)


def _cli_error(argv: list[str]) -> str:
    """Run the CLI, expect the clean failure (``error: ...``, exit status 1, one line, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def _stub_model_dir(tmp_path: Path, model_type: str = "llama") -> Path:
    """A model directory with the tiny model's config and tokenizer but no weights."""
    from lowbit.models.tiny import tiny_model_dir

    d = tmp_path / f"stub-{model_type}"
    d.mkdir()
    for f in tiny_model_dir().iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, d / f.name)
    return d


# ------------------------------------------------------------------------------------------ 1. training data
@bad_input("llama2-7b recipe without math_10k.json (model {model})")
@pytest.mark.parametrize("model", ["/nonexistent/llama-2-7b", "stub"])
def test_llama2_recipe_without_math10k_stops_before_the_model(tmp_path, monkeypatch, no_model_loading, model):
    """The acceptance case: ``data.path: math_10k.json`` is absent -> an error naming the file and the explicit
    way to the substitute, before the model (or even its config) is touched; nothing is written."""
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    for rel in ("gsm8k_openai/train.jsonl", "mawps/trainset.json"):  # what the old fallback would have read
        (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / rel).write_text("")
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(data_dir))
    name = model if model.startswith("/") else str(_stub_model_dir(tmp_path))
    msg = _cli_error(["finetune", "llama2-7b-diablo-2bit", f"model.name={name}", "output_dir=run"])
    assert "math_10k.json" in msg and str(tmp_path / "math_10k.json") in msg
    assert "data.source=gsm8k-mawps data.path=null" in msg
    assert not (tmp_path / "run").exists()


@bad_input("training files missing from the data directory; a data.source that is neither a set nor a file")
def test_math10k_without_path_needs_the_file_in_the_data_dir(tmp_path, monkeypatch):
    from lowbit.recipes.config import DataConfig
    from lowbit.recipes.training_data import training_files

    (tmp_path / "gsm8k_openai").mkdir()
    (tmp_path / "gsm8k_openai" / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"ft-training_set/math_10k\.json not found.*data.source=gsm8k-mawps"):
        training_files(DataConfig(source="math10k", data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"substitute training set 'gsm8k-mawps' reads .*mawps/trainset\.json"):
        training_files(DataConfig(source="gsm8k-mawps", data_dir=str(tmp_path)))
    (tmp_path / "mawps").mkdir()
    (tmp_path / "mawps" / "trainset.json").write_text("[]")
    assert [p.name for p in training_files(DataConfig(source="gsm8k-mawps", data_dir=str(tmp_path)))] == [
        "train.jsonl", "trainset.json"]
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="neither a named training set"):
        training_files(DataConfig(source=str(tmp_path / "nope.json")))


@bad_input("a binary calibration file / training file")
def test_binary_calibration_and_training_files_are_named(tmp_path, no_model_loading):
    """Not UTF-8 (here: binary bytes in a .txt/.json): the error names the file, the byte and its offset, and what
    the file must be, instead of Python's bare "'utf-8' codec can't decode byte 0xd1"."""
    binary = b"calibration text\n\n\xd1\x00\x07\x00 more"
    (tmp_path / "calib.txt").write_bytes(binary)
    (tmp_path / "train.json").write_bytes(b"[" + binary)
    msg = _cli_error(["quantize", "--model", "tiny", "--calib", str(tmp_path / "calib.txt"), "--method", "gptq",
                      "--bits", "4", "--out", str(tmp_path / "q")])
    assert f"calibration source {tmp_path / 'calib.txt'} is binary data, not text: byte 0xd1 at offset 18" in msg
    assert "calibration files are UTF-8 text: .txt" in msg and ".json/.jsonl" in msg and not (tmp_path / "q").exists()
    msg = _cli_error(["finetune", "tiny-lora-fp", f"data.source={tmp_path / 'train.json'}", f"output_dir={tmp_path}/r"])
    assert f"data file {tmp_path / 'train.json'} is binary data, not text: byte 0xd1 at offset 19" in msg
    msg = _cli_error(["finetune", "tiny-gptq-lora-2bit", f"calibration.sources=[{tmp_path / 'calib.txt'}]",
                      f"output_dir={tmp_path}/r2"])  # read before the model loads (no_model_loading)
    assert f"calibration source {tmp_path / 'calib.txt'} is binary data" in msg
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "Caf\u00e9?"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"GSM8K file .*latin1.jsonl is not UTF-8 text: byte 0xe9 at offset 17"):
        load_gsm8k_jsonl(tmp_path / "latin1.jsonl")


@bad_input("data.path set where data.source would ignore it")
def test_data_path_is_refused_where_it_would_be_ignored():
    with pytest.raises(ValueError, match=r"data.path \('math_10k.json'\) is read only with data.source=math10k"):
        load_recipe("tiny-lora-fp", ["data.path=math_10k.json"])
    with pytest.raises(ValueError, match="data.path"):
        load_recipe("llama2-7b-lora-fp", ["data.source=gsm8k-mawps"])
    assert load_recipe("llama2-7b-lora-fp", ["data.source=gsm8k-mawps", "data.path=null"]).data.path is None


def test_builtin_recipes_name_their_training_set():
    """smollm2-* train on the substitute by name; llama2-7b-* on math_10k.json, never on a stand-in."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        d = load_recipe(path).data
        if path.stem.startswith("smollm2-"):
            assert (d.source, d.path) == ("gsm8k-mawps", None), path.name
        elif path.stem.startswith("llama2-7b-"):
            assert (d.source, d.path) == ("math10k", "math_10k.json"), path.name
        else:
            assert d.source == "synthetic", path.name


def test_run_json_records_the_training_set_and_the_base(tmp_path):
    from lowbit.io import sha256_file
    from lowbit.models.tiny import tiny_model_dir
    from lowbit.recipes.finetune import finetune

    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": f"What is {i} + 1?", "input": "", "output": f"The answer is {i + 1}.",
                                  "answer": str(i + 1)} for i in range(12)]))
    cfg = load_recipe("tiny-gptq-lora-2bit", [*TRAIN_FAST, "quant.method=rtn", f"data.source={train}",
                                              f"output_dir={tmp_path / 'run'}"])
    finetune(cfg)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    ts = run["training_set"]
    assert ts["source"] == str(train) and ts["records"] == 12 and len(ts["records_sha256"]) == 64
    assert ts["files"] == [{"path": str(train.resolve()), "sha256": sha256_file(train)}]
    fp = run["base_fingerprint"]
    assert fp["model"] == "tiny" and fp["quantized"] is False and fp["model_type"] == "llama"
    assert fp["weights"] == {"model.safetensors": sha256_file(tiny_model_dir() / "model.safetensors")}
    assert fp["quantization"] == cfg.quant.to_dict()


def test_base_fingerprint_of_a_quantized_directory_hashes_once(tmp_path, monkeypatch):
    import lowbit.io
    from lowbit.recipes.loading import model_dir_fingerprint

    d = tmp_path / "q"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"packed weights")
    (d / "tokenizer.json").write_text("{}")  # not a weight file
    quant = {"method": "gptq", "bits": 2, "group_size": 64}
    (d / "quant_config.json").write_text(json.dumps({"format": "lowbit-quant", "format_version": 1,
                                                     "quantization": quant, "source": {"model": "tiny"}}))
    calls = []
    real = lowbit.io.sha256_file
    monkeypatch.setattr(lowbit.io, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    a = model_dir_fingerprint(str(d))
    assert a == model_dir_fingerprint(str(d)) and len(calls) == 1  # deterministic, hashed once
    assert a["quantized"] is True and a["quantization"] == quant and list(a["weights"]) == ["model.safetensors"]
    (d / "model.safetensors").write_bytes(b"other packed weights")
    assert model_dir_fingerprint(str(d))["weights_sha256"] != a["weights_sha256"]


@bad_input("training prompts longer than data.max_length")
def test_long_prompts_name_the_recipe_key_that_fits_them(tmp_path, no_model_loading):
    """The error counts the prompts that fill data.max_length and names the value that fits them all, as the recipe
    key a user can set (``on_long_prompt`` is not one: it is for API callers)."""
    msg = _cli_error(["finetune", "tiny-lora-fp", "data.max_length=150", "data.num_examples=64",
                      f"output_dir={tmp_path / 'run'}"])
    need = int(msg.split("data.max_length=")[1].split(")")[0])
    assert f"of 64 records have a prompt of >= 150 tokens (the longest {need - 1})" in msg and need > 150
    assert "on_long_prompt='skip'" in msg and "API callers" in msg and not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- 2. training settings
@bad_input("recipe override {override}")
@pytest.mark.parametrize("override, want", [
    ("train.max_steps=-5", r"train.max_steps must be a positive number of optimizer steps, or -1 to train for "
                           r"train.epochs \(1\) epochs; got -5"),
    ("train.max_steps=0", r"train.max_steps .* or -1 .*got 0"),
    ("train.batch_size=0", r"train.batch_size must be positive, got 0"),
    ("train.lr=-0.001", r"train.lr must be positive, got -0.001"),
    ("train.save_steps=0", r"train.save_steps must be positive"),
    ("train.warmup_steps=-1", r"train.warmup_steps must be >= 0"),
    ("train.threads=0", r"train.threads must be a positive number"),
    ("adapter.alpha=0", r"alpha must be a positive number, got 0")])
def test_nonsense_training_numbers_are_refused_before_the_model(tmp_path, no_model_loading, override, want):
    """A value the Trainer would reinterpret (max_steps -5 means "train for epochs") or fail on only after the
    quantization is refused when the recipe is read."""
    with pytest.raises(ValueError, match=want):
        load_recipe("tiny-diablo-2bit", [override])
    msg = _cli_error(["finetune", "tiny-diablo-2bit", override, f"output_dir={tmp_path / 'run'}"])
    assert override.split("=")[1] in msg and not (tmp_path / "run").exists()
    assert load_recipe("tiny-diablo-2bit", ["train.max_steps=-1", "train.epochs=1"]).train.max_steps == -1


# ---------------------------------------------------------------------------------------------- 3. recipes
@bad_input("a recipe path that does not exist")
def test_recipe_path_never_falls_back_to_the_builtin_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("tiny-diablo-2bit.yaml", "configs/tiny-diablo-2bit.yaml", "./tiny-diablo-2bit.yml"):
        with pytest.raises(FileNotFoundError, match=r"recipe file .* not found.*named without a path: tiny-diablo"):
            load_recipe(given)
    msg = _cli_error(["finetune", "configs/tiny-diablo-2bit.yaml"])
    assert "configs/tiny-diablo-2bit.yaml not found" in msg


@bad_input("an unknown built-in recipe name / experiment spec name")
def test_recipe_name_is_never_a_file_and_unknown_names_list_the_builtins(tmp_path, monkeypatch):
    """The closest names first, then the built-in ones grouped by prefix: one short line, not 48 names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myrecipe").write_text("method: mine\n")  # a file without extension is not a name
    with pytest.raises(FileNotFoundError, match=r"no built-in recipe named 'myrecipe' \(built-in: .*\./myrecipe\.yaml"):
        load_recipe("myrecipe")
    msg = _cli_error(["finetune", "tiny-diablo-2bt"])
    assert msg.startswith("error: no built-in recipe named 'tiny-diablo-2bt'; did you mean 'tiny-diablo-2bit', ")
    counts = {g: len(list(CONFIG_DIR.glob(f"{g}-*.yaml"))) for g in ("llama2-7b", "smollm2", "tiny")}
    groups = ", ".join(f"{n} {g}-*" for g, n in counts.items())
    assert groups in msg and "smollm2-lora-fp" not in msg and len(msg) < 400
    assert load_recipe("./myrecipe").method == "mine"  # as a path it is a file
    msg = _cli_error(["experiment", "stdy"])
    assert "no built-in experiment spec named 'stdy'; did you mean 'study'? (built-in: demo, demo-quick" in msg


@bad_input("recipe YAML {text!r}")
@pytest.mark.parametrize("text, want", [
    ("", r"is empty"), ("# only a comment\n", r"is empty"), ("- a\n- b\n", r"must be a YAML mapping.*got a list"),
    ("tiny\n", r"must be a YAML mapping.*got a str"),
    ("method: x\ntrain:\n  lr: [1, 2\n  epochs: 1\n", r"YAML syntax error at line \d+, column \d+"),
    ("method: x\n\tbad: tab\n", r"YAML syntax error at line 2")])
def test_empty_non_mapping_and_broken_yaml_are_errors(tmp_path, text, want):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=want) as e:
        load_recipe(path)
    assert str(path) in str(e.value)
    msg = _cli_error(["finetune", str(path)])
    assert str(path) in msg


@bad_input("an override whose value is not YAML")
def test_override_that_is_not_yaml_is_a_value_error():
    with pytest.raises(ValueError, match=r"override 'train.lr=\[1': the value is not valid YAML \(expected"):
        load_recipe("tiny-lora-fp", ["train.lr=[1"])


# ------------------------------------------------------------------------------------------ model paths
@pytest.fixture
def no_hub(monkeypatch):
    """Any download from the model hub fails the test (recorded too: transformers turns the error into its own)."""
    import huggingface_hub
    import huggingface_hub.file_download
    import transformers.utils.hub

    asked = []

    def refuse(*a, **k):
        asked.append(a[:1])
        raise AssertionError(f"the model hub was asked for {a[:1]}")

    for mod in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download", "get_hf_file_metadata"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)
    yield
    assert asked == [], f"the model hub was asked for {asked}"


@bad_input("a mistyped local --model / model.name path")
def test_a_mistyped_model_path_is_reported_without_asking_the_hub(tmp_path, monkeypatch, no_model_loading, no_hub):
    """``runs/tyr`` beside ``runs/`` (holding ``try``), ``./models/x`` and ``runs/tyr/`` are paths, never hub ids:
    the error names the closest existing entries, at once; ``org/name`` that exists nowhere stays a hub id."""
    from lowbit.recipes.loading import local_only, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "try").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no such model directory: runs/tyr \(runs/ has no 'tyr'; closest: "
                                                r"runs/try\).*not looked up on the hub: runs/ is a local directory"):
        resolve_model("runs/tyr")
    msg = _cli_error(["finetune", "tiny-lora-fp", "model.name=runs/tyr/", "output_dir=run"])
    assert "no such model directory: runs/tyr/" in msg and "runs/try" in msg and not (tmp_path / "run").exists()
    msg = _cli_error(["quantize", "--model", "./models/llama-2-7b", "--method", "rtn", "--bits", "4", "--out", "q"])
    assert "no such model directory: ./models/llama-2-7b (the current directory has no 'models'" in msg
    assert "no such model directory: runs/tyr" in _cli_error(["params", "--model", "runs/tyr"])
    assert resolve_model("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", False)
    # a local directory is read with local_files_only: transformers never asks the hub about it
    assert local_only(str(tmp_path)) == {"local_files_only": True} and local_only("meta-llama/Llama-2-7b-hf") == {}


# ------------------------------------------------------------------------------------------ 4. architecture
def _gpt2_config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                               "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 64}))
    return d


@bad_input("`lowbit quantize` of a GPT-2 model")
def test_quantize_refuses_an_unsupported_architecture_before_loading(tmp_path, no_model_loading):
    d = _gpt2_config_dir(tmp_path)
    msg = _cli_error(["quantize", "--model", str(d), "--method", "rtn", "--bits", "4", "--out", str(tmp_path / "q")])
    assert "'gpt2'" in msg and "GPT2LMHeadModel" in msg and "supported model types: ['llama'" in msg
    assert not (tmp_path / "q").exists()


@bad_input("`lowbit finetune` on a GPT-2 model")
def test_finetune_refuses_an_unsupported_architecture_before_loading(tmp_path, no_model_loading):
    d = _gpt2_config_dir(tmp_path)
    for recipe in ("tiny-lora-fp", "tiny-cloq-2bit"):  # adapters need the architecture table too
        msg = _cli_error(["finetune", recipe, f"model.name={d}", f"output_dir={tmp_path / recipe}"])
        assert "'gpt2'" in msg and "supported model types" in msg
        assert not (tmp_path / recipe).exists()


# ---------------------------------------------------------------------------------------------- adapters
@bad_input("`lowbit evaluate --adapter` whose JSON was edited / trained on another base")
def test_adapter_errors_give_the_advice_that_fits_the_damage(tmp_path):
    """An edited adapter file (its seal or checksum disagrees) is the adapter's own damage: restore or re-train it,
    never "pass the base it was trained on"; an adapter of another base gets that advice."""
    import torch

    from lowbit.adapters import AdapterConfig, apply_adapters, base_fingerprint, save_adapter
    from lowbit.recipes.loading import load_base

    model = load_base("tiny")[0]
    apply_adapters(model, AdapterConfig(rank=2, targets=["q_proj"]), progress=False)
    fp = base_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    save_adapter(model, tmp_path / "other-base", fingerprint=base_fingerprint(model))  # trained on another base
    save_adapter(model, tmp_path / "edited", fingerprint=fp)
    meta = json.loads((tmp_path / "edited" / "lowbit_adapter.json").read_text())
    meta["adapter"]["rank"] = 4  # a hand edit: still valid JSON, the seal disagrees
    (tmp_path / "edited" / "lowbit_adapter.json").write_text(json.dumps(meta))
    ev = ["evaluate", "--model", "tiny", "--datasets", "synthetic-mawps", "--limit", "1", "--out", str(tmp_path / "o")]
    msg = _cli_error([*ev, "--adapter", str(tmp_path / "edited")])
    assert "checksum mismatch" in msg and "lowbit_adapter.json" in msg and "trained on" not in msg
    assert "the adapter's files were changed after it was saved" in msg and "restore them from a copy" in msg
    msg = _cli_error([*ev, "--adapter", str(tmp_path / "other-base")])
    assert "was trained on a different base" in msg and "Pass as --model the base model" in msg
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ 7. resume
def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()}


@bad_input("`--resume` without a complete checkpoint, or without a run")
def test_resume_without_a_complete_checkpoint_changes_nothing(tmp_path, no_model_loading):
    run = tmp_path / "run"
    overrides = [*TRAIN_FAST, f"output_dir={run}"]
    cfg = load_recipe("tiny-lora-fp", overrides)
    (run / "checkpoint-4" / "adapter").mkdir(parents=True)  # killed mid-save: no COMPLETE marker
    (run / "checkpoint-4" / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    (run / "config.yaml").write_text(dump_recipe(cfg))
    (run / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n')
    before = _snapshot(run)
    msg = _cli_error(["finetune", "tiny-lora-fp", *overrides, "--resume"])
    assert f"--resume: output_dir {run} holds no complete checkpoint" in msg and "nothing was changed" in msg
    assert _snapshot(run) == before
    missing = tmp_path / "never-ran"
    msg = _cli_error(["finetune", "tiny-lora-fp", f"output_dir={missing}", "--resume"])
    assert "does not exist" in msg and not missing.exists()
