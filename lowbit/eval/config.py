"""``EvalConfig``: the evaluation protocol — which test sets, how many examples, prompt variant, decoding, scoring.

The same dataclass is the ``eval`` section of a fine-tuning recipe and the protocol flags of ``lowbit evaluate``.
Protocol: the ApiQ prompt with greedy decoding and 512 new tokens (``variant="apiq"``), or the original
LLM-Adapters script's prompt with 4-beam search and 256 new tokens (``variant="llm-adapters"``);
``max_new_tokens``/``num_beams`` left unset take the variant's values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .answers import VARIANTS as CHOICE_RULES

VARIANTS = {
    "apiq": {"prompt": "apiq", "num_beams": 1, "max_new_tokens": 512},
    "llm-adapters": {"prompt": "llm-adapters", "num_beams": 4, "max_new_tokens": 256},
}


@dataclass
class EvalConfig:
    """datasets: test-set names (``gsm8k``, ``svamp``, ``mawps``, ``aqua``, ``addsub``, ``multiarith``,
    ``singleeq``, or ``synthetic-<family>``). data_dir: folder with the real sets (default ``$LOWBIT_DATA_DIR``).
    limit: first N examples of each set (synthetic default 500). batch_size: prompts per generate call.
    max_new_tokens / num_beams: default the variant's. variant: ``apiq`` or ``llm-adapters``. choice_rule: AQuA
    letter rule, ``llm-adapters`` (first capital A-E) or ``strict`` (last "answer is (X)"). synthetic_seed: dataset
    seed of the synthetic sets. response_loss: also score the held-out response loss (teacher-forced NLL of the
    reference rationale given the prompt; :mod:`lowbit.eval.response_loss`) on the first ``loss_limit`` records
    (default ``limit``). accuracy: generate answers and score them (``False``: the response loss only, no
    generation; needs ``response_loss``)."""

    datasets: list[str] = field(default_factory=lambda: ["gsm8k", "svamp", "mawps", "aqua"])
    data_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int | None = None
    num_beams: int | None = None
    variant: str = "apiq"
    choice_rule: str = "llm-adapters"
    synthetic_seed: int = 0
    response_loss: bool = False
    loss_limit: int | None = None
    accuracy: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = [d.strip() for d in self.datasets.split(",") if d.strip()]
        if not self.datasets:
            raise ValueError("datasets is empty; name at least one test set, e.g. gsm8k")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.choice_rule not in CHOICE_RULES:
            raise ValueError(f"unknown choice_rule {self.choice_rule!r}; choose one of {', '.join(CHOICE_RULES)}")
        for name, v in (("batch_size", self.batch_size), ("max_new_tokens", self.max_new_tokens),
                        ("num_beams", self.num_beams), ("limit", self.limit), ("loss_limit", self.loss_limit)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not (self.accuracy or self.response_loss):
            raise ValueError("accuracy=false and response_loss=false leave nothing to evaluate; set either to true "
                             "(--no-accuracy needs --response-loss)")

    @property
    def prompt(self) -> str:
        return VARIANTS[self.variant]["prompt"]

    @property
    def generation(self) -> tuple[int, int]:
        """``(max_new_tokens, num_beams)`` with the variant's values for unset ones."""
        preset = VARIANTS[self.variant]
        return (preset["max_new_tokens"] if self.max_new_tokens is None else self.max_new_tokens,
                preset["num_beams"] if self.num_beams is None else self.num_beams)

    def to_dict(self) -> dict:
        return asdict(self)
