"""The evaluation sets: LLM-Adapters' Math10K test files and the synthetic families of the embedded tiny model.

Real sets are read from a data directory laid out like LLM-Adapters' ``dataset/`` folder (``gsm8k/test.json``,
``SVAMP/test.json``, ``mawps/test.json``, ``AQuA/test.json``, ...; JSON arrays of ``{instruction, input, output,
answer}``), given by ``--data-dir`` or the ``LOWBIT_DATA_DIR`` environment variable. Synthetic sets
(``synthetic-gsm8k``, ``synthetic-svamp``, ``synthetic-mawps``, ``synthetic-aqua``) need no files: they are the
test split of :mod:`lowbit.data.synthetic` (``test_split(family, n, seed)``, 500 problems unless ``--limit``),
the problems the tiny model's fine-tuning data excludes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "LOWBIT_DATA_DIR"
SYNTHETIC_PREFIX = "synthetic-"
SYNTHETIC_N = 500  # the size of make_dataset's test files

# name -> (folder in the data directory, display name in tables). GSM8K, SVAMP, MAWPS, AQuA are the paper's four;
# AddSub/MultiArith/SingleEq overlap math_10k's MAWPS training data (shared/data/README.md): report with care.
REAL_SETS = {"gsm8k": ("gsm8k", "GSM8K"), "svamp": ("SVAMP", "SVAMP"), "mawps": ("mawps", "MAWPS"),
             "aqua": ("AQuA", "AQuA"), "addsub": ("AddSub", "AddSub"), "multiarith": ("MultiArith", "MultiArith"),
             "singleeq": ("SingleEq", "SingleEq")}
SYNTHETIC_FAMILIES = ("gsm8k", "svamp", "mawps", "aqua")  # = lowbit.data.synthetic.FAMILIES
PAPER_SETS = ("gsm8k", "svamp", "mawps", "aqua")


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # canonical name, e.g. "gsm8k" or "synthetic-aqua"; also the stem of its JSONL file
    display: str  # column title, e.g. "GSM8K" or "syn-AQuA"
    kind: str  # "numeric" or "choice"
    path: Path | None = None  # the test.json of a real set
    family: str | None = None  # the family of a synthetic set


def kind_of(dataset: str) -> str:
    """``"choice"`` for AQuA (real or synthetic), else ``"numeric"``."""
    return "choice" if dataset.lower().removeprefix(SYNTHETIC_PREFIX) == "aqua" else "numeric"


def known_datasets() -> list[str]:
    return list(REAL_SETS) + [SYNTHETIC_PREFIX + f for f in SYNTHETIC_FAMILIES]


def display_name(name: str) -> str:
    if name.startswith(SYNTHETIC_PREFIX):
        return "syn-" + display_name(name.removeprefix(SYNTHETIC_PREFIX))
    return REAL_SETS[name][1] if name in REAL_SETS else name


def _find_test_file(data_dir: Path, folder: str) -> Path:
    exact = data_dir / folder / "test.json"
    if exact.is_file():
        return exact
    for child in sorted(data_dir.iterdir()):  # tolerate another capitalisation of the folder (svamp/, aqua/)
        if child.name.lower() == folder.lower() and (child / "test.json").is_file():
            return child / "test.json"
    return exact


def resolve_datasets(names: list[str], data_dir: str | Path | None = None) -> list[DatasetSpec]:
    """Check dataset names and files -> one spec per distinct name, in the given order.

    Raises ``ValueError`` naming the bad value and the fix: an unknown name, no data directory for a real set
    (neither ``data_dir`` nor ``$LOWBIT_DATA_DIR``), a data directory that does not exist, a missing test file.
    """
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not names:
        raise ValueError(f"no dataset given; pass --datasets with names from {', '.join(known_datasets())}")
    unknown = [n for n in names if n not in known_datasets()]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(known_datasets())} "
                         f"(comma-separated)")
    real = [n for n in names if n in REAL_SETS]
    root = None
    if real:
        given = data_dir or os.environ.get(DATA_DIR_ENV)
        if not given:
            raise ValueError(f"dataset {real[0]!r} is read from a data directory, but none was given; pass "
                             f"--data-dir DIR (a folder holding gsm8k/test.json, SVAMP/test.json, mawps/test.json, "
                             f"AQuA/test.json, like LLM-Adapters' dataset/ folder) or set {DATA_DIR_ENV}=DIR. "
                             f"The embedded tiny model's sets need no files: "
                             f"{', '.join(SYNTHETIC_PREFIX + f for f in SYNTHETIC_FAMILIES)}")
        root = Path(given).expanduser()
        if not root.is_dir():
            src = "--data-dir" if data_dir else DATA_DIR_ENV
            raise ValueError(f"{src} {str(given)!r} is not a directory; point it at the folder holding "
                             f"gsm8k/test.json, SVAMP/test.json, mawps/test.json and AQuA/test.json")
    specs = []
    for n in names:
        if n in REAL_SETS:
            path = _find_test_file(root, REAL_SETS[n][0])
            if not path.is_file():
                raise ValueError(f"dataset {n!r}: {path} not found; the data directory {str(root)!r} must hold "
                                 f"{REAL_SETS[n][0]}/test.json (LLM-Adapters' dataset/{REAL_SETS[n][0]}/test.json) "
                                 f"— fix --data-dir/{DATA_DIR_ENV} or drop {n!r} from --datasets")
            specs.append(DatasetSpec(n, display_name(n), kind_of(n), path=path))
        else:
            specs.append(DatasetSpec(n, display_name(n), kind_of(n), family=n.removeprefix(SYNTHETIC_PREFIX)))
    return specs


def load_records(spec: DatasetSpec, limit: int | None = None, synthetic_seed: int = 0) -> list[dict]:
    """The first ``limit`` (default all; synthetic: 500) records ``{instruction, input, output, answer}``."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if spec.family is not None:
        from .synthetic import test_split

        return test_split(spec.family, limit or SYNTHETIC_N, seed=synthetic_seed)
    try:
        records = json.loads(spec.path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset {spec.name!r}: {spec.path} is not valid JSON ({e}); expected a JSON array of "
                         f"{{instruction, input, output, answer}} records") from None
    if not isinstance(records, list):
        raise ValueError(f"dataset {spec.name!r}: {spec.path} holds a {type(records).__name__}, expected a JSON array "
                         f"of {{instruction, input, output, answer}} records")
    records = records[:limit]
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "answer" not in r:
            raise ValueError(f"dataset {spec.name!r}: record {i} of {spec.path} lacks 'instruction' or 'answer' "
                             f"(got {r if not isinstance(r, dict) else sorted(r)})")
    return records
