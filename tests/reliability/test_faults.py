"""Fault injection: every file lowbit writes and reads back (``faultlib.CATALOGUE``, also in docs/BAD_INPUTS.md) is
truncated (at a seeded length, and by its last byte), has single bytes changed (seeded positions), and is deleted;
then the command or function that reads it runs. Each case ends in an error that names the file (a ``ValueError``
or ``FileNotFoundError`` from the API, one ``error: ...`` line from the CLI), in the documented recovery (a cache
entry recomputed, a run trained again, rows regenerated) with the clean run's result, or, where the damage leaves
the content's meaning intact (JSON whitespace, a dropped final newline), in the clean run's result. Never in a
library traceback, never in a different result."""

import shutil
from pathlib import Path

import faultlib
import pytest
import torch

SEED = "lowbit-faults-1"
IDS = torch.tensor([[1, 5, 9, 14, 20, 33, 7, 2]])
QUANT_FILES = ["quant_config.json", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json"]
ADAPTER_FILES = ["adapter_model.safetensors", "adapter_config.json", "lowbit_adapter.json"]
CKPT_FILES = ["COMPLETE", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
              "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/lowbit_adapter.json"]
EVAL_FILES = ["settings.json", "synthetic-gsm8k.jsonl", "synthetic-aqua.jsonl", "synthetic-gsm8k.loss.json",
              "summary.json"]


def _outcome(fn, name: str):
    """("ok", result) or ("error", message); the error must name the file, and from the CLI be one clean line.
    Any other exception (a library traceback) fails the test."""
    try:
        return "ok", fn()
    except SystemExit as e:
        msg = e.code
        assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
    assert Path(name).name in msg, f"the error does not name {name}: {msg}"
    return "error", msg


def _note(artifact: str, name: str, fault, detail: str, outcome: str, message: str | None = None) -> None:
    faultlib.record(kind="fault", artifact=artifact, file=name, fault=fault.kind, detail=detail, outcome=outcome,
                    message=message)


def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a directory, leaving out the top-level entries matching ``skip``."""
    import fnmatch

    def ignore(folder, names):
        return [n for n in names if Path(folder) == src and any(fnmatch.fnmatch(n, s) for s in skip)]

    shutil.copytree(src, dst, ignore=ignore)
    return dst


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---------------------------------------------------------------------------------------------- the catalogue

def test_the_catalogue_lists_every_persisted_file(clean_quantize, clean_finetune, clean_evaluate, clean_demo):
    """Every file the commands leave behind has an entry (what reads it, what each fault does) in the docs."""
    roots = {"quantize": clean_quantize.out, "export": clean_quantize.export, "finetune": clean_finetune.out,
             "evaluate": clean_evaluate.out, "demo": clean_demo.out}
    unlisted = [f"{cmd}: {rel}" for cmd, root in roots.items() for rel in faultlib.persisted_files(root)
                if faultlib.entry_for(cmd, rel) is None]
    assert unlisted == []


# ---------------------------------------------------------------------------------------------- quantized model

@pytest.fixture(scope="module")
def quant_reference(clean_quantize):
    from lowbit.recipes.loading import load_model

    model, tok, _ = load_model(str(clean_quantize.out), device="cpu")
    return _logits(model), tok("Tom has 3 + 4 = 7 apples.")["input_ids"]


@pytest.mark.parametrize("name", QUANT_FILES + ["layer_errors.json", "layer_errors.md"])
def test_quantized_model(name, clean_quantize, quant_reference, tmp_path):
    from lowbit.cli import main
    from lowbit.recipes.loading import load_model

    logits, ids = quant_reference
    cli_done = set()
    for i, fault in enumerate(faultlib.faults_for(clean_quantize.out / name, SEED)):
        d = _copy(clean_quantize.out, tmp_path / f"q{i}")
        detail = fault.apply(d / name)
        kind, res = _outcome(lambda d=d: load_model(str(d), device="cpu"), name)
        if name.startswith("layer_errors"):
            assert kind == "ok", f"{name} ({detail}) is a report: loading must not read it"
        if kind == "ok":
            model, tok, _ = res
            assert torch.equal(_logits(model), logits), f"{name} {detail}: loaded, but the model differs"
            assert tok("Tom has 3 + 4 = 7 apples.")["input_ids"] == ids, f"{name} {detail}: tokenizer differs"
        _note(faultlib.QM, name, fault, detail, "unchanged" if kind == "ok" else "error", res if kind == "error"
              else None)
        if kind == "error" and fault.kind not in cli_done:  # the command too, once per kind of fault
            cli_done.add(fault.kind)
            argv = ["evaluate", "--model", str(d), "--datasets", "synthetic-gsm8k", "--limit", "1",
                    "--max-new-tokens", "2", "--out", str(tmp_path / f"ev{i}")]
            assert _outcome(lambda argv=argv: main(argv), name)[0] == "error"
            assert not (tmp_path / f"ev{i}").exists()


def test_export_config_on_a_rerun(clean_quantize, tmp_path):
    """lowbit never loads a GPTQ export; a rerun of the command that wrote it reads its quantize_config.json to
    decide whether it may replace the directory. Damaged: refused, naming the file."""
    from lowbit.quant import QuantConfig
    from lowbit.recipes.quantize import _check_export_dir

    quant = QuantConfig(method="rtn", bits=2, group_size=64)
    name = "quantize_config.json"
    for i, fault in enumerate(faultlib.faults_for(clean_quantize.export / name, SEED)):
        d = _copy(clean_quantize.export, tmp_path / f"e{i}")
        detail = fault.apply(d / name)
        kind, res = _outcome(lambda d=d: _check_export_dir(d, quant, overwrite=False), name)
        _note(faultlib.EXPORT, name, fault, detail, "unchanged" if kind == "ok" else "error",
              res if kind == "error" else None)
        _check_export_dir(d, quant, overwrite=True)  # --overwrite replaces whatever is there


# ---------------------------------------------------------------------------------------------- adapter

@pytest.fixture(scope="module")
def adapter_reference(clean_finetune):
    from lowbit.recipes.loading import load_model

    model, _, _ = load_model(str(clean_finetune.out / "base"), adapter=str(clean_finetune.out / "adapter"),
                             device="cpu")
    return _logits(model)


@pytest.mark.parametrize("name", ADAPTER_FILES)
def test_adapter(name, clean_finetune, adapter_reference, tmp_path):
    from lowbit.cli import main
    from lowbit.recipes.loading import load_model

    base = clean_finetune.out / "base"
    cli_done = set()
    for i, fault in enumerate(faultlib.faults_for(clean_finetune.out / "adapter" / name, SEED)):
        d = _copy(clean_finetune.out / "adapter", tmp_path / f"a{i}")
        detail = fault.apply(d / name)
        kind, res = _outcome(lambda d=d: load_model(str(base), adapter=str(d), device="cpu"), name)
        outcome = "error" if kind == "error" else "unchanged"
        if kind == "ok":
            assert torch.equal(_logits(res[0]), adapter_reference), f"{name} {detail}: loaded, but it differs"
            if fault.kind == "delete":  # no lowbit_adapter.json: a PEFT directory, the same adapter
                assert name == "lowbit_adapter.json"
                outcome = "recovered: loaded as a PEFT adapter (warning: its base cannot be checked)"
        _note(faultlib.ADAPTER, name, fault, detail, outcome, res if kind == "error" else None)
        if kind == "error" and fault.kind not in cli_done:
            cli_done.add(fault.kind)
            argv = ["evaluate", "--model", str(base), "--adapter", str(d), "--datasets", "synthetic-gsm8k",
                    "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / f"ev{i}")]
            assert _outcome(lambda argv=argv: main(argv), name)[0] == "error"


# ---------------------------------------------------------------------------------------------- checkpoints

def _run_copy(clean_finetune, dst: Path, skip=("base",)) -> Path:
    """A copy of the fine-tuning run whose config.yaml names the copy (as the same command there would)."""
    from lowbit.recipes.config import dump_recipe, load_recipe

    d = _copy(clean_finetune.out, dst, skip)
    cfg = load_recipe(faultlib.RECIPE, [*faultlib.FINETUNE_OVERRIDES, f"output_dir={d}"])
    (d / "config.yaml").write_text(dump_recipe(cfg))
    return d


@pytest.mark.parametrize("name", CKPT_FILES)
def test_checkpoint_on_resume(name, clean_finetune, tmp_path):
    from lowbit.cli import main
    from lowbit.recipes.trainer import check_checkpoint, complete_checkpoints, latest_checkpoint

    done = [p.name for p in complete_checkpoints(clean_finetune.out)]
    assert len(done) >= 2, done
    latest, previous = done[-1], done[-2]
    cli_done = set()
    for i, fault in enumerate(faultlib.faults_for(clean_finetune.out / latest / name, SEED)):
        d = _run_copy(clean_finetune, tmp_path / f"r{i}", skip=("base", "adapter", "*.png"))
        detail = fault.apply(d / latest / name)

        def resume_from(d=d):  # what `lowbit finetune --resume` does before loading anything
            ckpt = latest_checkpoint(d)
            check_checkpoint(ckpt)
            return ckpt.name

        kind, res = _outcome(resume_from, name)
        outcome = "error" if kind == "error" else "unchanged"
        if kind == "ok":
            if name == "COMPLETE" and fault.kind == "delete":
                assert res == previous  # an unfinished checkpoint: the previous complete one
                outcome = f"recovered: resumes from the previous complete checkpoint ({previous})"
            else:
                assert res == latest, f"{name} {detail}"
        _note(faultlib.CKPT, name, fault, detail, outcome, res if kind == "error" else None)
        if kind == "error" and fault.kind not in cli_done:
            cli_done.add(fault.kind)
            argv = [*faultlib.finetune_args(d), "--resume"]
            assert _outcome(lambda argv=argv: main(argv), name)[0] == "error"


def test_resume_without_a_checkpoint_complete_but_damaged_has_no_fallback(clean_finetune, tmp_path):
    """With every complete checkpoint damaged, the error says to start over; nothing is changed."""
    from lowbit.recipes.trainer import check_checkpoint, complete_checkpoints

    d = _run_copy(clean_finetune, tmp_path / "r", skip=("base", "adapter", "*.png"))
    for c in complete_checkpoints(d)[:-1]:
        shutil.rmtree(c)
    (ckpt,) = complete_checkpoints(d)
    faultlib.Fault("truncate", 10).apply(ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer\.pt is truncated or corrupt .*no older complete one exists: "
                                         r"start over"):
        check_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------- run files

@pytest.mark.parametrize("name", ["config.yaml", "lowbit_run.json", "log.jsonl", "run.json"])
def test_run_files(name, clean_finetune, tmp_path):
    from lowbit.recipes.compare import RUN_KEYS, load_run
    from lowbit.recipes.config import load_recipe
    from lowbit.recipes.finetune import _check_run_dir
    from lowbit.recipes.trainer import read_log

    clean_log = read_log(clean_finetune.out / "log.jsonl")
    clean = load_run(_run_copy(clean_finetune, tmp_path / "clean", skip=("base", "checkpoint-*")))
    clean_run = {k: clean[k] for k in RUN_KEYS}
    for i, fault in enumerate(faultlib.faults_for(clean_finetune.out / name, SEED)):
        d = _run_copy(clean_finetune, tmp_path / f"r{i}", skip=("base", "checkpoint-*"))
        detail = fault.apply(d / name)
        if name == "log.jsonl":  # feeds the loss plot: damaged lines are skipped, never misread
            kind, recs = _outcome(lambda d=d: read_log(d / "log.jsonl"), name)
            assert kind == "ok" and all(r in clean_log for r in recs), detail
            outcome = "unchanged" if recs == clean_log else f"recovered: {len(clean_log) - len(recs)} lines skipped"
            _note(faultlib.RUN, name, fault, detail, outcome)
            continue
        kind, res = _outcome(lambda d=d: load_run(d), name)  # `lowbit compare`
        if kind == "ok":
            got = {k: res[k] for k in RUN_KEYS}
            if fault.kind == "delete" and name == "run.json":
                # Read from the evaluated adapter's records instead: its run's run.json (here the clean run's,
                # which the copied summary names), else the adapter's own files.
                assert (got["trainable_params"], got["method"]) == (clean_run["trainable_params"],
                                                                    clean_run["method"])
            else:
                assert got == clean_run, f"{name} {detail}: read, but it differs"
        deleted = "documented: its keys are read from the adapter" if name == "run.json" else \
            "documented: its keys show as –"
        outcome = "error" if kind == "error" else (deleted if fault.kind == "delete" else "unchanged")
        _note(faultlib.RUN, name, fault, detail, outcome, res if kind == "error" else None)
        if name in ("config.yaml", "lowbit_run.json"):  # `--resume` checks the recipe before loading anything
            cfg = load_recipe(faultlib.RECIPE, [*faultlib.FINETUNE_OVERRIDES, f"output_dir={d}"])
            (d / "checkpoint-1").mkdir()
            (d / "checkpoint-1" / "COMPLETE").write_text("1\n")
            kind, res = _outcome(lambda d=d, cfg=cfg: _check_run_dir(d, cfg, resume=True), name)
            _note(faultlib.RUN, name + " (--resume)", fault, detail, "unchanged" if kind == "ok" else "error",
                  res if kind == "error" else None)


# ---------------------------------------------------------------------------------------------- evaluation

def _eval_result(d: Path) -> tuple:
    from lowbit.io import read_json

    s = read_json(d / "summary.json")
    sets = {k: (v["n"], v["correct"], v["accuracy"], v["response_loss"]["loss"]) for k, v in s["datasets"].items()}
    rows = {p.name: p.read_text() for p in sorted(d.glob("*.jsonl"))}
    return sets, rows


@pytest.mark.parametrize("name", EVAL_FILES)
def test_evaluation_files(name, clean_evaluate, tmp_path, caplog):
    from lowbit.cli import main
    from lowbit.recipes.compare import load_run

    clean = _eval_result(clean_evaluate.out)
    for i, fault in enumerate(faultlib.faults_for(clean_evaluate.out / name, SEED)):
        d = _copy(clean_evaluate.out, tmp_path / f"e{i}")
        detail = fault.apply(d / name)
        if name == "summary.json":  # `lowbit compare` reads it (`evaluate` only rewrites it: below)
            kind, res = _outcome(lambda d=d: load_run(d), name)
            _note(faultlib.EVAL, name + " (compare)", fault, detail, "unchanged" if kind == "ok" else "error",
                  res if kind == "error" else None)
        caplog.clear()
        argv = faultlib.evaluate_args(d)
        kind, res = _outcome(lambda argv=argv: main(argv), name)
        outcome = "error" if kind == "error" else "unchanged"
        if kind == "ok":
            assert _eval_result(d) == clean, f"{name} {detail}: evaluated, but the result differs"
            if "recomputing" in caplog.text or "dropping" in caplog.text or fault.kind == "delete":
                outcome = "recovered: regenerated / recomputed"
        _note(faultlib.EVAL, name, fault, detail, outcome, res if kind == "error" else None)


# ---------------------------------------------------------------------------------------------- demo cache

class _Rebuilt(Exception):
    pass


def _shared_base(base: Path):
    """The :class:`BaseSpec` a shared base of the reduced demo was built for, from its stamp."""
    from lowbit.io import read_json
    from lowbit.recipes.bases import STAMP, BaseSpec
    from lowbit.recipes.config import CalibrationConfig, QuantConfig

    s = read_json(base / STAMP)["settings"]
    return BaseSpec(s["model"], QuantConfig.from_dict(s["quant"]), CalibrationConfig(**s["calibration"]))


def test_demo_cache_entries_are_checked(clean_demo, tmp_path, monkeypatch):
    """Each step an experiment keeps whose files are damaged counts as not done and runs again: the shared base is
    rebuilt (its files fail their checksums, or its stamp is damaged), the run is trained again (its stamp or
    run.json damaged), a ledger entry is recomputed."""
    import lowbit.recipes.quantize as qz
    from lowbit.experiments.ledger import STAMP, Ledger
    from lowbit.recipes.bases import STAMP as BASE_STAMP
    from lowbit.recipes.bases import build_base
    from lowbit.recipes.bases import model_weights_sha256 as model_hash

    def rebuilt(*a, **k):
        raise _Rebuilt

    monkeypatch.setattr(qz, "run_quantize", rebuilt)
    (base,) = sorted(p for p in (clean_demo.out / "bases").iterdir() if p.is_dir())
    spec = _shared_base(base)
    assert build_base(spec, clean_demo.out / "bases")[0] == base  # clean: reused
    for name in [*QUANT_FILES, BASE_STAMP]:
        for i, fault in enumerate(faultlib.faults_for(base / name, SEED)):
            d = _copy(base, tmp_path / f"{name}-{i}" / base.name)
            detail = fault.apply(d / name)
            try:
                build_base(spec, d.parent)
                outcome = "unchanged"
            except _Rebuilt:
                outcome = "recovered: the base is rebuilt"
            if name == "model.safetensors":  # a truncated trailing newline of a JSON file is still the same JSON
                assert outcome != "unchanged", (name, fault)
            _note(faultlib.DEMO, f"bases/*/{name}", fault, detail, outcome)
    (run,) = sorted((clean_demo.out / "runs").iterdir())
    entry = Ledger(clean_demo.out, model_hash).entry(run.name)
    assert entry is not None and Ledger._trained(run, entry["key"]) is not None
    for name in (STAMP, "run.json"):
        for i, fault in enumerate(faultlib.faults_for(run / name, SEED)):
            d = _copy(run, tmp_path / f"{name}-{i}", skip=("checkpoint-*", "base"))
            detail = fault.apply(d / name)
            trained = Ledger._trained(d, entry["key"]) is not None
            assert not trained or fault.kind == "truncate"  # cutting a JSON file's final newline changes nothing
            _note(faultlib.DEMO, f"runs/*/{name}", fault, detail,
                  "unchanged" if trained else "recovered: the run is trained again")
    ledger_file = clean_demo.out / "ledger" / f"{run.name}.json"
    for i, fault in enumerate(faultlib.faults_for(ledger_file, SEED)):
        d = _copy(clean_demo.out / "ledger", tmp_path / f"ledger-{i}" / "ledger")
        detail = fault.apply(d / ledger_file.name)
        kept = Ledger(d.parent, model_hash).entry(run.name) is not None
        assert not kept or fault.kind == "truncate"
        _note(faultlib.DEMO, "ledger/*.json", fault, detail,
              "unchanged" if kept else "recovered: the entry is recomputed")


def test_damaged_demo_cache_is_rebuilt_to_the_same_results(clean_demo, tmp_path):
    """The reduced demo run again over a copy with a damaged base, perplexity cache, run stamp and ledger entry: it
    rebuilds those steps, and its results (perplexities, accuracies, adapter) equal the clean run's."""
    from safetensors.torch import load_file

    from lowbit.experiments.ledger import STAMP
    from lowbit.io import read_json

    d = _copy(clean_demo.out, tmp_path / "demo")
    (base,) = sorted(p for p in (d / "bases").iterdir() if p.is_dir())
    (run,) = sorted((d / "runs").iterdir())
    faults = [(base / "model.safetensors", faultlib.Fault("flip", 5000, 0x10)),
              (d / "bases" / "perplexity.json", faultlib.Fault("truncate", 20)),
              (run / STAMP, faultlib.Fault("flip", 30, 0x01)),
              (d / "ledger" / f"{run.name}.json", faultlib.Fault("truncate", 40))]
    for path, fault in faults:
        fault.apply(path)
    faultlib.small_demo(d)
    clean, got = read_json(clean_demo.out / "results.json"), read_json(d / "results.json")
    assert [b["ppl"] for b in got["bases"]] == [b["ppl"] for b in clean["bases"]]
    assert [r["accuracy"] for r in got["runs"]] == [r["accuracy"] for r in clean["runs"]]
    a = load_file(str(clean_demo.out / "runs" / run.name / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
