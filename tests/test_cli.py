"""The command line as a user meets it: every flag of every subcommand has help text, closed value sets are listed
and match what the configs accept, ``key=value`` overrides may stand anywhere on the line, Ctrl-C ends with one
line and exit status 130 leaving the previous complete result in place, third-party start-up noise is silenced,
and ``lowbit finetune`` ends with one summary (last loss, accuracy per set and average, where the files are)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.cli import CHOICES, build_parser, finetune_report, main, parse_args

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name: str = "lowbit"):
    yield name, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub_name, sub in a.choices.items():
                yield from _parsers(sub, sub_name)


def test_every_option_has_help():
    missing = []
    for name, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = (a.help or "").strip()
            if not text or text == argparse.SUPPRESS or text.startswith("(default"):
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []


@pytest.mark.parametrize("sub", ["quantize", "finetune", "evaluate", "compare", "demo", "export", "study",
                                 "experiment", "params", "pretrain-tiny"])
def test_subcommand_help_runs(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0 and "usage: lowbit " + sub in capsys.readouterr().out


def test_choices_are_what_the_configs_accept():
    """Each listed choice builds its config, a value outside the list is refused by the config too (so --help never
    lists a value the run would refuse, nor hides one it takes), and the quantizers are the registered ones."""
    from lowbit.eval.config import CHOICE_RULES, VARIANTS, EvalConfig
    from lowbit.recipes.config import QuantConfig
    from lowbit.recipes.evaluate import EvaluateRun
    from lowbit.recipes.export_run import FORMATS, GPTQ_BITS, ExportRun
    from lowbit.recipes.quantize import QuantizeRun

    make = {"QuantizeRun": lambda **k: QuantizeRun(model="m", out="o", quant=QuantConfig(method="rtn"), **k),
            "EvaluateRun": lambda **k: EvaluateRun(model="m", **k),
            "EvalConfig": lambda **k: EvalConfig(**k),
            "ExportRun": lambda **k: ExportRun(run_dir="r", out="o", **k)}
    assert set(CHOICES) == set(make)
    for cls_name, fields in CHOICES.items():
        for field, values in fields.items():
            for v in values:
                make[cls_name](**{field: v})
            bogus = 7 if isinstance(values[0], int) else "bogus"
            with pytest.raises(ValueError):
                make[cls_name](**{field: bogus})
    assert CHOICES["ExportRun"]["bits"] == GPTQ_BITS and CHOICES["ExportRun"]["format"] == FORMATS
    assert set(CHOICES["EvalConfig"]["variant"]) == set(VARIANTS)
    assert set(CHOICES["EvalConfig"]["choice_rule"]) == set(CHOICE_RULES)
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["quantize"]
    method = next(a for a in sub._actions if a.dest == "method")
    assert tuple(method.choices) == tuple(QuantConfig.methods()) and "magr-gptq" in method.choices


def test_a_value_outside_the_choices_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["export", "runs/x", "--out", "y", "--format", "gguf"])
    assert e.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, overrides, resume", [
    (["finetune", "r", "--resume", "output_dir=X", "train.max_steps=2"], ["output_dir=X", "train.max_steps=2"], True),
    (["finetune", "r", "output_dir=X", "--resume"], ["output_dir=X"], True),
    (["finetune", "r", "a=1", "--resume", "b=2"], ["a=1", "b=2"], True),
    (["experiment", "demo", "--out", "X", "seeds=[0,1]"], ["seeds=[0,1]"], None),
    (["experiment", "demo", "budget.steps=2", "--out", "X", "seeds=[0]"], ["budget.steps=2", "seeds=[0]"], None),
])
def test_overrides_anywhere_on_the_line(argv, overrides, resume):
    args = parse_args(argv)
    assert args.overrides == overrides
    if resume is not None:
        assert args.resume is resume


def test_unknown_flags_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["finetune", "r", "--resume", "--bogus", "a=1"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["evaluate", "--model", "tiny", "a=1"])  # evaluate takes no overrides


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import lowbit.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_params", interrupted)
    assert main(["params"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("lowbit params: interrupted")


# SIGINT delivered while the new packed weights are being written: the previous complete model must survive.
SIGINT_MID_SAVE = """
import os, signal, sys
# As in a terminal: a test run started in the background (`cmd &`) passes SIGINT on as ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
import lowbit.safetensors_io as st
real = st.save_file_streamed
def save(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGINT)
st.save_file_streamed = save
from lowbit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_quantize_keeps_the_previous_model(tmp_path):
    out = tmp_path / "q"
    base = ["quantize", "--model", "tiny", "--bits", "2", "--ppl-windows", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, "-m", "lowbit", *base, "--method", "rtn"], env=env,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    second = subprocess.run([sys.executable, "-c", SIGINT_MID_SAVE, *base, "--method", "nf", "--overwrite"],
                            env=env, capture_output=True, text=True)
    assert second.returncode == 130, second.stderr[-2000:]
    assert "Traceback" not in second.stderr and "KeyboardInterrupt" not in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("lowbit quantize: interrupted")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_third_party_start_up_noise_is_silenced():
    """The CLI's logging set-up silences the optional-kernel and deprecation warnings of torchao / torch / kernels
    (shown with -v); lowbit's own warnings still show."""
    pytest.importorskip("torchao")
    code = ("import logging, sys; from lowbit.cli import _setup_logging; _setup_logging(sys.argv[1] == 'v'); "
            "import torchao, peft; logging.getLogger('lowbit').warning('own warning')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = subprocess.run([sys.executable, "-c", code, "q"], env=env, capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-c", code, "v"], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-2000:]
    assert "own warning" in quiet.stderr
    assert "torchao" not in quiet.stderr and "_pytree" not in quiet.stderr, quiet.stderr
    if "torchao" not in loud.stderr and "_pytree" not in loud.stderr:
        pytest.skip("this torch/torchao pair emits no start-up warnings to silence")


def test_finetune_report(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "run.json").write_text("{}")
    summary = {"method": "DiaBlo", "bits": 2, "steps": 20, "train_time_s": 41.2, "trainable_params": 147456,
               "last_logged_loss": 0.827, "last_step_loss": 0.791, "mean_train_loss": 1.3165, "resumed_from": None,
               "eval": {"datasets": {"gsm8k": {"display": "GSM8K", "accuracy": 25.0, "correct": 5, "n": 20},
                                     "svamp": {"display": "SVAMP", "accuracy": 35.0, "correct": 7, "n": 20}},
                        "average": 30.0}}
    text = finetune_report(summary, str(tmp_path))
    assert "last logged 0.8270 (last step 0.7910, mean over the run 1.3165)" in text
    assert "GSM8K" in text and "25.0%" in text and "average" in text and "30.0%" in text
    assert text.splitlines()[-1] == f"run directory: {tmp_path}  (adapter, run.json)"
    assert "evaluation" not in finetune_report({**summary, "eval": None}, str(tmp_path))
