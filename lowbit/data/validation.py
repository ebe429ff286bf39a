"""Validation splits carved from the real training files: the evaluation sets ``gsm8k-val`` and ``mawps-val``.

Learning rates, and any other choice made by comparing runs, are picked on a validation split, never on a test
record. These two are fixed slices of the training files of the data directory (``$LOWBIT_DATA_DIR``, default
``../shared/data`` beside the checkout), read without network:

* ``gsm8k-val``: the last :data:`VALIDATION_N` (300) records of ``gsm8k_openai/train.jsonl`` (GSM8K train, read
  by :func:`lowbit.data.gsm8k.load_gsm8k_jsonl`: the question, its answer, and GSM8K's own worked solution as the
  reference ``output`` the response loss scores) -- lines 7,174 to 7,473 of the shipped file;
* ``mawps-val``: the last 300 usable records of ``mawps/trainset.json`` (MAWPS train, read by
  :func:`lowbit.data.mawps.load_mawps_train`, which drops the 20 records whose equation is broken and writes each
  ``output`` from the checked equation) whose question is in no test file.

The definition (:func:`select_last`): scanning a training file from its end, a record joins the slice unless its
question (:func:`lowbit.data.records.question_key`: lowercase, letters and digits) is in one of the seven test
files of the data directory (:data:`lowbit.data.testsets.ALL_TEST_SETS`: gsm8k, SVAMP, mawps, AQuA, AddSub,
MultiArith, SingleEq; all seven must exist) or is already in the slice, until it holds 300 records. A record that
is also a test question is therefore *left out of the slice* rather than scored: GSM8K train shares no question
with a test file, so ``gsm8k-val`` is simply the last 300 lines; MAWPS train repeats many test questions (most of
AddSub, MultiArith and SingleEq, and 27 of mawps), so ``mawps-val`` skips them: its 300 records are usable records
969 to 1,878 of the shipped file less the 604 test questions among them. Both sets are in file order.

Held out: :func:`held_out_keys` (the questions of both slices) is the one definition of what training and
calibration never read. The ``gsm8k-mawps`` training pool (:func:`lowbit.data.loaders.default_math_training_set`)
drops every record whose question is one of them (300 GSM8K records; 319 MAWPS records, as MAWPS repeats some
questions), before any sampling, so whatever ``num_examples`` and seed; calibration text read from either
training file (:func:`lowbit.data.calibration.load_texts`, e.g. ``data:gsm8k_openai/train.jsonl``) drops the same
records before its windows are cut (:func:`drop_held_out`). Other training data is untouched: the synthetic task,
a file path, and ``math10k`` -- LLM-Adapters' ``math_10k.json`` is built from GSM8K and MAWPS train, so a run
trained on it may have seen validation questions; tune such runs on a split of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .gsm8k import load_gsm8k_jsonl
from .mawps import load_mawps_train
from .records import Record, load_llm_adapters_json, question_key
from .testsets import ALL_TEST_SETS, DATA_DIR_ENV, TEST_REQUIRED, eval_set, register_eval_set

__all__ = [
    "GSM8K_TRAIN_RELPATH",
    "MAWPS_TRAIN_RELPATH",
    "VALIDATION_N",
    "VALIDATION_SETS",
    "drop_held_out",
    "held_out_keys",
    "select_last",
    "split_files",
    "training_file_data_dir",
    "validation_split",
]

#: The training files, relative to the data directory.
GSM8K_TRAIN_RELPATH = Path("gsm8k_openai") / "train.jsonl"
MAWPS_TRAIN_RELPATH = Path("mawps") / "trainset.json"
#: Records per validation set.
VALIDATION_N = 300
#: Each validation set: the training file it is carved from and that file's reader.
VALIDATION_SETS: dict[str, tuple[Path, Callable[[Path], list[Record]]]] = {
    "gsm8k-val": (GSM8K_TRAIN_RELPATH, load_gsm8k_jsonl),
    "mawps-val": (MAWPS_TRAIN_RELPATH, load_mawps_train),
}


def split_relpaths() -> list[Path]:
    """The files the split is made from, relative to the data directory: the two training files, then the seven
    test files (``gsm8k/test.json``, ``SVAMP/test.json``, ...)."""
    return [rel for rel, _ in VALIDATION_SETS.values()] + [Path(eval_set(n).folder) / "test.json"
                                                            for n in ALL_TEST_SETS]


def split_files(data_dir: str | Path) -> list[Path]:
    """:func:`split_relpaths` under ``data_dir``; ``FileNotFoundError`` naming the first missing file and the fix."""
    root = Path(data_dir)
    files = [root / rel for rel in split_relpaths()]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"the validation split ({', '.join(VALIDATION_SETS)}, held out of the training files) is made from "
                f"{f}, which does not exist (data directory {root}); it needs GSM8K and MAWPS train "
                f"({GSM8K_TRAIN_RELPATH}, {MAWPS_TRAIN_RELPATH}) and the seven test files its records must not be "
                f"({', '.join(str(p) for p in split_relpaths()[2:])}): point {DATA_DIR_ENV} (or --data-dir, "
                f"data.data_dir) at a folder holding them")
    return files


def select_last(records: Sequence[Record], exclude: Iterable[str], n: int = VALIDATION_N) -> list[Record]:
    """The last ``n`` records (in file order) whose question (:func:`question_key`) is not in ``exclude`` (the
    test questions), one record per question: scanning from the end, a record whose question was already taken
    is skipped. Fewer than ``n`` when the file has fewer such records."""
    exclude, taken, out = set(exclude), set(), []
    for r in reversed(records):
        k = question_key(r)
        if k in exclude or k in taken:
            continue
        taken.add(k)
        out.append(r)
        if len(out) == n:
            break
    return out[::-1]


# (VALIDATION_N, then each split file's resolved path, size and mtime) -> the split: training, calibration and each
# validation set ask for it, and building it reads ~6 MB of JSON.
_CACHE: dict[tuple, dict[str, tuple[Record, ...]]] = {}


def validation_split(data_dir: str | Path) -> dict[str, list[Record]]:
    """``{"gsm8k-val": records, "mawps-val": records}`` of the data directory (the module docstring defines
    them); records are Math10K records ``{instruction, input, output, answer}``. Raises ``FileNotFoundError``
    (:func:`split_files`) when a file is missing."""
    files = split_files(data_dir)
    stamp = (VALIDATION_N, *((str(f.resolve()), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)))
    if stamp not in _CACHE:
        tests = {question_key(r) for f in files[len(VALIDATION_SETS):]
                 for r in load_llm_adapters_json(f, required=TEST_REQUIRED)}
        _CACHE.clear()
        _CACHE[stamp] = {name: tuple(select_last(read(f), tests, VALIDATION_N))
                         for (name, (_, read)), f in zip(VALIDATION_SETS.items(), files[:len(VALIDATION_SETS)],
                                                         strict=True)}
    return {name: [dict(r) for r in recs] for name, recs in _CACHE[stamp].items()}


def held_out_keys(data_dir: str | Path) -> frozenset[str]:
    """The questions (:func:`question_key`) of every validation record of the data directory: the one list of
    what the ``gsm8k-mawps`` training pool and calibration text from the training files leave out."""
    return frozenset(question_key(r) for recs in validation_split(data_dir).values() for r in recs)


def drop_held_out(records: Sequence[Any], data_dir: str | Path) -> list[Any]:
    """``records`` (Math10K records, or raw GSM8K / MAWPS train records) without those whose question is held out
    for validation (:func:`held_out_keys` of ``data_dir``), in their order."""
    keys = held_out_keys(data_dir)
    return [r for r in records if not (isinstance(r, Mapping) and question_key(r) in keys)]


def training_file_data_dir(path: str | Path) -> Path | None:
    """The data directory whose training file ``path`` is (``<dir>/gsm8k_openai/train.jsonl`` or
    ``<dir>/mawps/trainset.json``, by its last two path components), else None."""
    p = Path(path).expanduser().absolute()
    for rel, _ in VALIDATION_SETS.values():
        if p.parts[-len(rel.parts):] == rel.parts:
            return p.parents[len(rel.parts) - 1]
    return None


def _reader(name: str) -> Callable[[Path], list[Record]]:
    def read(data_dir: Path) -> list[Record]:
        return validation_split(data_dir)[name]

    return read


# Titled like the test set of the same source (``GSM8K-val``, ``MAWPS-val``; ``val-GSM8K`` is the synthetic one).
for _name in VALIDATION_SETS:
    register_eval_set(_name, display=eval_set(_name.removesuffix("-val")).display + "-val", reader=_reader(_name),
                      files=[p.as_posix() for p in split_relpaths()])
del _name
