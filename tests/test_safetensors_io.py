"""The streamed safetensors writer: files that the safetensors library reads back bit for bit, every dtype lowbit
stores, and the same tensors as ``save_file``."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit.safetensors_io import save_file_streamed


def test_round_trip_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 2, 3, generator=g).bfloat16(), "f64": torch.randn(4, generator=g).double(),
               "i32": torch.randint(-9, 9, (6,), generator=g, dtype=torch.int32),
               "u8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
               "i64": torch.tensor([1, -2, 3]), "b": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6, generator=g).t()}
    save_file_streamed(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "b.safetensors", metadata={"format": "pt"})
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() == tensors.keys()
    for k, v in tensors.items():
        assert a[k].dtype == v.dtype and a[k].shape == v.shape and torch.equal(a[k], v.contiguous()), k
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(ValueError, match="'c' has dtype torch.complex64"):
        save_file_streamed({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
