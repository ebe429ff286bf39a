"""The evaluation-set registry: LLM-Adapters' Math10K test files and the synthetic families of the tiny model.

Every evaluation set is registered once with :func:`register_eval_set`: its name (as given to
``lowbit evaluate --datasets``), its column title, its answer kind (``"numeric"`` or ``"choice"``) and where its
records come from -- a ``folder`` of the data directory holding ``test.json`` (LLM-Adapters layout, read by
:func:`lowbit.data.records.load_llm_adapters_json`, the same reader as the training data), or a
``loader(limit, seed) -> records`` for a set that needs no files, or a ``reader(data_dir) -> records`` with the
``files`` it reads there (the validation splits carved from the training files, :mod:`lowbit.data.validation`).
Adding a set is one module holding its loader plus one registration; the test sets and the synthetic ones are
registered at the end of this file.

Real sets are read from a data directory laid out like LLM-Adapters' ``dataset/`` folder (``gsm8k/test.json``,
``SVAMP/test.json``, ``mawps/test.json``, ``AQuA/test.json``, ...; JSON arrays of ``{instruction, input, output,
answer}``): ``--data-dir``, else the ``LOWBIT_DATA_DIR`` environment variable, else ``../shared/data`` beside
the checkout when that folder exists (:func:`default_data_dir`). Synthetic sets (``synthetic-gsm8k``,
``synthetic-svamp``, ``synthetic-mawps``, ``synthetic-aqua``) need no files: they are the test split of
:mod:`lowbit.data.synthetic` (``test_split(family, n, seed)``, 500 problems unless ``--limit``), the problems the
tiny model's fine-tuning data excludes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .mawps import equation_rationales
from .records import Record, llm_adapters_records, load_llm_adapters_json
from .synthetic import FAMILIES, test_split, validation_split

__all__ = [
    "ALL_TEST_SETS",
    "DATA_DIR_ENV",
    "PAPER_TEST_SETS",
    "DatasetSpec",
    "EvalSet",
    "default_data_dir",
    "display_name",
    "eval_set",
    "kind_of",
    "check_limit",
    "known_datasets",
    "load_records",
    "load_test_sets",
    "register_eval_set",
    "resolve_datasets",
    "unregister_eval_set",
]

DATA_DIR_ENV = "LOWBIT_DATA_DIR"
#: The repository root: the folder holding the ``lowbit`` package.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The default data directory, ``../shared/data`` beside the checkout (used only when it exists).
CHECKOUT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SYNTHETIC_PREFIX = "synthetic-"
VALIDATION_SUFFIX = "-val"
SYNTHETIC_N = 500  # the size of make_dataset's test files
KINDS = ("numeric", "choice")
#: The fields an evaluation record must have (``input`` and ``output`` default to ``""``).
TEST_REQUIRED = ("instruction", "answer")
#: The four sets of the paper tables: the default of ``lowbit evaluate`` and of the training-set overlap check.
PAPER_TEST_SETS = ("gsm8k", "svamp", "mawps", "aqua")

Loader = Callable[[int | None, int], list[dict]]
Reader = Callable[[Path], list[dict]]
References = Callable[[list[Record], Path], list[Record]]


@dataclass(frozen=True)
class EvalSet:
    """One registered evaluation set: read from ``<data dir>/<folder>/test.json``, made by ``loader``, or made by
    ``reader`` from the ``files`` (relative paths) of the data directory."""

    name: str
    display: str
    kind: str
    folder: str | None = None
    loader: Loader | None = None
    references: References | None = None
    reader: Reader | None = None
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """An evaluation set resolved for one run: its name, title, answer kind and test file (real sets)."""

    name: str  # canonical name, e.g. "gsm8k" or "synthetic-aqua"; also the stem of its JSONL file
    display: str  # column title, e.g. "GSM8K" or "syn-AQuA"
    kind: str  # "numeric" or "choice"
    path: Path | None = None  # the test.json of a real set
    family: str | None = None  # the family of a synthetic set
    data_dir: Path | None = None  # the data directory of a set made by a reader


_REGISTRY: dict[str, EvalSet] = {}


def register_eval_set(name: str, *, display: str | None = None, kind: str = "numeric", folder: str | None = None,
                      loader: Loader | None = None, references: References | None = None,
                      reader: Reader | None = None, files: Sequence[str] = (), replace: bool = False):
    """Register the evaluation set ``name`` (lowercase, no commas or spaces) -> its :class:`EvalSet`.

    ``display``: the column title (default ``name``); ``kind``: ``"numeric"`` (the last number of a generation
    is compared with the label) or ``"choice"`` (an option letter A-E). Its records come either from
    ``<data dir>/<folder>/test.json``, from ``loader(limit, seed) -> records`` (``limit`` None: the set's default
    size; ``seed``: ``--synthetic-seed``) or from ``reader(data_dir) -> records``, which reads ``files`` (paths
    relative to the data directory, checked by :func:`resolve_datasets`). With none of them, returns a decorator
    that registers the function it decorates as the loader. ``references(records, test_file) -> records`` fills the
    reference responses (``output``) the held-out response loss scores, for a test file that ships none (MAWPS's
    rationales come from its equations). Raises ``ValueError`` for a bad name or kind, for more than one of
    ``folder``, ``loader`` and ``reader``, or for a name already registered (unless ``replace``).
    """
    if not name or name != name.strip().lower() or any(c in name for c in ", \t\n"):
        raise ValueError(f"evaluation-set name {name!r} must be non-empty, lowercase, without commas or spaces")
    if kind not in KINDS:
        raise ValueError(f"evaluation set {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if sum(x is not None for x in (folder, loader, reader)) > 1:
        raise ValueError(f"evaluation set {name!r}: give a folder (test.json in the data directory), a loader or a "
                         f"reader (of files in the data directory), not both")
    if name in _REGISTRY and not replace:
        raise ValueError(f"evaluation set {name!r} is already registered (pass replace=True to redefine it)")
    if folder is None and loader is None and reader is None:
        def decorator(fn: Loader) -> Loader:
            register_eval_set(name, display=display, kind=kind, loader=fn, references=references, replace=replace)
            return fn

        return decorator
    entry = EvalSet(name, display or name, kind, folder=folder, loader=loader, references=references,
                    reader=reader, files=tuple(files))
    _REGISTRY[name] = entry
    return entry


def unregister_eval_set(name: str) -> EvalSet:
    """Remove a registered set (e.g. one a test registered) -> its entry; ``ValueError`` if it is not registered."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise ValueError(f"evaluation set {name!r} is not registered") from None


