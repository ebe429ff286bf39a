"""A random LLaMA checkpoint of any shape (LLaMA-2-7B's by default), written one tensor at a time.

Memory and time at 7B scale are measured on a checkpoint of the real shapes, but no 7B weights are needed for that:
:func:`write_random_llama` writes a Hugging Face ``LlamaForCausalLM`` directory (``config.json``, sharded
safetensors with ``model.safetensors.index.json``, the embedded tiny model's tokenizer) whose weights are drawn at
random. It never holds more than one tensor (and the one before it) in memory: the shard layout is planned from the
shapes, each shard's safetensors header is written first, and every tensor's bytes are appended as soon as it is
drawn. The fp16 7B model (13.5 GB) therefore costs about one ``down_proj`` in float32 (180 MB) to write.

Weights: ``N(0, 1/fan_in)`` for every linear (so each projection keeps unit-scale activations and the logits of a
32-layer model stay O(1)), ``N(0, 1)`` embeddings, norm gains 1. On top, outlier input channels exactly as
:mod:`lowbit.models.tiny.outliers` adds them (a function-preserving rescaling: ``q, k, v`` and ``gate, up`` columns
× c with the norm gains ÷ c, ``o`` columns × c with ``v`` rows ÷ c, ``down`` columns × c with ``up`` rows ÷ c). The
base weights come from their own generator per layer and the outlier channels from another, so the same ``seed``
gives the same base weights with or without outliers: with a power-of-two factor both checkpoints compute the same
function (up to fp16 rounding of rescaled values that fall into the subnormal range).

Run: ``python -m lowbit.models.random_llama --out DIR [--layers 2 --hidden 4096 ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io import atomic_dir, atomic_write_json, check_new_dir
from ..safetensors_io import DTYPES as SAFETENSORS_DTYPES
from ..safetensors_io import header
from .tiny.outliers import expand_kv_scales, outlier_scales

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix every tensor of a LLaMA checkpoint (LLaMA-2-7B's by default; ``kv_heads`` ``None``:
    ``heads``, multi-head attention)."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int | None = None
    vocab: int = 32000

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads}) and heads a multiple "
                             f"of kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (out, in)}`` of one decoder layer's linears (``name`` as in :data:`LINEARS`)."""
        h, m, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return dict(zip(LINEARS, [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]))

    def tensor_plan(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor's Hugging Face name and shape, in the order they are drawn and written."""
        plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            plan += [(f"{p}input_layernorm.weight", (self.hidden,))]
            plan += [(f"{p}{n}.weight", s) for n, s in self.linear_shapes().items()]
            plan += [(f"{p}post_attention_layernorm.weight", (self.hidden,))]
        return plan + [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]


def _subseed(seed: int, *keys) -> int:
    """A 63-bit seed for one named stream (``(seed, "layer", 3)``): streams never share draws."""
    return int.from_bytes(hashlib.sha256(repr((seed, *keys)).encode()).digest()[:8], "little") >> 1


def _gen(seed: int, *keys) -> torch.Generator:
    return torch.Generator().manual_seed(_subseed(seed, *keys))


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).mul_(std)


