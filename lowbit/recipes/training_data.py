"""The training set a recipe's ``data`` section names: its files, checked before any model or tokenizer is
loaded; its records; and what ``run.json`` records of it.

``data.source`` is one of ``synthetic`` (generated, no files), ``math10k`` (LLM-Adapters' ``math_10k.json``: the
explicit ``data.path``, relative to the working directory, else ``<data_dir>/ft-training_set/math_10k.json``),
``gsm8k-mawps`` (the documented substitute, GSM8K train + MAWPS train from the data directory) or a file path.
Each reads exactly the files it names: a missing file is an error that names it and the explicit alternatives,
never a silent switch to another training set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..data.loaders import MATH10K, SUBSTITUTE, training_set_files
from .config import DataConfig, RecipeConfig

SYNTHETIC = "synthetic"
NAMED = (SYNTHETIC, MATH10K, SUBSTITUTE)


def _data_dir(d: DataConfig) -> Path:
    """The data directory: the overlap check reads its test sets, the substitute its training files."""
    from ..data.testsets import DATA_DIR_ENV, default_data_dir

    data_dir = d.data_dir or default_data_dir()
    if data_dir is None:
        raise ValueError(f"data.source={d.source} reads files of a data directory (the test sets for the overlap "
                         f"check{', and its training files' if d.source == SUBSTITUTE else ''}), and none is set: "
                         f"pass data.data_dir=DIR or set {DATA_DIR_ENV}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} (data.data_dir, else ${DATA_DIR_ENV}) does not exist")
    return data_dir


def training_files(d: DataConfig) -> list[Path]:
    """The files training set ``d`` reads (none for ``synthetic``); raises, naming the missing file and the fix,
    before any expensive work."""
    if d.source == SYNTHETIC:
        return []
    if d.source == MATH10K and d.path is not None:
        p = Path(d.path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"data.path {d.path!r}: Math10K training file {p.resolve()} not found; put LLM-Adapters' "
                f"math_10k.json there or pass data.path=/path/to/math_10k.json. To train on the documented substitute "
                f"(GSM8K train + MAWPS train from the data directory; no AQuA examples) instead, ask for it: "
                f"data.source={SUBSTITUTE} data.path=null")
    if d.source in (MATH10K, SUBSTITUTE):
        try:
            return training_set_files(_data_dir(d), d.source, d.path)
        except FileNotFoundError as e:
            fix = (f"; or pass data.path=/path/to/math_10k.json, or ask for the substitute: "
                   f"data.source={SUBSTITUTE}") if d.source == MATH10K else ""
            raise FileNotFoundError(f"{e}{fix}") from None
    p = Path(d.source).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.source {d.source!r} is neither a named training set ({', '.join(NAMED)}) "
                                f"nor an existing file")
    return [p]


def load_training_records(cfg: RecipeConfig) -> list[dict]:
    """The training records named by ``cfg.data`` (validated; never a test set; never another set than named)."""
    d = cfg.data
    files = training_files(d)
    if d.source == SYNTHETIC:
        from ..data.synthetic import train_split

        recs = train_split(d.num_examples or 10000, seed=d.seed)
    elif d.source in (MATH10K, SUBSTITUTE):
        from ..data.loaders import default_math_training_set

        recs = default_math_training_set(_data_dir(d), math10k_path=files[0] if d.source == MATH10K else None,
                                         seed=d.seed, source=d.source)
    else:
        from ..data.loaders import load_source

        recs = load_source(files[0])
    recs = list(recs)
    if d.num_examples is not None:
        recs = recs[: d.num_examples]
    if not recs:
        raise ValueError(f"the training data ({d.source}) is empty")
    return recs


def training_set_record(d: DataConfig, files: list[Path], records: list[dict]) -> dict:
    """What ``run.json`` records of the training set: the source, each file's absolute path and SHA-256, the
    number of records trained on and the SHA-256 of those records (canonical JSON), which also identifies a
    generated set."""
    from ..io import sha256_file

    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False).encode()
    return {"source": d.source, "files": [{"path": str(p.resolve()), "sha256": sha256_file(p)} for p in files],
            "records": len(records), "records_sha256": hashlib.sha256(canonical).hexdigest(),
            **({"seed": d.seed} if d.source == SYNTHETIC else {})}