def eval_set(name: str) -> EvalSet:
    """The registered set called ``name``, or whose folder is ``name`` (case-insensitive); ``ValueError`` if none."""
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    for s in _REGISTRY.values():
        if s.folder is not None and s.folder.lower() == key:
            return s
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(known_datasets())}")


def kind_of(dataset: str) -> str:
    """The answer kind of a set: ``"choice"`` for AQuA (real or synthetic), else ``"numeric"`` (also for a name
    that is not registered)."""
    s = _REGISTRY.get(dataset.strip().lower())
    return s.kind if s is not None else "numeric"


def known_datasets() -> list[str]:
    """Every registered name, in registration order (the real sets first)."""
    return list(_REGISTRY)


def display_name(name: str) -> str:
    """The column title of a set (``"GSM8K"``, ``"syn-AQuA"``); an unregistered name is its own title."""
    if name in _REGISTRY:
        return _REGISTRY[name].display
    if name.startswith(SYNTHETIC_PREFIX):
        return "syn-" + display_name(name.removeprefix(SYNTHETIC_PREFIX))
    return name


def _file_free() -> list[str]:
    return [n for n, s in _REGISTRY.items() if s.folder is None and s.reader is None]


def _layout() -> str:
    """``gsm8k/test.json, SVAMP/test.json, ...``: the files of the paper's sets in a data directory."""
    return ", ".join(f"{_REGISTRY[n].folder}/test.json" for n in PAPER_TEST_SETS)


def default_data_dir() -> Path | None:
    """Where real sets are read when no directory is given: ``$LOWBIT_DATA_DIR`` if set (existing or not), else
    ``../shared/data`` beside the checkout (:data:`CHECKOUT_DATA_DIR`) when it exists, else None."""
    given = os.environ.get(DATA_DIR_ENV)
    if given:
        return Path(given).expanduser()
    return CHECKOUT_DATA_DIR if CHECKOUT_DATA_DIR.is_dir() else None


