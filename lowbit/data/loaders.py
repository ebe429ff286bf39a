"""Training data of the Math10K setting: one entry point per source, mixing, test-set overlap, the substitute.

Formats read (all into Math10K records ``{"instruction", "input", "output", "answer"}``, see :mod:`.records`)
---------------------------------------------------------------------------------------------------------
* **LLM-Adapters JSON** (``math_10k.json``): :func:`lowbit.data.records.load_llm_adapters_json`, the same reader
  as the evaluation sets' ``test.json`` files.
* **OpenAI GSM8K JSONL** (``grade_school_math/data/train.jsonl``): :func:`lowbit.data.gsm8k.load_gsm8k_jsonl`,
  which strips the calculator annotations and ends each solution with ``"The answer is N."``.
* **MAWPS train format** (``dataset/mawps/trainset.json``): :func:`lowbit.data.mawps.load_mawps_train`, which
  writes a rationale from each record's equation.

:func:`load_source` reads any of them (format given, or told from the file). Numbers written by the converters go
through :func:`lowbit.data.records.format_number` (``8.0`` -> ``"8"``, at most 4 decimals); the ``answer`` field
always equals the number in the closing ``"The answer is X."`` sentence.

The substitute for the missing Math10K training set
---------------------------------------------------
``math_10k.json`` (GSM8K + MAWPS + 1,000 AQuA rationales, about 10K records) is not in the local data directory.
:func:`default_math_training_set` reads it (``source="math10k"``) and fails when it is absent; the documented
substitute **GSM8K train (7,473) + MAWPS train (1,878 usable)** is read only when named (``source="gsm8k-mawps"``),
never as a fallback: 8,705 records once the validation split is held out (300 GSM8K and 319 MAWPS records, whose
questions are ``gsm8k-val`` and ``mawps-val``; :mod:`lowbit.data.validation`) and the overlap filter below has
dropped 27. It lacks Math10K's 1,000 AQuA-style multiple-choice examples, and has GSM8K's own terse rationales
instead of Math10K's generated ones.

Test sets are never trained on: :func:`find_test_overlap` compares questions after lowercasing and removing
everything but letters and digits (whitespace, punctuation and its spacing: MAWPS writes ``"cost ?"``, the
test sets ``"cost?"``). GSM8K train shares no question with any of the seven test sets; MAWPS train shares 27
records (28 test questions) with ``mawps/test.json`` and none with GSM8K, SVAMP or AQuA; those 27 are dropped by
default. MAWPS train also holds most of AddSub (326/395 test questions), MultiArith (490/600) and SingleEq
(426/508) -- as the real Math10K does, which is why LLM-Adapters evaluates on MAWPS instead of those three;
``test_sets=ALL_TEST_SETS`` drops those records too (it keeps 653 of the 1,878 MAWPS records, the default 1,851).
The test sets are read through the evaluation-set registry (:func:`lowbit.data.testsets.load_test_sets`), which
also defines ``PAPER_TEST_SETS`` and ``ALL_TEST_SETS``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gsm8k import load_gsm8k_jsonl
from .mawps import load_mawps_train, mawps_records
from .records import (
    FIELDS,
    MAWPS_FIELDS,
    REQUIRED,
    Record,
    llm_adapters_records,
    load_llm_adapters_json,
    normalize_question,
    question_key,
    read_json_array,
)
from .testsets import PAPER_TEST_SETS, load_test_sets
from .validation import GSM8K_TRAIN_RELPATH, MAWPS_TRAIN_RELPATH, VALIDATION_SETS, drop_held_out

if TYPE_CHECKING:  # datasets is imported lazily: the readers are plain Python
    import datasets

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "check_no_test_overlap",
    "default_math_training_set",
    "find_test_overlap",
    "load_gsm8k_jsonl",
    "load_source",
    "mix_sources",
    "normalize_question",
    "training_set_files",
]

#: Where LLM-Adapters keeps the training set, relative to the data directory.
MATH10K_RELPATH = Path("ft-training_set") / "math_10k.json"
#: The named Math10K-setting training sets: the real one, and the substitute read only when named.
MATH10K, SUBSTITUTE = "math10k", "gsm8k-mawps"
TRAINING_SETS = (MATH10K, SUBSTITUTE)


# -------------------------------------------------------------------------------------- dispatch and mixing
FORMATS = ("llm-adapters", "gsm8k", "mawps")


def load_source(spec: str | Path | Mapping[str, Any]) -> list[Record]:
    """Load one training source: a path, or ``{"path": ..., "format": "llm-adapters" | "gsm8k" | "mawps"}``.

    Without ``format``: ``.jsonl`` is GSM8K; a ``.json`` array is MAWPS when its first record has
    ``original_text`` and ``equation``, otherwise LLM-Adapters.
    """
    fmt = None
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", "format"}
        if "path" not in spec or unknown:
            raise ValueError(f"a source spec is a path or {{'path': ..., 'format': ...}}, got keys {sorted(spec)}")
        path, fmt = Path(spec["path"]), spec.get("format")
    else:
        path = Path(spec)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r} for {path}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"training source {path} not found")
    if fmt is None and path.suffix == ".jsonl":
        fmt = "gsm8k"
    if fmt == "gsm8k":
        return load_gsm8k_jsonl(path)
    if fmt is None and path.suffix != ".json":
        raise ValueError(f"cannot tell the format of {path} from its extension; pass {{'path': ..., 'format': one of "
                         f"{', '.join(FORMATS)}}}")
    data = read_json_array(path)
    if fmt is None:
        first = data[0] if isinstance(data[0], dict) else {}
        fmt = "mawps" if all(k in first for k in MAWPS_FIELDS[:2]) else "llm-adapters"  # original_text, equation
    return mawps_records(data, path) if fmt == "mawps" else llm_adapters_records(data, path)


def _take(records: list[Record], amount: int | float | None, rng: random.Random) -> list[Record]:
    """``None``: all; an int ``n``: at most ``n`` drawn without replacement; a float ``w``: ``round(w * len)``
    records -- ``w <= 1`` subsamples, ``w > 1`` repeats the whole set ``int(w)`` times plus a sample."""
    if amount is None:
        return list(records)
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
        raise ValueError(f"a source's amount must be None, an int max_n >= 0 or a float weight >= 0, got {amount!r}")
    if isinstance(amount, int):
        return rng.sample(records, min(amount, len(records)))
    k = round(amount * len(records))
    whole, rest = divmod(k, len(records))
    return list(records) * whole + rng.sample(records, rest)


def mix_sources(sources: Sequence[tuple[Sequence[Mapping[str, Any]], int | float | None]],
                seed: int = 0) -> datasets.Dataset:
    """Mix ``[(records, amount), ...]`` into one shuffled ``datasets.Dataset`` with columns ``FIELDS``.

    ``amount`` per source: ``None`` (all), an ``int`` maximum count (sampled without replacement) or a ``float``
    weight relative to the source's size (0.5: half of it, 2.0: every record twice). Deterministic for a seed.
    """
    import datasets

    rng = random.Random(seed)
    mixed: list[Record] = []
    for k, (records, amount) in enumerate(sources):
        if not records:
            raise ValueError(f"source {k} of mix_sources has no records")
        missing = next(((i, f) for i, r in enumerate(records) for f in REQUIRED if f not in r), None)
        if missing:
            raise ValueError(f"source {k} of mix_sources: record {missing[0]} lacks field {missing[1]!r}")
        rows = [{f: r.get(f, "") if f == "input" else r[f] for f in FIELDS} for r in records]
        mixed += _take(rows, amount, rng)
    if not mixed:
        raise ValueError("mix_sources produced no records (no sources, or every amount was 0)")
    rng.shuffle(mixed)
    return datasets.Dataset.from_list(mixed)


# ---------------------------------------------------------------------------------------- test-set overlap
def find_test_overlap(train_records: Iterable[Mapping[str, Any]],
                      test_records_by_name: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, list[int]]:
    """``{test set name: indices of training records whose question is in that set}`` (only sets that overlap).
    Questions are compared by :func:`normalize_question` of ``instruction`` + ``input``."""
    train_keys = [question_key(r) for r in train_records]
    overlap = {}
    for name, test in test_records_by_name.items():
        keys = {question_key(r) for r in test}
        hits = [i for i, k in enumerate(train_keys) if k in keys]
        if hits:
            overlap[name] = hits
    return overlap


def check_no_test_overlap(train_records: Sequence[Mapping[str, Any]],
                          test_records_by_name: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
    """Raise ``ValueError`` if any training question appears in a test set (counts and an example in the message)."""
    overlap = find_test_overlap(train_records, test_records_by_name)
    if overlap:
        name, hits = next(iter(overlap.items()))
        counts = ", ".join(f"{n}: {len(h)}" for n, h in overlap.items())
        raise ValueError(f"training records overlap test sets ({counts} training records); e.g. record {hits[0]} "
                         f"{train_records[hits[0]]['instruction']!r:.100} is in {name}")


def training_set_files(data_dir: str | Path, source: str = MATH10K, math10k_path: str | Path | None = None
                       ) -> list[Path]:
    """The files of training set ``source``: ``math10k``: ``math10k_path`` (default under ``data_dir``, see
    :data:`MATH10K_RELPATH`); ``gsm8k-mawps``: GSM8K and MAWPS train under ``data_dir``. ``FileNotFoundError``
    names a missing file; a ``math10k_path`` given to the substitute (it would be ignored) is a ``ValueError``."""
    if source not in TRAINING_SETS:
        raise ValueError(f"unknown training set {source!r}; choose one of {', '.join(TRAINING_SETS)}")
    if source == MATH10K:
        files = [Path(math10k_path) if math10k_path is not None else Path(data_dir) / MATH10K_RELPATH]
        if not files[0].is_file():
            raise FileNotFoundError(f"Math10K training set {files[0]} not found (LLM-Adapters' math_10k.json); put "
                                    f"the file there, or ask for the documented substitute GSM8K train + MAWPS "
                                    f"train by name: source={SUBSTITUTE!r}")
        return files
    if math10k_path is not None:
        raise ValueError(f"math10k_path={str(math10k_path)!r} is not read by the substitute {SUBSTITUTE!r}; pass "
                         f"source={MATH10K!r} to train on that file, or drop it")
    files = [Path(data_dir) / GSM8K_TRAIN_RELPATH, Path(data_dir) / MAWPS_TRAIN_RELPATH]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"the substitute training set {SUBSTITUTE!r} reads {f}, which is missing")
    return files


def default_math_training_set(data_dir: str | Path, math10k_path: str | Path | None = None, seed: int = 0,
                              test_sets: Sequence[str] = PAPER_TEST_SETS, on_overlap: str = "drop",
                              source: str = MATH10K) -> datasets.Dataset:
    """Training set ``source`` (files: :func:`training_set_files`; never one for the other) as a shuffled
    ``datasets.Dataset`` (columns ``FIELDS``). Training questions found in the ``test.json`` under ``data_dir`` of
    an evaluation set in ``test_sets`` (registered names such as ``"svamp"``, or their folders such as ``"SVAMP"``;
    reported by folder) are dropped (``on_overlap="drop"``, with a logged count), rejected (``"error"``) or kept
    with a warning (``"keep"``: to reproduce a published set exactly). Records with an empty ``output`` (nothing
    to learn) are dropped with a logged count. The substitute first leaves out every record whose question is in
    a validation set (:func:`lowbit.data.validation.drop_held_out`; it needs the seven test files).
    """
    if on_overlap not in ("drop", "error", "keep"):
        raise ValueError(f"on_overlap must be 'drop', 'error' or 'keep', got {on_overlap!r}")
    data_dir = Path(data_dir)
    files = training_set_files(data_dir, source, math10k_path)
    if source == MATH10K:
        log.info("training set: %s", files[0])
        records = load_llm_adapters_json(files[0])
    else:
        gsm, mawps = load_gsm8k_jsonl(files[0]), load_mawps_train(files[1])
        log.warning("training on the substitute %s: GSM8K train (%d) + MAWPS train (%d) from %s. It has no AQuA "
                    "multiple-choice examples (Math10K has 1,000), so AQuA accuracy is not comparable with the "
                    "paper tables.", SUBSTITUTE, len(gsm), len(mawps), data_dir)
        records = drop_held_out(gsm + mawps, data_dir)
        log.info("held out %d training records for the validation sets %s", len(gsm) + len(mawps) - len(records),
                 ", ".join(VALIDATION_SETS))
    try:
        tests = load_test_sets(data_dir, test_sets)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; the overlap check needs it (pass test_sets=() to skip the check, "
                                f"knowingly)") from None
    overlap = find_test_overlap(records, tests)
    if overlap:
        counts = ", ".join(f"{n}: {len(h)}" for n, h in overlap.items())
        if on_overlap == "error":
            check_no_test_overlap(records, tests)
        elif on_overlap == "keep":
            log.warning("keeping training records that are also test questions (%s)", counts)
        else:
            drop = {i for hits in overlap.values() for i in hits}
            records = [r for i, r in enumerate(records) if i not in drop]
            log.warning("dropped %d training records whose question is in a test set (%s)", len(drop), counts)
    empty = sum(not r["output"].strip() for r in records)
    if empty:
        records = [r for r in records if r["output"].strip()]
        log.warning("dropped %d training records with an empty output", empty)
    return mix_sources([(records, None)], seed=seed)
