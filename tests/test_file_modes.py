"""File modes: everything lowbit writes, atomically or not, gets the mode ``open()`` gives (``0o666 & ~umask``;
directories ``0o777 & ~umask``), also the files libraries write through private temporary files (safetensors'
``save_file`` leaves them 0600). The umask is set to 0o027 here, so neither 0600 nor a hard-coded 0644 passes."""

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.io import atomic_dir, atomic_write_json, atomic_write_text

UMASK = 0o027
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK


@pytest.fixture(autouse=True)
def umask():
    old = os.umask(UMASK)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """``{path relative to root: permission bits}`` of every file and directory under ``root`` (root included)."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def _wrong(root: Path) -> dict[str, str]:
    want = {k: DIR_MODE if (root / k).is_dir() else FILE_MODE for k in _modes(root)}
    return {k: oct(m) for k, m in _modes(root).items() if m != want[k]}


def test_atomic_writes_get_the_umask_mode(tmp_path):
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "d") as tmp:
        save_file({"w": torch.zeros(3)}, str(tmp / "model.safetensors"))  # the library's own atomic write: 0600
        (tmp / "sub").mkdir()
        fd, _ = tempfile.mkstemp(dir=tmp / "sub")  # 0600 as well
        os.close(fd)
        atomic_write_json(tmp / "meta.json", {"a": 1})
    atomic_write_text(tmp_path / "alone.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "model.safetensors").st_mode) == FILE_MODE
    assert _wrong(tmp_path / "d") == {}
    assert stat.S_IMODE(os.stat(tmp_path / "alone.txt").st_mode) == FILE_MODE


def test_quantized_and_exported_directories(tmp_path):
    assert main(["quantize", "--model", "tiny", "--method", "rtn", "--bits", "2", "--group-size", "64",
                 "--ppl-windows", "0", "--out", str(tmp_path / "q"), "--export-gptq", str(tmp_path / "e")]) == 0
    for d in ("q", "e"):
        assert (tmp_path / d / "model.safetensors").is_file()
        assert _wrong(tmp_path / d) == {}, d


def test_finetune_run_files(tmp_path):
    """A short run with checkpoints, the base, the adapter and an evaluation: every file and directory."""
    from lowbit.recipes.config import load_recipe
    from lowbit.recipes.finetune import finetune

    out = tmp_path / "run"
    finetune(load_recipe("tiny-gptq-lora-2bit", [
        "quant.method=rtn", "train.max_steps=2", "train.save_steps=1", "train.batch_size=2", "train.threads=1",
        "data.num_examples=4", "train.logging_steps=1", "train.warmup_ratio=0.0", "eval.datasets=[synthetic-gsm8k]",
        "eval.limit=1", "eval.max_new_tokens=4", "eval.batch_size=1", f"output_dir={out}"]))
    for f in ("adapter/adapter_model.safetensors", "checkpoint-2/adapter/adapter_model.safetensors",
              "base/model.safetensors", "run.json", "summary.json", "loss.png", "log.jsonl"):
        assert (out / f).is_file(), f
    assert _wrong(out) == {}
