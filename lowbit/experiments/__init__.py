"""Comparisons as data: an experiment spec (YAML: cells, budget, seeds, learning rates, contrasts) and the one runner
that executes it over the product drivers of :mod:`lowbit.recipes` (which know nothing of it). ``lowbit demo``,
``lowbit demo --real`` and ``lowbit study`` are the built-in specs in ``specs/``."""

from .runner import run_experiment
from .spec import ExperimentSpec, builtin_specs, find_spec, load_spec

__all__ = ["ExperimentSpec", "builtin_specs", "find_spec", "load_spec", "run_experiment"]
