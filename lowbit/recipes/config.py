"""Recipe configuration: one dataclass per concept, validated once in its ``__post_init__``, embedded in
:class:`RecipeConfig` and loaded from YAML with dotted ``key=value`` overrides (``train.max_steps=20``).

The sections are the library's own configs — ``quant`` is a :class:`~lowbit.quant.QuantConfig` (``null``: keep the
base in full precision), ``adapter`` an :class:`~lowbit.adapters.AdapterConfig`, ``eval`` an
:class:`~lowbit.eval.config.EvalConfig` (``null``: no evaluation after training) — so every setting of those
is reachable from a recipe. Unknown keys at any depth are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdapterConfig
from ..data.loaders import MATH10K
from ..eval.config import EvalConfig
from ..quant import QuantConfig
from ..quant.config import as_number

TINY = "tiny"  # the embedded model (lowbit/models/tiny/tiny_arith)
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    """name: hub id, directory, or a model alias (``tiny``). quantized: a lowbit quantized directory of this
    recipe's base (a cache: its quantization must equal the ``quant`` section). dtype: load dtype of the float model."""

    name: str = TINY
    quantized: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class CalibrationConfig:
    """Calibration text: ``tiny`` (held-out text in the embedded model's pre-training style), files
    (.txt/.json/.jsonl) or hub names (wikitext2, c4); ``nsamples`` random windows of ``seqlen`` tokens."""

    sources: list[str] = field(default_factory=lambda: [TINY])
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [s for s in self.sources.split(",") if s]
        if self.nsamples <= 0 or self.seqlen <= 0:
            raise ValueError(f"calibration nsamples and seqlen must be positive, got {self.nsamples}, {self.seqlen}")


@dataclass
class DataConfig:
    """Training data. source: ``synthetic`` (the embedded task's training split), ``math10k`` (LLM-Adapters'
    math_10k.json: ``path``, relative to the working directory, else ``<data_dir>/ft-training_set/math_10k.json``;
    missing is an error), ``gsm8k-mawps`` (the documented substitute: GSM8K and MAWPS train from ``data_dir``, used
    only when named), or a file path (LLM-Adapters .json, GSM8K .jsonl). data_dir: default ``$LOWBIT_DATA_DIR``
    (also read for the test-set overlap check). prompt: ``apiq`` (Alpaca) or ``llm-adapters``."""

    source: str = "synthetic"
    path: str | None = None
    data_dir: str | None = None
    num_examples: int | None = None
    max_length: int = 512
    prompt: str = "apiq"
    train_on_prompt: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8 tokens, got {self.max_length}")
        if self.prompt not in ("apiq", "llm-adapters"):
            raise ValueError(f"data.prompt must be 'apiq' or 'llm-adapters', got {self.prompt!r}")
        if self.num_examples is not None and self.num_examples <= 0:
            raise ValueError(f"data.num_examples must be positive, got {self.num_examples}")
        if self.path is not None and self.source != MATH10K:
            # data.path names math_10k.json; under another source it would be silently ignored
            raise ValueError(f"data.path ({self.path!r}) is read only with data.source={MATH10K}, not with "
                             f"data.source={self.source!r}; set data.path=null or data.source={MATH10K}")


