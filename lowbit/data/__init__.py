"""The data layer of lowbit: records, readers, evaluation sets, synthetic problems and prompts (pure Python).

Importing :mod:`lowbit.data` is cheap: no torch, transformers or datasets import (``mix_sources`` and
``default_math_training_set`` import ``datasets`` when called). The modules, bottom up:

* ``records``: the Math10K record (``instruction``, ``input``, ``output``, ``answer``) and the one reader of
  LLM-Adapters JSON arrays (``math_10k.json``, ``<set>/test.json``), used by training and evaluation alike.
* ``gsm8k``: OpenAI's GSM8K JSONL -> records (calculator annotations removed, "The answer is N.").
* ``mawps``: MAWPS train format -> records, with rationales written from checked equations.
* ``loaders``: training sources (GSM8K JSONL, MAWPS, LLM-Adapters JSON), mixing, test-set overlap checks, and
  the Math10K training set or, when named, its documented substitute.
* ``testsets``: the evaluation-set registry (``register_eval_set``): the seven LLM-Adapters test sets and the
  synthetic families, the data directory (``default_data_dir``), ``resolve_datasets`` and ``load_records``.
* ``validation``: the validation sets ``gsm8k-val`` and ``mawps-val``, carved from the training files, and the one
  list of what training and calibration leave out for them (``held_out_keys``).
* ``wordproblems``: sentence-building blocks of the synthetic word problems (people, items, events, ranges).
* ``synthetic``: the four synthetic task families of the embedded tiny model, their splits and files.
* ``prompts``: the prompt templates (ApiQ/Alpaca, LLM-Adapters).
* ``tokenize`` (torch): records -> token ids with response-only labels, and the batch collator.
* ``calibration`` (torch): calibration windows and held-out text for quantization.

The tiny model's pre-training corpus is not data of the task: it lives in :mod:`lowbit.models.tiny.corpus`.
"""

from .gsm8k import load_gsm8k_jsonl
from .loaders import (
    check_no_test_overlap,
    default_math_training_set,
    find_test_overlap,
    load_source,
    mix_sources,
    training_set_files,
)
from .mawps import load_mawps_train, mawps_to_record
from .prompts import PROMPTS, format_prompt
from .records import FIELDS, Record, format_number, load_llm_adapters_json, record_text
from .synthetic import (
    FAMILIES,
    TRAIN_MIX,
    check_record,
    generate_problem,
    generate_split,
    make_dataset,
    problem_key,
    rationale_answer,
    test_split,
    train_split,
)
from .testsets import (
    ALL_TEST_SETS,
    PAPER_TEST_SETS,
    DatasetSpec,
    EvalSet,
    default_data_dir,
    display_name,
    eval_set,
    kind_of,
    known_datasets,
    load_records,
    load_test_sets,
    register_eval_set,
    resolve_datasets,
    unregister_eval_set,
)
from .validation import VALIDATION_SETS, drop_held_out, held_out_keys, validation_split

__all__ = [
    "ALL_TEST_SETS",
    "FAMILIES",
    "FIELDS",
    "PAPER_TEST_SETS",
    "PROMPTS",
    "TRAIN_MIX",
    "VALIDATION_SETS",
    "DatasetSpec",
    "EvalSet",
    "Record",
    "check_no_test_overlap",
    "check_record",
    "default_data_dir",
    "default_math_training_set",
    "drop_held_out",
    "display_name",
    "eval_set",
    "find_test_overlap",
    "format_number",
    "format_prompt",
    "generate_problem",
    "generate_split",
    "held_out_keys",
    "kind_of",
    "known_datasets",
    "load_gsm8k_jsonl",
    "load_llm_adapters_json",
    "load_mawps_train",
    "load_records",
    "load_source",
    "load_test_sets",
    "make_dataset",
    "mawps_to_record",
    "mix_sources",
    "problem_key",
    "rationale_answer",
    "record_text",
    "register_eval_set",
    "resolve_datasets",
    "test_split",
    "train_split",
    "training_set_files",
    "unregister_eval_set",
    "validation_split",
]
