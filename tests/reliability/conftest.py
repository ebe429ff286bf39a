"""The reliability tests' shared pieces: one thread per process, the clean runs of every command (built once per
session, as subprocesses, timed: the fault tests damage copies of their outputs, the kill tests compare against
them and kill within their duration), and the ``bad_input`` marker, whose tests' expected errors are recorded for
docs/BAD_INPUTS.md when ``LOWBIT_BAD_INPUT_LOG`` is set (``scripts/bad_input_table.py``)."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faultlib  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input(description): a bad-input test; the messages of the errors it "
                                       "expects go to docs/BAD_INPUTS.md (scripts/bad_input_table.py)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As in tests/eval: the tiny model gains nothing from threads, and two spinning OpenMP threads per process on a
    shared 2-core machine are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- clean runs

@dataclass
class Clean:
    out: Path  # the command's output directory
    seconds: float  # its wall time, interpreter start included
    argv: list
    export: Path | None = None


def _clean(tmp_path_factory, name: str, make_argv) -> Clean:
    d = tmp_path_factory.mktemp(f"clean-{name}")
    out = d / "out"
    argv = make_argv(out, d)
    rc, seconds, _ = faultlib.run(argv, d / "log.txt")
    assert rc == 0, (d / "log.txt").read_text()[-3000:]
    return Clean(out, seconds, argv)


@pytest.fixture(scope="session")
def clean_quantize(tmp_path_factory) -> Clean:
    """``lowbit quantize`` (RTN 2-bit, with a GPTQ export) of the tiny model."""
    c = _clean(tmp_path_factory, "quantize", lambda out, d: faultlib.lowbit(*faultlib.quantize_args(out, d / "export")))
    c.export = c.out.parent / "export"
    return c


@pytest.fixture(scope="session")
def clean_finetune(tmp_path_factory) -> Clean:
    """``lowbit finetune tiny-gptq-lora-2bit`` (RTN base, 3 steps, a checkpoint each step, evaluated)."""
    return _clean(tmp_path_factory, "finetune", lambda out, d: faultlib.lowbit(*faultlib.finetune_args(out)))


@pytest.fixture(scope="session")
def clean_evaluate(tmp_path_factory) -> Clean:
    """``lowbit evaluate --model tiny`` on two synthetic sets, with the response loss."""
    return _clean(tmp_path_factory, "evaluate", lambda out, d: faultlib.lowbit(*faultlib.evaluate_args(out)))


@pytest.fixture(scope="session")
def clean_demo(tmp_path_factory) -> Clean:
    """The reduced ``lowbit demo`` (faultlib.small_demo)."""
    return _clean(tmp_path_factory, "demo", lambda out, d: faultlib.demo_argv(out))


# ---------------------------------------------------------------------------------------------- bad-input table

@pytest.fixture(autouse=True)
def _record_bad_input(request, monkeypatch):
    """For a test marked ``bad_input``, while ``LOWBIT_BAD_INPUT_LOG`` is set: record every exception a
    ``pytest.raises`` of it catches (input description, message). Without the variable nothing changes."""
    marker = request.node.get_closest_marker("bad_input")
    if marker is None or not os.environ.get(faultlib.RECORD_ENV):
        yield
        return
    what = marker.args[0] if marker.args else request.node.name
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None:
        try:
            what = what.format(**callspec.params)
        except (KeyError, IndexError, ValueError):
            pass
    test = f"{Path(request.node.fspath).name}::{request.node.name}"
    real = pytest.raises

    def note(exc):
        msg = faultlib.message_of(exc)
        if msg:
            faultlib.record(kind="bad_input", test=test, input=what, message=msg)

    class Recording:
        def __init__(self, cm):
            self.cm = cm

        def __enter__(self):
            return self.cm.__enter__()

        def __exit__(self, typ, exc, tb):
            if exc is not None:
                note(exc)
            return self.cm.__exit__(typ, exc, tb)

    def raises(*args, **kwargs):
        if len(args) > 1 and callable(args[1]):  # the function form: pytest.raises(E, f, *args)
            info = real(*args, **kwargs)
            note(info.value)
            return info
        return Recording(real(*args, **kwargs))

    monkeypatch.setattr(pytest, "raises", raises)
    yield
