"""Prompt templates of the Math10K setting: the ApiQ/Alpaca prompt and the original LLM-Adapters one."""

from __future__ import annotations

# ApiQ / Alpaca variant, used for the published quantized-table numbers.
APIQ = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# The original LLM-Adapters evaluation prompt (different whitespace).
LLM_ADAPTERS = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request. \n\n                ### Instruction:\n                {instruction}\n\n"
                "                ### Response:\n                ")
PROMPTS = {"apiq": APIQ, "llm-adapters": LLM_ADAPTERS}


def format_prompt(instruction: str, input: str = "", variant: str = "apiq") -> str:
    if variant not in PROMPTS:
        raise ValueError(f"unknown prompt variant {variant!r}; choose one of {sorted(PROMPTS)}")
    text = instruction if not input else f"{instruction}\n\n{input}"
    return PROMPTS[variant].format(instruction=text)