def layer_tensors(i: int, shape: LlamaShape, dtype: torch.dtype, seed: int, outlier_fraction: float,
                  outlier_factor: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Decoder layer ``i``'s tensors in :meth:`LlamaShape.tensor_plan` order, one at a time, in ``dtype``.

    Linears ``(out, in)`` are ``N(0, 1/in)`` in float32 from generator ``(seed, "layer", i)``, drawn in the fixed
    order q, k, v, o, gate, up, down; with ``outlier_fraction > 0`` their columns/rows are then multiplied by the
    channel scales drawn (as :func:`~lowbit.models.tiny.outliers.add_outlier_channels` draws them) from generator
    ``(seed, "outliers", i)``, and the norm gains ``(hidden,)`` are ``1 / c`` instead of 1.
    """
    shapes = shape.linear_shapes()
    h, m, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    one = torch.ones
    c_attn, c_mlp, c_v, c_down = one(h), one(h), one(kv), one(m)
    if outlier_fraction > 0:
        g = _gen(seed, "outliers", i)
        c_attn, c_mlp, c_v, c_down = (outlier_scales(n, outlier_fraction, outlier_factor, g) for n in (h, h, kv, m))
    c_o = expand_kv_scales(c_v, shape.head_dim, shape.heads // shape.kv_heads)
    # (column scales, row scales) per linear: each pair of scaled sides multiplies to 1 along the network.
    scales = {"self_attn.q_proj": (c_attn, None), "self_attn.k_proj": (c_attn, None),
              "self_attn.v_proj": (c_attn, 1 / c_v), "self_attn.o_proj": (c_o, None), "mlp.gate_proj": (c_mlp, None),
              "mlp.up_proj": (c_mlp, 1 / c_down), "mlp.down_proj": (c_down, None)}
    p = f"model.layers.{i}."
    yield f"{p}input_layernorm.weight", (1 / c_attn).to(dtype)
    base = _gen(seed, "layer", i)
    for name, (out, inp) in shapes.items():
        w = _normal((out, inp), 1 / math.sqrt(inp), base)  # drawn whatever the outliers: same base weights
        cols, rows = scales[name]
        if outlier_fraction > 0:  # in place, float32: exact for a power-of-two factor
            w.mul_(cols.float()[None, :])
            if rows is not None:
                w.mul_(rows.float()[:, None])
        yield f"{p}{name}.weight", w.to(dtype)
        del w
    yield f"{p}post_attention_layernorm.weight", (1 / c_mlp).to(dtype)


def checkpoint_tensors(shape: LlamaShape, dtype: torch.dtype, seed: int = 0, outlier_fraction: float = 0.02,
                       outlier_factor: float = 8.0, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint in :meth:`LlamaShape.tensor_plan` order, drawn one at a time."""
    from tqdm.auto import tqdm

    yield "model.embed_tokens.weight", _normal((shape.vocab, shape.hidden), 1.0, _gen(seed, "embed")).to(dtype)
    for i in tqdm(range(shape.layers), desc="random llama layers", disable=not progress):
        yield from layer_tensors(i, shape, dtype, seed, outlier_fraction, outlier_factor)
    yield "model.norm.weight", torch.ones(shape.hidden, dtype=dtype)
    yield "lm_head.weight", _normal((shape.vocab, shape.hidden), 1 / math.sqrt(shape.hidden),
                                    _gen(seed, "lm_head")).to(dtype)


def plan_shards(plan: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: float) -> list[list[int]]:
    """Consecutive tensor indices per shard: a shard is closed before the tensor that would take it past
    ``shard_bytes`` (a single larger tensor gets a shard of its own), as Hugging Face's sharding does."""
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, s) in enumerate(plan):
        n = math.prod(s) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _write_shards(tmp: Path, shape: LlamaShape, dtype: str, shard_gb: float, tensors) -> dict:
    """Stream ``tensors`` (name, tensor) into planned shards under ``tmp``; -> the index's ``weight_map``."""
    torch_dtype = DTYPES[dtype]
    code = SAFETENSORS_DTYPES[torch_dtype]
    itemsize = torch_dtype.itemsize
    plan = shape.tensor_plan()
    shards = plan_shards(plan, itemsize, shard_gb * 1e9)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    owner = {k: s for s, ks in enumerate(shards) for k in ks}
    weight_map, f, current = {}, None, -1
    try:
        for k, (name, t) in enumerate(tensors):
            want, s = plan[k], owner[k]
            if (name, tuple(t.shape)) != want or t.dtype != torch_dtype:
                raise RuntimeError(f"tensor {k} is {name} {tuple(t.shape)} {t.dtype}, planned {want} {torch_dtype}")
            if s != current:
                if f is not None:
                    f.close()
                    log.info("wrote %s", files[current])
                f, current = open(tmp / files[s], "wb"), s
                entries = [(n, code, list(sh), math.prod(sh) * itemsize) for n, sh in (plan[j] for j in shards[s])]
                f.write(header(entries, {"format": "pt"}))
            f.write(t.contiguous().view(torch.uint8).numpy().data)  # the tensor's bytes, no copy
            weight_map[name] = files[s]
            del t
    finally:
        if f is not None:
            f.close()
    if len(weight_map) != len(plan):
        raise RuntimeError(f"{len(weight_map)} tensors written of {len(plan)} planned")
    log.info("wrote %s", files[current])
    return weight_map


