"""Batched generation (left padding, KV cache, sorted batches, stop strings) on the embedded tiny model."""

import pytest
import torch

from lowbit.data import synthetic
from lowbit.data.prompts import format_prompt
from lowbit.eval.generate import StopOnStrings, generate, iter_generate, truncate_at_stop


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.tiny import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    return model, tok


def _prompts():
    """Prompts from 3 to ~200 tokens: padding of up to ~200 positions in one batch."""
    recs = synthetic.test_split("gsm8k", 2) + synthetic.test_split("aqua", 2) + synthetic.test_split("mawps", 2)
    long = format_prompt(" ".join(r["instruction"] for r in synthetic.test_split("svamp", 3)))
    return [format_prompt(r["instruction"]) for r in recs] + ["Ann has 3", long, "7 + 5 ="]


def test_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = _prompts()
    lens = [len(tok(p)["input_ids"]) for p in prompts]
    assert min(lens) <= 6 and max(lens) >= 150  # very different lengths
    single = [generate(model, tok, [p], max_new_tokens=20, batch_size=1)[0] for p in prompts]
    batched = generate(model, tok, prompts, max_new_tokens=20, batch_size=len(prompts))
    assert batched == single
    # Several batches of mixed lengths give the same continuations too, in input order.
    assert generate(model, tok, prompts, max_new_tokens=20, batch_size=4) == single
    assert any(s.strip() for s in single)


def test_token_ids_match(tiny):
    """Token-for-token (not just text): the raw ids of the batched run equal each single run's."""
    model, tok = tiny
    prompts = _prompts()[-4:]
    ids = tok(prompts)["input_ids"]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=pad)
    batched = model.generate(input_ids=x, attention_mask=mask, generation_config=cfg)[:, width:]
    for row, i in zip(batched, ids):
        alone = model.generate(input_ids=torch.tensor([i]), generation_config=cfg)[0, len(i):].tolist()
        assert row.tolist()[: len(alone)] == alone
        assert all(t == pad for t in row.tolist()[len(alone):])  # finished rows are padded after EOS


def test_iter_generate_sorts_longest_first(tiny):
    model, tok = tiny
    prompts = ["1 + 1 =", format_prompt("Ann has 3 pens. She buys 2 more. How many pens does she have?"), "2 ="]
    batches = list(iter_generate(model, tok, prompts, max_new_tokens=2, batch_size=1))
    assert [idx for idx, _ in batches] == [[1], [0], [2]]
    assert generate(model, tok, [], max_new_tokens=2) == []


def test_beam_variant_runs(tiny):
    model, tok = tiny
    prompts = _prompts()[:3]
    out = generate(model, tok, prompts, max_new_tokens=6, batch_size=3, num_beams=4)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # Progress under beam search: every token reported, no prompt called finished before the search ends.
    calls = []
    batches = list(iter_generate(model, tok, prompts, max_new_tokens=6, batch_size=3, num_beams=4,
                                 on_step=lambda *a: calls.append(a)))
    assert [t for _, texts in batches for t in texts] == [out[i] for idx, _ in batches for i in idx]
    assert calls and [c[0] for c in calls] == list(range(1, len(calls) + 1)) and {c[2] for c in calls} == {0}


def _with_steps(model, tok, prompts, limit):
    """-> (continuations in input order, the ``on_step`` calls) of one batch holding every prompt."""
    calls, out = [], [""] * len(prompts)
    for idx, texts in iter_generate(model, tok, prompts, max_new_tokens=limit, batch_size=len(prompts),
                                    on_step=lambda *a: calls.append(a)):
        for i, t in zip(idx, texts):
            out[i] = t
    return out, calls


def test_step_progress_counts_each_prompt_when_it_ends_and_changes_nothing(tiny):
    """``on_step`` inside one batch: tokens 1, 2, ...; a prompt counts as finished from the step at which it ends
    when generated alone (EOS or stop string), never before; the continuations are those of a run without it."""
    model, tok = tiny
    prompts, limit = _prompts(), 40
    ends = []  # the step at which each prompt ends alone (None: it runs to the limit)
    for p in prompts:
        _, alone = _with_steps(model, tok, [p], limit)
        ends.append(alone[-1][0] if alone[-1][2] == 1 else None)
    out, calls = _with_steps(model, tok, prompts, limit)
    assert out == generate(model, tok, prompts, max_new_tokens=limit, batch_size=len(prompts))
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1)) and {c[1] for c in calls} == {limit}
    for tokens, _, finished in calls:
        assert finished == sum(e is not None and e <= tokens for e in ends), tokens
    assert 0 < calls[-1][2] < len(prompts)  # some prompts ended early, others ran to the limit


def test_stop_at_new_instruction(tiny):
    _, tok = tiny
    text = " 3 + 4 = 7. The answer is 7.\n\n### Instruction:\nTom has"
    assert truncate_at_stop(text) == " 3 + 4 = 7. The answer is 7.\n\n"
    assert truncate_at_stop("The answer is 7.") == "The answer is 7."
    prompt = tok("### Response:\n")["input_ids"]
    gen = tok(text)["input_ids"]
    stop = StopOnStrings(tok, len(prompt), ("### Instruction",))
    hits = [bool(stop(torch.tensor([prompt + gen[:k]]), None)[0]) for k in range(1, len(gen) + 1)]
    first = hits.index(True)
    assert tok.decode(gen[: first + 1]).endswith("### Instruction")  # stops on the token completing it
    assert not any(hits[:first])
    # The prompt's own "### Instruction" never stops generation.
    p2 = tok("### Instruction:\nx\n\n### Response:\n")["input_ids"]
    assert not StopOnStrings(tok, len(p2))(torch.tensor([p2 + tok(" 5")["input_ids"]]), None)[0]


def test_prompt_too_long_for_context(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, tok, ["1 + 1 = 2. " * 400], max_new_tokens=4)
