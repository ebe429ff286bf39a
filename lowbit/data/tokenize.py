"""Tokenisation of Math10K records for causal-LM fine-tuning with the loss on the response only.

One example is ``[BOS] prompt response EOS`` where ``prompt = format_prompt(instruction, input, variant)`` and
``response = output``; ``labels`` equal ``input_ids`` except ``-100`` (ignored by the loss) on BOS and the prompt.

The prompt/response boundary is exact. The full text is tokenised once and used when the prompt tokenised alone
is a prefix of it (the model then trains on the tokens the text really has). When a tokenizer merges across the
boundary -- a byte-level BPE joins the LLM-Adapters prompt's trailing spaces with the response's first word,
``"Ġ" + "Tom"`` -> ``"ĠTom"`` -- the prompt and the response are tokenised separately and concatenated instead,
because at evaluation the prompt is tokenised alone: training must see the same prompt ids. Both ways the
prompt ids are exactly those of the prompt tokenised alone.

BOS follows the tokenizer (LLaMA adds it, the embedded tiny tokenizer does not) unless ``add_bos`` is given; EOS
is appended as an id, so that the model learns to stop. An example longer than ``max_length`` loses the end of
its response (and its EOS: a cut response must not teach stopping there), never the prompt; a prompt that leaves
no room for a response token raises, or is skipped with a logged count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .prompts import format_prompt

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "CausalLMCollator", "LongPromptError", "adds_bos", "tokenize_dataset", "tokenize_example"]

IGNORE_INDEX = -100  # the label torch's cross-entropy (and HF models) ignore


class LongPromptError(ValueError):
    """The prompt alone fills ``max_length``: no response token would be trained on. ``prompt_tokens``: the
    prompt's length ([BOS] included); ``max_length + 1`` or more fits it with one response token."""

    def __init__(self, message: str, prompt_tokens: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts BOS in front of a text by default (LLaMA: yes; the tiny tokenizer: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("1", add_special_tokens=True)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos and _ids(tokenizer, "1")[:1] != [bos]


def _assemble(record: Mapping[str, Any], prompt_ids: list[int], full_ids: list[int], tokenizer, max_length: int,
              train_on_prompt: bool, add_bos: bool) -> dict[str, list[int]]:
    """Split ``full_ids`` at the prompt (or re-tokenise the response when merged), add BOS/EOS, truncate, label."""
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids):]
    else:  # merged across the boundary: keep the prompt as tokenised alone (as at evaluation)
        response_ids = _ids(tokenizer, record["output"])
    if add_bos:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if len(prompt_ids) >= max_length:
        raise LongPromptError(f"record {record['instruction'][:60]!r}...: the prompt has {len(prompt_ids)} tokens, "
                              f"max_length is {max_length}; no room for the response (raise max_length)",
                              len(prompt_ids))
    response_ids = (response_ids + [tokenizer.eos_token_id])[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _check_args(tokenizer, max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a response token), got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token before tokenising")


def tokenize_example(record: Mapping[str, Any], tokenizer, max_length: int, variant: str = "apiq",
                     train_on_prompt: bool = False, add_bos: bool | None = None) -> dict[str, list[int]]:
    """One record ``{instruction, input?, output}`` -> ``{"input_ids", "attention_mask", "labels"}``, lists of
    equal length ``T <= max_length``: ``input_ids = [BOS] prompt response EOS`` (EOS dropped when truncated),
    ``attention_mask`` all 1, ``labels = input_ids`` with ``-100`` on BOS and prompt unless ``train_on_prompt``.

    ``add_bos=None`` follows the tokenizer (:func:`adds_bos`). Raises :class:`LongPromptError` (a ``ValueError``)
    naming the record and the lengths when ``[BOS] prompt`` has ``>= max_length`` tokens.
    """
    _check_args(tokenizer, max_length)
    prompt = format_prompt(record["instruction"], record.get("input", ""), variant)
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    return _assemble(record, _ids(tokenizer, prompt), _ids(tokenizer, prompt + record["output"]), tokenizer,
                     max_length, train_on_prompt, add_bos)


def tokenize_dataset(dataset_or_records: datasets.Dataset | Iterable[Mapping[str, Any]], tokenizer,
                     max_length: int, variant: str = "apiq", train_on_prompt: bool = False,
                     on_long_prompt: str = "error", add_bos: bool | None = None,
                     batch_size: int = 1000) -> datasets.Dataset:
    """Tokenise every record as :func:`tokenize_example` does -> ``datasets.Dataset`` with columns ``input_ids``,
    ``attention_mask``, ``labels`` (variable-length int lists; pad with :class:`CausalLMCollator`).

    ``on_long_prompt``: ``"error"`` raises when a record's prompt fills ``max_length``, naming the first such record,
    how many there are and the ``max_length`` that fits them all (after tokenising every record, so one fix suffices;
    the advice names the recipe key ``data.max_length``, this function's usual caller); ``"skip"`` drops such records
    with a logged count. Raises ``ValueError`` for an empty input, or when every record was skipped. Truncated
    responses are counted in the log. Texts go to the tokenizer ``batch_size`` at a time (a fast tokenizer encodes a
    batch about twice as fast as one text at a time).
    """
    import datasets

    if on_long_prompt not in ("error", "skip"):
        raise ValueError(f"on_long_prompt must be 'error' or 'skip', got {on_long_prompt!r}")
    _check_args(tokenizer, max_length)
    records = list(dataset_or_records)
    if not records:
        raise ValueError("tokenize_dataset got an empty dataset: no records to tokenise")
    if add_bos is None:
        add_bos = adds_bos(tokenizer)  # once, not per record
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    skipped = truncated = 0
    long: list[tuple[int, int]] = []  # (record index, prompt tokens) of the prompts that fill max_length
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        prompts = [format_prompt(r["instruction"], r.get("input", ""), variant) for r in chunk]
        enc = tokenizer(prompts + [p + r["output"] for p, r in zip(prompts, chunk)], add_special_tokens=False)
        ids = enc["input_ids"]
        for j, rec in enumerate(chunk):
            try:
                ex = _assemble(rec, list(ids[j]), list(ids[len(chunk) + j]), tokenizer, max_length, train_on_prompt,
                               add_bos)
            except LongPromptError as e:
                if on_long_prompt == "error":
                    long.append((start + j, e.prompt_tokens))
                skipped += 1
                continue
            truncated += ex["input_ids"][-1] != tokenizer.eos_token_id
            for k, v in ex.items():
                columns[k].append(v)
    n = len(records)
    if long:
        raise _long_prompts(records, long, max_length)
    if skipped:
        log.warning("skipped %d of %d records whose prompt alone has >= max_length=%d tokens", skipped, n, max_length)
    if skipped == n:
        raise ValueError(f"every one of the {n} records has a prompt of >= max_length={max_length} tokens")
    if truncated:
        log.info("truncated the response of %d of %d records to max_length=%d", truncated, n - skipped, max_length)
    return datasets.Dataset.from_dict(columns)


def _long_prompts(records: list, long: list[tuple[int, int]], max_length: int) -> LongPromptError:
    """One error for every record whose prompt fills ``max_length``: the first, the count and the length that
    fits them all. The advice names what a recipe can set (``data.max_length``); skipping is for API callers."""
    first, tokens = long[0]
    need = max(t for _, t in long) + 1
    return LongPromptError(f"record {first}: the prompt ({records[first]['instruction'][:60]!r}...) has {tokens} "
                           f"tokens, max_length is {max_length}: no room for the response; {len(long)} of "
                           f"{len(records)} records have a prompt of >= {max_length} tokens (the longest {need - 1}): "
                           f"set max_length to at least {need} (in a recipe: data.max_length={need}) or remove those "
                           f"records from the training file (API callers may pass on_long_prompt='skip' to "
                           f"tokenize_dataset to drop them)", need - 1)


class CausalLMCollator:
    """Right-pad a list of tokenised examples into a batch of ``(B, T)`` ``torch.long`` tensors.

    ``input_ids`` are padded with the pad id (``tokenizer.pad_token_id``, else ``eos_token_id``: the padded
    positions are masked and unlabelled, so which id fills them does not matter), ``attention_mask`` with 0,
    ``labels`` with -100. ``T`` is the longest example, rounded up to ``pad_to_multiple_of`` when given. Padding
    is on the right whatever ``tokenizer.padding_side`` says: that setting is for batched generation.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id to pad with")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CausalLMCollator got an empty batch")
        lengths = [len(f["input_ids"]) for f in features]
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {k: torch.full((len(features), T), v, dtype=torch.long) for k, v in pad_values.items()}  # (B, T)
        for b, (f, L) in enumerate(zip(features, lengths)):
            for k in pad_values:
                if len(f[k]) != L:
                    raise ValueError(f"example {b}: {k} has {len(f[k])} entries, input_ids {L}")
                batch[k][b, :L] = torch.as_tensor(f[k], dtype=torch.long)
        return batch