def _copy_tokenizer(tmp: Path, vocab: int) -> None:
    """The embedded tiny model's tokenizer files; its ids must fit the embedding table."""
    from tokenizers import Tokenizer

    from . import alias_dir

    src = alias_dir("tiny")
    size = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if vocab < size:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {size} ids; use vocab >= {size}")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)


def _write_config(tmp: Path, shape: LlamaShape, dtype: str) -> None:
    """config.json with LLaMA-2-7B's other settings, in the installed transformers' format."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp)


def write_random_llama(out: str | Path, *, layers: int = 32, hidden: int = 4096, intermediate: int = 11008,
                       heads: int = 32, kv_heads: int | None = None, vocab: int = 32000, dtype: str = "float16",
                       shard_gb: float = 2.0, seed: int = 0, outlier_fraction: float = 0.02,
                       outlier_factor: float = 8.0, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a random LLaMA checkpoint directory to ``out`` (atomically) and return its path.

    ``kv_heads``: key/value heads (default ``heads``: multi-head attention, as LLaMA-2-7B). ``dtype``: float16,
    bfloat16 or float32 storage. ``shard_gb``: shard size in 10^9 bytes. ``outlier_fraction``: the share of each
    linear input's channels scaled by ``outlier_factor`` (0: none). An existing non-empty ``out`` is refused unless
    ``overwrite``. Memory: one tensor at a time (plus the previous one), never a layer or the model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not shard_gb > 0:
        raise ValueError(f"shard_gb must be positive, got {shard_gb}")
    if not 0 <= outlier_fraction <= 1 or not (math.isfinite(outlier_factor) and outlier_factor > 0):
        raise ValueError(f"outlier_fraction must be in [0, 1] and outlier_factor positive, got {outlier_fraction}, "
                         f"{outlier_factor}")
    shape = LlamaShape(layers, hidden, intermediate, heads, kv_heads, vocab)
    out = Path(out)
    if not overwrite:
        check_new_dir(out, "out")
    settings = {"generator": __name__, **asdict(shape), "dtype": dtype, "seed": seed,
                "outlier_fraction": outlier_fraction, "outlier_factor": outlier_factor}
    with atomic_dir(out) as tmp:
        _copy_tokenizer(tmp, vocab)
        _write_config(tmp, shape, dtype)
        tensors = checkpoint_tensors(shape, DTYPES[dtype], seed, outlier_fraction, outlier_factor, progress)
        weight_map = _write_shards(tmp, shape, dtype, shard_gb, tensors)
        total = sum(math.prod(s) for _, s in shape.tensor_plan()) * DTYPES[dtype].itemsize
        atomic_write_json(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(tmp / "random_llama.json", settings)
    log.info("random LLaMA %s (%.2f GB) -> %s", asdict(shape), total / 1e9, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m lowbit.models.random_llama", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    for flag, default in (("layers", 32), ("hidden", 4096), ("intermediate", 11008), ("heads", 32), ("vocab", 32000),
                          ("seed", 0)):
        ap.add_argument(f"--{flag}", type=int, default=default, help=f"(default: {default})")
    ap.add_argument("--kv-heads", type=int, default=None, help="(default: --heads)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--shard-gb", type=float, default=2.0, help="(default: 2.0)")
    ap.add_argument("--outlier-fraction", type=float, default=0.02, help="(default: 0.02; 0 = none)")
    ap.add_argument("--outlier-factor", type=float, default=8.0, help="(default: 8.0)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return write_random_llama(a.out, layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                              kv_heads=a.kv_heads, vocab=a.vocab, dtype=a.dtype, shard_gb=a.shard_gb, seed=a.seed,
                              outlier_fraction=a.outlier_fraction, outlier_factor=a.outlier_factor,
                              overwrite=a.overwrite)


if __name__ == "__main__":
    main()
