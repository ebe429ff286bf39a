"""Tokenisation for response-only fine-tuning (lowbit.data.tokenize) with the embedded tiny model's tokenizer.

Expected ids are built here from the prompt text tokenised alone; the collated batch is checked through the tiny
model's own loss against a hand-computed cross-entropy over the response tokens.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.data.prompts import format_prompt
from lowbit.data.tokenize import (
    IGNORE_INDEX,
    CausalLMCollator,
    LongPromptError,
    adds_bos,
    tokenize_dataset,
    tokenize_example,
)
from lowbit.models.tiny import TINY_MODEL_DIR

REC = {"instruction": "Tom has 3 apples. He buys 5 more. How many apples does he have now?", "input": "",
       "output": "3 + 5 = 8. The answer is 8.", "answer": "8"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def prompt_ids(tok, rec, variant="apiq") -> list[int]:
    return tok(format_prompt(rec["instruction"], rec.get("input", ""), variant), add_special_tokens=False).input_ids


def test_labels_mask_exactly_the_prompt(tok):
    assert not adds_bos(tok)  # the tiny tokenizer adds no BOS, so the example starts with the prompt
    ex = tokenize_example(REC, tok, max_length=512)
    p = prompt_ids(tok, REC)
    n = len(p)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"]) and set(ex["attention_mask"]) == {1}
    assert ids[:n] == p and tok.decode(ids[:n]) == format_prompt(REC["instruction"])
    assert labels[:n] == [IGNORE_INDEX] * n
    assert IGNORE_INDEX not in labels[n:] and labels[n:] == ids[n:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(labels[n:]) == REC["output"] + tok.eos_token  # the trained tokens are output + EOS


def test_train_on_prompt_and_input_field(tok):
    ex = tokenize_example(REC, tok, 512, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]
    rec = {**REC, "instruction": "Add the numbers.", "input": "3 and 5"}
    ex = tokenize_example(rec, tok, 512)
    n = len(prompt_ids(tok, rec))
    assert "Add the numbers.\n\n3 and 5" in tok.decode(ex["input_ids"][:n])
    assert tok.decode(ex["labels"][n:]) == rec["output"] + tok.eos_token


def test_boundary_merge_falls_back_to_separate_tokenisation(tok):
    # The LLM-Adapters prompt ends in spaces; byte-level BPE joins the last one with the response's first word.
    rec = {**REC, "output": "Tom has 3 + 5 = 8 apples. The answer is 8."}
    prompt = format_prompt(rec["instruction"], "", "llm-adapters")
    p = prompt_ids(tok, rec, "llm-adapters")
    full = tok(prompt + rec["output"], add_special_tokens=False).input_ids
    assert full[: len(p)] != p  # precondition: the merge really happens with this tokenizer
    ex = tokenize_example(rec, tok, 512, variant="llm-adapters")
    n = len(p)
    assert ex["input_ids"][:n] == p  # the prompt exactly as tokenised alone at evaluation
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert tok.decode(ex["labels"][n:]) == rec["output"] + tok.eos_token
    assert tok.decode(ex["input_ids"]) == prompt + rec["output"] + tok.eos_token


def test_truncation_keeps_the_prompt(tok):
    n = len(prompt_ids(tok, REC))
    full = tokenize_example(REC, tok, 512)
    ex = tokenize_example(REC, tok, max_length=n + 3)
    assert len(ex["input_ids"]) == n + 3
    assert ex["input_ids"] == full["input_ids"][: n + 3] and ex["labels"] == full["labels"][: n + 3]
    assert ex["input_ids"][-1] != tok.eos_token_id  # a cut response does not end with EOS
    one = tokenize_example(REC, tok, max_length=n + 1)  # the smallest length with a trained token
    assert one["labels"].count(IGNORE_INDEX) == n and len(one["labels"]) == n + 1
    with pytest.raises(LongPromptError, match=rf"the prompt has {n} tokens, max_length is {n}"):
        tokenize_example(REC, tok, max_length=n)
    with pytest.raises(ValueError, match=r"Tom has 3 apples"):
        tokenize_example(REC, tok, max_length=10)


def test_add_bos(tok):
    ex = tokenize_example(REC, tok, 512, add_bos=True)
    plain = tokenize_example(REC, tok, 512)
    assert ex["input_ids"] == [tok.bos_token_id] + plain["input_ids"]
    assert ex["labels"] == [IGNORE_INDEX] + plain["labels"]


def test_tokenize_dataset(tok, caplog):
    recs = [REC, {**REC, "output": "5 + 3 = 8. The answer is 8."},
            {"instruction": "What is 2 + 2? " * 40, "output": "4. The answer is 4.", "answer": "4"}]
    n_long = len(prompt_ids(tok, recs[2]))
    max_length = n_long - 5
    with pytest.raises(LongPromptError, match=r"record 2: .*max_length is"):
        tokenize_dataset(recs, tok, max_length)
    with caplog.at_level(logging.WARNING, logger="lowbit.data.tokenize"):
        ds = tokenize_dataset(datasets.Dataset.from_list(recs), tok, max_length, on_long_prompt="skip", batch_size=2)
    assert "skipped 1 of 3 records" in caplog.text
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert ds.to_list() == [tokenize_example(r, tok, max_length) for r in recs[:2]]  # batched == one by one
    ds = tokenize_dataset(recs, tok, 4096, variant="llm-adapters")
    assert ds.to_list() == [tokenize_example(r, tok, 4096, variant="llm-adapters") for r in recs]
    with pytest.raises(ValueError, match="empty dataset"):
        tokenize_dataset([], tok, 128)
    with pytest.raises(ValueError, match="every one of the 1 records"):
        tokenize_dataset(recs[2:], tok, max_length, on_long_prompt="skip")


def test_collator_pads_right(tok):
    exs = [tokenize_example({**REC, "output": o}, tok, 512) for o in ("8.", "3 + 5 = 8. The answer is 8.", "x")]
    lengths = [len(e["input_ids"]) for e in exs]
    batch = CausalLMCollator(tok)(exs)
    T = max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for k, v in batch.items():
        assert v.shape == (3, T) and v.dtype == torch.long, k
    for b, (e, L) in enumerate(zip(exs, lengths)):
        assert batch["input_ids"][b, :L].tolist() == e["input_ids"]
        assert batch["labels"][b, :L].tolist() == e["labels"]
        assert batch["attention_mask"][b].tolist() == [1] * L + [0] * (T - L)
        assert (batch["input_ids"][b, L:] == tok.pad_token_id).all() and (batch["labels"][b, L:] == -100).all()
    batch8 = CausalLMCollator(tok, pad_to_multiple_of=8)(exs)
    assert batch8["input_ids"].shape[1] == -(-T // 8) * 8 and batch8["input_ids"].shape[1] % 8 == 0
    no_pad = SimpleNamespace(pad_token_id=None, eos_token_id=7)
    assert CausalLMCollator(no_pad)([{"input_ids": [1], "attention_mask": [1], "labels": [1]},
                                     {"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, 2]}]
                                    )["input_ids"].tolist() == [[1, 7], [1, 2]]
    with pytest.raises(ValueError, match="labels has 1 entries"):
        CausalLMCollator(tok)([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1]}])


def test_model_loss_covers_only_response_tokens(tok):
    """The tiny model's loss on a padded batch equals cross-entropy over the response tokens of each example,
    each computed on its own, unpadded: padding and the prompt contribute nothing."""
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    exs = [tokenize_example({**REC, "output": o}, tok, 512) for o in ("3 + 5 = 8. The answer is 8.", "8.")]
    batch = CausalLMCollator(tok)(exs)
    with torch.no_grad():
        loss = model(**batch).loss
        total, count = 0.0, 0
        for e in exs:
            ids = torch.tensor([e["input_ids"]])  # (1, L)
            logits = model(input_ids=ids).logits[0, :-1]  # (L-1, V): position t predicts token t+1
            target = torch.tensor(e["labels"][1:])
            keep = target != IGNORE_INDEX
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert count == sum(len(tok(o, add_special_tokens=False).input_ids) + 1 for o in ("3 + 5 = 8. The answer is 8.",
                                                                                       "8."))
    assert loss.item() == pytest.approx(total / count, rel=1e-4)