def _find_test_file(data_dir: Path, folder: str) -> Path:
    exact = data_dir / folder / "test.json"
    if exact.is_file() or not data_dir.is_dir():
        return exact
    for child in sorted(data_dir.iterdir()):  # tolerate another capitalisation of the folder (svamp/, aqua/)
        if child.name.lower() == folder.lower() and (child / "test.json").is_file():
            return child / "test.json"
    return exact


def resolve_datasets(names: list[str], data_dir: str | Path | None = None) -> list[DatasetSpec]:
    """Check dataset names and files -> one spec per distinct name, in the given order.

    Real sets are read from ``data_dir``, else :func:`default_data_dir`. Raises ``ValueError`` naming the bad value
    and the fix: an unknown name, no data directory for a real set, a data directory that does not exist, a
    missing test file.
    """
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not names:
        raise ValueError(f"no dataset given; pass --datasets with names from {', '.join(known_datasets())}")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(known_datasets())} "
                         f"(comma-separated)")
    real = [n for n in names if n not in _file_free()]
    root = None
    if real:
        given = data_dir or default_data_dir()
        if not given:
            raise ValueError(f"dataset {real[0]!r} is read from a data directory, but none was given; pass "
                             f"--data-dir DIR (a folder holding {_layout()}, like LLM-Adapters' dataset/ folder) "
                             f"or set {DATA_DIR_ENV}=DIR (the default, {CHECKOUT_DATA_DIR} beside the checkout, "
                             f"does not exist). The embedded tiny model's sets need no files: "
                             f"{', '.join(_file_free())}")
        root = Path(given).expanduser()
        if not root.is_dir():
            src = "--data-dir" if data_dir else DATA_DIR_ENV if os.environ.get(DATA_DIR_ENV) else "the data directory"
            raise ValueError(f"{src} {str(given)!r} is not a directory; point it at the folder holding {_layout()}")
    specs = []
    for n in names:
        s = _REGISTRY[n]
        if s.folder is not None:
            path = _find_test_file(root, s.folder)
            if not path.is_file():
                raise ValueError(f"dataset {n!r}: {path} not found; the data directory {str(root)!r} must hold "
                                 f"{s.folder}/test.json (LLM-Adapters' dataset/{s.folder}/test.json) "
                                 f"— fix --data-dir/{DATA_DIR_ENV} or drop {n!r} from --datasets")
            specs.append(DatasetSpec(n, s.display, s.kind, path=path))
        elif s.reader is not None:
            missing = [f for f in s.files if not (root / f).is_file()]
            if missing:
                raise ValueError(f"dataset {n!r}: {root / missing[0]} not found; {n!r} is made from "
                                 f"{', '.join(s.files)} in the data directory {str(root)!r} — fix "
                                 f"--data-dir/{DATA_DIR_ENV} or drop {n!r} from --datasets")
            specs.append(DatasetSpec(n, s.display, s.kind, data_dir=root))
        else:
            family = (n.removeprefix(SYNTHETIC_PREFIX).removesuffix(VALIDATION_SUFFIX)
                      if n.startswith(SYNTHETIC_PREFIX) else None)
            specs.append(DatasetSpec(n, s.display, s.kind, family=family))
    return specs