@dataclass
class TrainConfig:
    """Optimisation (Hugging Face ``TrainingArguments`` names where they exist). precision: ``auto`` (bf16
    autocast on CUDA with bf16 support, else fp32), ``fp32``, ``bf16`` or ``fp16``. optim: ``adamw_torch`` or
    ``paged_adamw_8bit`` / ``adamw_8bit`` (bitsandbytes). max_steps: a positive number of optimizer steps, or ``-1``
    (train for ``epochs``)."""

    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    precision: str = "auto"
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    seed: int = 42
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant", "constant_with_warmup"):
            raise ValueError(f"train.schedule must be linear, cosine, constant or constant_with_warmup, got "
                             f"{self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.optim not in ("adamw_torch", "paged_adamw_8bit", "adamw_8bit"):
            raise ValueError(f"train.optim must be adamw_torch, paged_adamw_8bit or adamw_8bit, got {self.optim!r}")
        self._check_numbers()
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit < 2:
            # a new checkpoint is complete only after rotation; keep the previous complete one until then
            raise ValueError(f"train.save_total_limit must be >= 2 so a complete checkpoint always survives, got "
                             f"{self.save_total_limit}")

    def _check_numbers(self) -> None:
        """Counts and rates that would otherwise be passed on to the Trainer: a nonsense value there fails (or is
        silently reinterpreted) only after the expensive quantization, so it is refused here."""
        if self.max_steps == 0 or self.max_steps < -1:
            # The Trainer reads any max_steps <= 0 as "train for num_train_epochs": -5 would silently mean epochs.
            raise ValueError(f"train.max_steps must be a positive number of optimizer steps, or -1 to train for "
                             f"train.epochs ({self.epochs:g}) epochs; got {self.max_steps}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0 when train.max_steps is -1 (train for epochs); got "
                             f"epochs={self.epochs:g}: set train.epochs > 0 or train.max_steps to a positive count")
        if self.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0, got {self.epochs:g}")
        for name in ("batch_size", "grad_accum", "lr", "logging_steps", "save_steps"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"train.{name} must be positive, got {value}")
        for name in ("weight_decay", "warmup_steps", "max_grad_norm", "seed"):
            value = getattr(self, name)
            if value < 0:
                # max_grad_norm 0 switches clipping off, as in the Trainer; numpy refuses a negative seed
                raise ValueError(f"train.{name} must be >= 0, got {value}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"train.threads must be a positive number of CPU threads, or null (torch's default); "
                             f"got {self.threads}")


@dataclass
class RecipeConfig:
    """A whole run: quantize (unless ``quant`` is null) -> initialise adapters -> train -> save (-> evaluate)."""

    output_dir: str = "runs/run"
    method: str = ""  # the row label in comparison tables, e.g. "DiaBlo" or "CLoQ"
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig | None = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig | None = None

    def __post_init__(self) -> None:
        self.adapter.check_quant(self.quant)  # e.g. apiq-bw with quant.sym: refused before any model loads
        if self.eval is not None and self.eval.prompt != self.data.prompt:
            raise ValueError(f"eval.variant {self.eval.variant!r} prompts with {self.eval.prompt!r} but the model is "
                             f"trained with data.prompt {self.data.prompt!r}; make them agree")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- YAML <-> config

def field_types(cls) -> dict[str, tuple[type | None, bool, tuple]]:
    """name -> (nested dataclass or None, None allowed, the non-None types) from dataclass ``cls``'s annotations;
    the one reader of config field types (the YAML loader and the generated CLI flags both use it)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        nullable = type(None) in args
        args = tuple(a for a in args if a is not type(None))
        nested = next((a for a in args if dataclasses.is_dataclass(a)), None)
        out[name] = (nested, nullable, args)
    return out


def build_config(cls, values: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields; unknown keys and bad values
    raise ``ValueError`` naming the dotted key and the valid keys."""
    label = where.rstrip(".") or "recipe"
    if not isinstance(values, dict):
        raise ValueError(f"{label} must be a mapping, got {type(values).__name__}: {values!r}")
    types_ = field_types(cls)
    unknown = [k for k in values if k not in types_]
    moved = getattr(cls, "MOVED_KEYS", {})  # old name -> new dotted name, for settings a config moved
    for k in unknown:
        if k in moved:
            raise ValueError(f"{where}{k} moved to {where}{moved[k]}")
    if unknown:
        raise ValueError(f"unknown recipe key(s) {[f'{where}{k}' for k in unknown]}; valid keys"
                         f"{' under ' + label if where else ''}: {sorted(types_)}")
    kwargs = {}
    for k, v in values.items():
        nested, nullable, scalars = types_[k]
        if nested is not None:
            if v is None and nullable:
                kwargs[k] = None
            else:
                kwargs[k] = build_config(nested, {} if v is None else v, f"{where}{k}.")
        else:
            kwargs[k] = _coerce(v, scalars, f"{where}{k}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {'recipe section ' + label if where else 'recipe'}: {e}") from None


def _coerce(value: Any, kinds: tuple, key: str) -> Any:
    """Numbers by the field's type (:func:`~lowbit.quant.config.as_number`); a string left for a number field is
    an error naming the key."""
    converted = as_number(value, kinds)
    if isinstance(converted, str) and str not in kinds and kinds and kinds[0] in (int, float):
        raise ValueError(f"recipe key {key} must be a number ({' | '.join(k.__name__ for k in kinds)}), got {value!r}")
    return converted
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(value)
            except ValueError:
                pass
    if kinds and kinds[0] in (int, float):
        raise ValueError(f"recipe key {key} must be a number ({' | '.join(k.__name__ for k in kinds)}), got {value!r}")
    return value


def apply_overrides(raw: dict, overrides: list[str], cls: type = None) -> dict:
    """A copy of ``raw`` with dotted keys set; values are parsed as YAML (``8`` -> int, ``null`` -> None,
    ``[a,b]`` -> list). ``cls``: the config the mapping is for (default :class:`RecipeConfig`), whose nested
    sections a dotted key must start with. Key validity is checked when the config is built."""
    import copy

    import yaml

    out = copy.deepcopy(raw)
    sections = {n for n, (nested, _, _) in field_types(cls or RecipeConfig).items() if nested is not None}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
        parts = key.strip().split(".")
        if len(parts) > 1 and parts[0] not in sections:
            raise ValueError(f"unknown recipe section {parts[0]!r} in override {item!r}; sections: {sorted(sections)}")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return out


def _yaml_problem(e: Exception) -> str:
    """The one-line cause of a YAML error (its ``problem``, else its first line)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file: a path (it holds a ``/`` or ends in ``.yaml``/``.yml``; it must exist) or the name of a
    built-in recipe (no extension). One is never taken for the other: a missing path does not fall back to the
    built-in recipe of the same file name."""
    text = str(recipe)
    builtin = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    if "/" in text or os.sep in text or Path(text).suffix in (".yaml", ".yml"):
        p = Path(text).expanduser()
        if p.is_file():
            return p
        hint = f"; the built-in recipe is named without a path: {p.stem}" if p.stem in builtin else ""
        raise FileNotFoundError(f"recipe file {text} not found{' (it is a directory)' if p.is_dir() else ''}{hint}")
    if (CONFIG_DIR / f"{text}.yaml").is_file():
        return CONFIG_DIR / f"{text}.yaml"
    raise FileNotFoundError(f"no built-in recipe named {text!r}" + unknown_name_hint(
        text, builtin, f"the files of lowbit/recipes/configs/; a recipe file is given by its path, e.g. ./{text}.yaml"))


def unknown_name_hint(name: str, names: list[str], listing: str) -> str:
    """"did you mean" the closest of ``names``, then ``names`` themselves, grouped by their first word when there
    are many, and ``listing`` (where to see them in full): the CLI prints an error as one line, and all 48 recipe
    names on it would bury the suggestion."""
    close = [repr(c) for c in difflib.get_close_matches(name, names, n=3, cutoff=0.6)]
    mean = f"; did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}?" if close else ""
    return f"{mean} (built-in: {_grouped(names)}; {listing})"


def _grouped(names: list[str], few: int = 12) -> str:
    """``names`` in one line: all of them when few, else ``16 tiny-*``-style counts per first word."""
    if len(names) <= few:
        return ", ".join(names)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split("-")[0], []).append(n)
    parts = []
    for members in groups.values():
        prefix = os.path.commonprefix(members)
        prefix = prefix[: prefix.rfind("-") + 1]  # whole words: llama2-7b-, not llama2-7b-d when all start so
        parts.append(f"{len(members)} {prefix}*" if len(members) > 1 and prefix else ", ".join(members))
    return ", ".join(parts)


def read_recipe(path: Path) -> dict:
    """The mapping in a recipe file; an empty file, a non-mapping or a YAML syntax error (with its line) is a
    ``ValueError`` naming the file."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"recipe {path}: YAML syntax error{where}: {_yaml_problem(e)}") from None
    if raw is None:
        raise ValueError(f"recipe {path} is empty; a recipe is a YAML mapping of settings (method, model, quant, "
                         f"adapter, data, train, ...)")
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of settings (method, model, quant, ...), got a "
                         f"{type(raw).__name__}")
    return raw


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe (a file path or a built-in name, see :func:`find_recipe`; ``None``: all defaults), apply
    overrides, validate."""
    raw = read_recipe(find_recipe(path)) if path is not None else {}
    return build_config(RecipeConfig, apply_overrides(raw, overrides or []))


def dump_recipe(cfg: RecipeConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
