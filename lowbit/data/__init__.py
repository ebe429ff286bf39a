"""Data for lowbit: synthetic Math10K-format arithmetic word problems for tiny models (pure Python)."""

from lowbit.data.synthetic import (
    FAMILIES,
    TRAIN_MIX,
    check_record,
    generate_problem,
    generate_split,
    make_dataset,
    pretrain_corpus,
    problem_key,
    rationale_answer,
)

__all__ = [
    "FAMILIES",
    "TRAIN_MIX",
    "check_record",
    "generate_problem",
    "generate_split",
    "make_dataset",
    "pretrain_corpus",
    "problem_key",
    "rationale_answer",
]