def load_records(spec: DatasetSpec, limit: int | None = None, synthetic_seed: int = 0) -> list[Record]:
    """The first ``limit`` (default all; synthetic: 500) records ``{instruction, input, output, answer}``.

    Raises ``ValueError`` starting with ``dataset '<name>':`` for a test file that is not a JSON array of records
    with a string ``instruction`` and ``answer`` (naming the file, record and field), or an unregistered set.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    try:
        if spec.path is not None:
            return load_llm_adapters_json(spec.path, required=TEST_REQUIRED)[:limit]
        s = _REGISTRY.get(spec.name)
        if s is not None and s.reader is not None and spec.data_dir is not None:
            return llm_adapters_records(s.reader(spec.data_dir)[:limit], Path(f"<{spec.name} reader>"),
                                        required=TEST_REQUIRED)
        if s is None or s.loader is None:
            raise ValueError(f"not a registered set without files; choose from {', '.join(_file_free())}")
        records = s.loader(limit, synthetic_seed)
        if not isinstance(records, list):
            raise ValueError(f"its loader returned a {type(records).__name__}, expected a list of records")
        return llm_adapters_records(records[:limit], Path(f"<{spec.name} loader>"), required=TEST_REQUIRED)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"dataset {spec.name!r}: {e}") from None


def load_reference_records(spec: DatasetSpec, limit: int | None = None, synthetic_seed: int = 0) -> list[Record]:
    """:func:`load_records`, with the reference responses filled in by the set's ``references`` hook when it has
    one (what the held-out response loss scores)."""
    records = load_records(spec, limit, synthetic_seed)
    s = _REGISTRY.get(spec.name)
    if s is not None and s.references is not None and spec.path is not None:
        try:
            records = s.references(records, spec.path)
        except ValueError as e:
            raise ValueError(f"dataset {spec.name!r}: {e}") from None
    return records


def load_test_sets(data_dir: str | Path, names: Sequence[str] = PAPER_TEST_SETS) -> dict[str, list[Record]]:
    """``{folder: records of data_dir/<folder>/test.json}`` for the sets ``names`` (registered names or folders).

    Raises ``FileNotFoundError`` for a missing test file, ``ValueError`` for a set that is not read from files.
    """
    data_dir = Path(data_dir)
    out = {}
    for name in names:
        s = eval_set(name)
        if s.folder is None:
            raise ValueError(f"evaluation set {s.name!r} has no test file; name a set read from the data directory")
        path = _find_test_file(data_dir, s.folder)
        if not path.is_file():
            raise FileNotFoundError(f"test set {path} not found")
        out[s.folder] = load_llm_adapters_json(path, required=TEST_REQUIRED)
    return out


# ------------------------------------------------------------------------------------------ the built-in sets
# LLM-Adapters' seven arithmetic test sets. GSM8K, SVAMP, MAWPS and AQuA are the paper's four; AddSub, MultiArith
# and SingleEq largely overlap the MAWPS training data (see lowbit.data.loaders): report them with care.
register_eval_set("gsm8k", display="GSM8K", folder="gsm8k")
register_eval_set("svamp", display="SVAMP", folder="SVAMP")
register_eval_set("mawps", display="MAWPS", folder="mawps", references=equation_rationales)
register_eval_set("aqua", display="AQuA", kind="choice", folder="AQuA")
register_eval_set("addsub", display="AddSub", folder="AddSub")
register_eval_set("multiarith", display="MultiArith", folder="MultiArith")
register_eval_set("singleeq", display="SingleEq", folder="SingleEq")
#: All registered sets read from files (the seven above).
ALL_TEST_SETS = tuple(n for n, s in _REGISTRY.items() if s.folder is not None)


def check_limit(name: str, limit: int | None) -> None:
    """Refuse reading more of a synthetic test set than the tiny model's training and validation data exclude (the
    first ``SYNTHETIC_N`` problems): past them a test problem may equal a training problem."""
    if name.startswith(SYNTHETIC_PREFIX) and not name.endswith(VALIDATION_SUFFIX) and limit is not None \
            and limit > SYNTHETIC_N:
        raise ValueError(f"dataset {name!r}: limit {limit} is beyond the {SYNTHETIC_N} test problems the training "
                         f"and validation data exclude (problems past {SYNTHETIC_N} may equal training problems); "
                         f"use limit <= {SYNTHETIC_N}")


def _synthetic_loader(family: str) -> Loader:
    def load(limit: int | None, seed: int) -> list[dict]:
        check_limit(SYNTHETIC_PREFIX + family, limit)
        return test_split(family, limit or SYNTHETIC_N, seed=seed)

    return load


def _validation_loader(family: str) -> Loader:
    def load(limit: int | None, seed: int) -> list[dict]:
        return validation_split(family, limit or SYNTHETIC_N, seed=seed)

    return load


# The synthetic families of the embedded tiny model, titled and scored like the real set they mirror, and their
# validation splits (``synthetic-<family>-val``: training distribution, disjoint from the test and training sets)
# for model selection.
for _family in FAMILIES:
    register_eval_set(SYNTHETIC_PREFIX + _family, display="syn-" + display_name(_family), kind=kind_of(_family),
                      loader=_synthetic_loader(_family))
for _family in FAMILIES:
    register_eval_set(SYNTHETIC_PREFIX + _family + VALIDATION_SUFFIX, display="val-" + display_name(_family),
                      kind=kind_of(_family), loader=_validation_loader(_family))
del _family
