"""Batched generation for the Math10K protocol: left padding, KV cache, prompts sorted by token length, each
sequence stopping at EOS or at the start of a new ``### Instruction`` (a model fine-tuned on the Alpaca layout may
go on to write the next example).

Greedy by default; ``num_beams=4`` is the LLM-Adapters evaluation variant. Batching does not change the result:
prompts are left-padded with an attention mask, and Hugging Face ``generate`` derives position ids from that mask
(``cumsum - 1``), so a padded prompt sees the same positions and keys as it does alone (tests/eval/test_generate.py
checks batched == one-at-a-time, token for token, on the embedded tiny model).

Progress inside a batch (a batch of 32 long answers can take minutes): ``on_step`` is called after every generated
token with the tokens generated so far, the batch's token limit and how many of its prompts have finished. It rides
on a stopping criterion that answers exactly what the stop-string criterion answers, so it changes no result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

STOP_STRINGS = ("### Instruction",)

#: ``on_step(tokens, limit, finished)``: after each generated token of a batch, the tokens generated so far, the
#: batch's ``max_new_tokens`` and how many of its prompts have finished (always 0 under beam search, where a
#: prompt's answer is known only when the whole search ends).
StepCallback = Callable[[int, int, int], None]


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_STRINGS) -> str:
    """``text`` up to the first occurrence of any stop string (the whole text if none occurs)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


class StopOnStrings(StoppingCriteria):
    """Marks a sequence finished once its generated part contains a stop string.

    Only the last ``max(len(stop)) + 2`` generated tokens are decoded at each step: every token that overlaps an
    ASCII stop string contributes at least one of its characters, so a stop string completed by the newest token
    lies within that window.
    """

    def __init__(self, tokenizer, prompt_len: int, stops: tuple[str, ...] = STOP_STRINGS):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops
        self.window = max(len(s) for s in stops) + 2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, self.prompt_len:][:, -self.window:]  # (rows, <= window); rows = batch (x beams)
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


class StepProgress(StoppingCriteria):
    """Calls ``on_step`` after every generated token and returns what ``stop`` (the stop-string criterion) returns,
    all ``False`` without one: generation goes exactly as without it.

    A row counts as finished from its first EOS token or stop-string hit on (latched: what follows is padding, and
    the stop string may leave the decoded window). ``count_finished=False`` (beam search: rows are hypotheses, not
    prompts) reports 0 finished.
    """

    def __init__(self, on_step: StepCallback, prompt_len: int, limit: int, eos: list[int],
                 stop: StopOnStrings | None = None, count_finished: bool = True):
        self.on_step, self.prompt_len, self.limit, self.stop = on_step, prompt_len, limit, stop
        self.eos, self.count_finished = torch.tensor(eos, dtype=torch.long), count_finished
        self.finished: torch.Tensor | None = None  # (rows,) bool

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = input_ids.shape[0]
        if self.stop is not None:
            done = self.stop(input_ids, scores, **kwargs)
        else:
            done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        n_done = 0
        if self.count_finished:
            if self.eos.device != input_ids.device:
                self.eos = self.eos.to(input_ids.device)
            hit = done | torch.isin(input_ids[:, -1], self.eos)  # the newest token
            self.finished = hit if self.finished is None else self.finished | hit
            n_done = int(self.finished.sum())
        self.on_step(input_ids.shape[1] - self.prompt_len, self.limit, n_done)
        return done


def _criteria(tokenizer, width: int, new: int, eos: list[int], stop_strings: tuple[str, ...], num_beams: int,
              on_step: StepCallback | None) -> StoppingCriteriaList | None:
    """The stopping criteria of one batch: the stop strings, wrapped by :class:`StepProgress` when ``on_step``."""
    stop = StopOnStrings(tokenizer, width, stop_strings) if stop_strings else None
    if on_step is not None:
        return StoppingCriteriaList([StepProgress(on_step, width, new, eos, stop, count_finished=num_beams == 1)])
    return StoppingCriteriaList([stop]) if stop is not None else None


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (LLaMA-3 style configs list several)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def iter_generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 32,
                  num_beams: int = 1, stop_strings: tuple[str, ...] = STOP_STRINGS,
                  on_step: StepCallback | None = None) -> Iterator[tuple[list[int], list[str]]]:
    """Yield ``(indices, continuations)`` one batch at a time: ``continuations[k]`` is the decoded continuation
    of ``prompts[indices[k]]`` (prompt excluded, special tokens dropped, cut at the first stop string).

    Prompts are tokenized as the LLM-Adapters script does (``tokenizer(prompt)``, so with BOS where the tokenizer
    adds one), sorted longest first (a batch that does not fit in memory fails at once, and padding is small), and
    left-padded into ``(batch, max_len)`` ids with a ``(batch, max_len)`` attention mask. ``max_new_tokens`` is
    capped so that prompt + continuation fits the model's ``max_position_embeddings``. ``on_step``: progress within
    each batch (:data:`StepCallback`).
    """
    if not prompts:
        return
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError(f"batch_size, max_new_tokens and num_beams must be >= 1 "
                         f"(got {batch_size}, {max_new_tokens}, {num_beams})")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids = tokenizer(list(prompts))["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            width = len(ids[idx[0]])  # longest first
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T), 1 = real token
            for r, i in enumerate(idx):
                input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]):] = 1
            new = max_new_tokens if max_pos is None else min(max_new_tokens, max_pos - width)
            if new < 1:
                raise ValueError(f"prompt of {width} tokens leaves no room to generate within the model's "
                                 f"max_position_embeddings={max_pos}; use a model with a longer context")
            # A fresh config: the model's own may carry sampling settings (temperature, top_p) we must not inherit.
            # use_cache=True explicitly: a model saved after training may carry config.use_cache=False.
            cfg = GenerationConfig(max_new_tokens=new, do_sample=False, num_beams=num_beams, use_cache=True,
                                   eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)
            stop = _criteria(tokenizer, width, new, eos, stop_strings, num_beams, on_step)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                                 stopping_criteria=stop)  # (B, T + new') ids
            texts = [truncate_at_stop(tokenizer.decode(row[width:], skip_special_tokens=True), stop_strings)
                     for row in out]
            yield idx, texts
    finally:
        model.train(was_training)


def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 32,
             num_beams: int = 1) -> list[str]:
    """Greedy (or beam) continuations of ``prompts``, in input order; the prompt itself is not returned."""
    out: list[str] = [""] * len(prompts)
    for idx, texts in iter_generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_beams):
        for i, t in zip(idx, texts):
            out[i] = t
    return out
