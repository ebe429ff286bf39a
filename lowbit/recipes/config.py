"""Recipe configuration: nested dataclasses validated in ``__post_init__``, loaded from YAML with dotted
``key=value`` overrides (``train.max_steps=20 output_dir=/tmp/run``).

Unknown keys are errors that list the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TINY = "tiny"  # the embedded model (lowbit/tiny/tiny_arith)


@dataclass
class ModelSection:
    """name: hub id, directory, or ``tiny``. quantized: an already-quantized lowbit directory (skips
    quantization). dtype: load dtype of the full-precision model."""

    name: str = TINY
    quantized: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class QuantSection:
    """How to quantize the base (``enabled: false`` keeps it in full precision); fields of ``QuantConfig``."""

    enabled: bool = True
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01
    clip_search: bool = False
    magr_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.enabled:
            self.to_quant_config()  # validates

    def to_quant_config(self):
        from ..quant.model import QuantConfig

        return QuantConfig(method=self.method, bits=self.bits, group_size=self.group_size, sym=self.sym,
                           act_order=self.act_order, damp=self.damp, clip_search=self.clip_search,
                           magr_alpha=self.magr_alpha)


@dataclass
class CalibrationSection:
    """Calibration text: ``tiny`` (the embedded model's held-out corpus) or files (.txt/.json/.jsonl) or hub
    names (wikitext2, c4); ``nsamples`` windows of ``seqlen`` tokens."""

    sources: list[str] = field(default_factory=lambda: [TINY])
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if self.nsamples <= 0 or self.seqlen <= 0:
            raise ValueError(f"calibration.nsamples and seqlen must be positive, got {self.nsamples}, {self.seqlen}")


@dataclass
class AdapterSection:
    """Fields of :class:`lowbit.adapters.AdapterConfig`."""

    adapter: str = "lora"
    init: str = "default"
    rank: int = 64
    alpha: float = 16.0
    rslora: bool = False
    num_blocks: int = 64
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    damp: float = 0.01
    loftq_iters: int = 5
    apiq_epochs: int = 20

    def __post_init__(self) -> None:
        self.to_adapter_config()

    def to_adapter_config(self):
        from ..adapters.model import AdapterConfig

        return AdapterConfig(**dataclasses.asdict(self))


@dataclass
class DataSection:
    """Training data. source: ``synthetic`` (the embedded task's training split), ``math10k`` (``path`` to
    math_10k.json; where absent, the substitute GSM8K-train + MAWPS-train from ``data_dir``), or a file path
    (LLM-Adapters .json, GSM8K .jsonl). prompt: ``apiq`` (Alpaca) or ``llm-adapters``."""

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


@dataclass
class TrainSection:
    """Optimisation (Hugging Face ``TrainingArguments`` names where they exist). precision: ``auto`` (bf16
    autocast on CUDA with bf16 support, else fp32), ``fp32``, ``bf16`` or ``fp16``. optim: ``adamw_torch`` or
    ``paged_adamw_8bit`` / ``adamw_8bit`` (bitsandbytes)."""

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
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.lr <= 0:
            raise ValueError(f"train.batch_size, grad_accum and lr must be positive, got {self.batch_size}, "
                             f"{self.grad_accum}, {self.lr}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set train.epochs > 0 or train.max_steps > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit < 2:
            # a new checkpoint is complete only after rotation; keep the previous complete one until then
            raise ValueError(f"train.save_total_limit must be >= 2 so a complete checkpoint always survives, got "
                             f"{self.save_total_limit}")


@dataclass
class EvalSection:
    """Evaluation after training (``datasets`` empty: none). Names as ``lowbit evaluate --datasets``."""

    datasets: list[str] = field(default_factory=list)
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 32
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [d for d in self.datasets.split(",") if d]


@dataclass
class RecipeConfig:
    """A whole run: quantize (if needed) -> initialise adapters -> train -> save (-> evaluate)."""

    output_dir: str = "runs/run"
    method: str = ""  # the row label in comparison tables, e.g. "DiaBlo" or "CLoQ"
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'recipe'} must be a mapping, got {type(values).__name__}: {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ValueError(f"unknown recipe key(s) {[f'{where}{k}' for k in unknown]}; valid keys"
                         f"{' under ' + where.rstrip('.') if where else ''}: {sorted(fields)}")
    kwargs = {}
    for k, v in values.items():
        sub = _SECTIONS.get(k) if cls is RecipeConfig else None
        kwargs[k] = _build(sub, v or {}, f"{k}.") if sub is not None else _coerce(v, fields[k].type, f"{where}{k}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid recipe{' section ' + where.rstrip('.') if where else ''}: {e}") from None


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """YAML reads ``3e-4`` (no dot) as a string and users write ``lr=1e-3``: convert numbers by the field's type."""
    kinds = [t.strip() for t in str(annotation).split("|")]
    if not isinstance(value, str) or "str" in kinds:
        if isinstance(value, int) and not isinstance(value, bool) and "float" in kinds and "int" not in kinds:
            return float(value)
        return value
    for kind, conv in (("int", int), ("float", float)):
        if kind in kinds:
            try:
                return conv(value)
            except ValueError:
                pass
    if kinds and kinds[0] in ("int", "float"):
        raise ValueError(f"recipe key {key} must be a number ({annotation}), got {value!r}")
    return value


_SECTIONS = {"model": ModelSection, "quant": QuantSection, "calibration": CalibrationSection,
             "adapter": AdapterSection, "data": DataSection, "train": TrainSection, "eval": EvalSection}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of ``raw`` with dotted keys set; values are parsed as YAML (``8`` -> int, ``null`` -> None,
    ``[a,b]`` -> list). Key validity is checked when the config is built."""
    import yaml

    out = _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
        parts = key.strip().split(".")
        if len(parts) > 2:
            raise ValueError(f"override key {key!r} is too deep; use section.key (e.g. train.lr=1e-4)")
        if len(parts) == 2:
            if parts[0] not in _SECTIONS:
                raise ValueError(f"unknown recipe section {parts[0]!r} in override {item!r}; sections: "
                                 f"{sorted(_SECTIONS)}")
            node = out.get(parts[0]) or {}
            out[parts[0]] = node
        else:
            node = out
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (``None``: all defaults), apply overrides, validate."""
    import yaml

    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            candidates = sorted(x.name for x in CONFIG_DIR.glob("*.yaml"))
            if (CONFIG_DIR / p.name).is_file():
                p = CONFIG_DIR / p.name
            elif (CONFIG_DIR / f"{p.name}.yaml").is_file():
                p = CONFIG_DIR / f"{p.name}.yaml"
            else:
                raise FileNotFoundError(f"recipe {path} not found; built-in recipes: {candidates}")
        raw = yaml.safe_load(p.read_text()) or {}
    return _build(RecipeConfig, apply_overrides(raw, overrides or []), "")


def dump_recipe(cfg: RecipeConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


CONFIG_DIR = Path(__file__).parent / "configs"
