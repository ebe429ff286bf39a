"""The held-out response loss against a brute-force float64 reference: each record alone, no padding, the NLL of
every response token (and the EOS) given everything before it."""

import json
import math

import pytest
import torch
from tiny_models import make_tokenizer, random_llama

from lowbit.data.prompts import format_prompt
from lowbit.eval.response_loss import response_loss

RECORDS = [
    {"instruction": "Tom has 3 apples and buys 4 more. How many apples?", "input": "",
     "output": "3 + 4 = 7. The answer is 7.", "answer": "7"},
    {"instruction": "Ann has 12 coins and gives away 5.", "input": "", "output": "12 - 5 = 7. The answer is 7.",
     "answer": "7"},
    {"instruction": "What is 6 * 3?", "input": "", "output": "", "answer": "18"},  # no rationale: skipped
    {"instruction": "Ben reads 2 books a day for 5 days.", "input": "",
     "output": "2 * 5 = 10 books in all, so he read 10 books. The answer is 10.", "answer": "10"},
]


@pytest.fixture(scope="module")
def model_and_tok():
    tok = make_tokenizer()
    return random_llama(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=len(tok), seed=3).double(), tok


def _reference(model, tok, rec):
    prompt = tok(format_prompt(rec["instruction"], rec["input"], "apiq"), add_special_tokens=False)["input_ids"]
    full = tok(format_prompt(rec["instruction"], rec["input"], "apiq") + rec["output"],
               add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    ids = full + [tok.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    nll = [-float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids))]
    return sum(nll), len(nll)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_brute_force_reference(model_and_tok, batch_size):
    model, tok = model_and_tok
    res = response_loss(model, tok, RECORDS, batch_size=batch_size)
    refs = {i: _reference(model, tok, r) for i, r in enumerate(RECORDS) if r["output"]}
    assert res["skipped"] == 1 and res["n"] == 3 and [i for i, _, _ in res["per_record"]] == [0, 1, 3]
    for i, mean, k in res["per_record"]:
        assert k == refs[i][1]
        assert mean == pytest.approx(refs[i][0] / refs[i][1], rel=1e-9)
    total = sum(s for s, _ in refs.values())
    tokens = sum(k for _, k in refs.values())
    assert res["tokens"] == tokens and res["loss"] == pytest.approx(total / tokens, rel=1e-9)
    assert res["record_mean"] == pytest.approx(sum(s / k for s, k in refs.values()) / 3, rel=1e-9)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))


def test_training_lowers_it_and_errors(model_and_tok):
    """The loss is what training minimises: a few steps on the records lower it."""
    import copy

    model, tok = model_and_tok
    m = copy.deepcopy(model)
    before = response_loss(m, tok, RECORDS)["loss"]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    from lowbit.data.tokenize import CausalLMCollator, tokenize_example

    batch = CausalLMCollator(tok)([tokenize_example(r, tok, 256) for r in RECORDS if r["output"]])
    for _ in range(5):
        opt.zero_grad()
        m(**batch).loss.backward()
        opt.step()
    assert response_loss(m, tok, RECORDS)["loss"] < before
    with pytest.raises(ValueError, match="reference response"):
        response_loss(model, tok, [RECORDS[2]])


def test_evaluate_reports_and_caches_it(tmp_path):
    """`lowbit evaluate --response-loss` on the tiny model: per-set loss in the summary and the compare table; a
    rerun reuses the stored loss."""
    from lowbit.cli import main
    from lowbit.io import sealed
    from lowbit.recipes.compare import compare_table, load_run

    args = ["evaluate", "--model", "tiny", "--datasets", "synthetic-mawps", "--limit", "2", "--loss-limit", "6",
            "--max-new-tokens", "4", "--response-loss", "--out", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rl = summary["datasets"]["synthetic-mawps"]["response_loss"]
    assert rl["n"] == 6 and 0 < rl["loss"] < 20
    stored = json.loads((tmp_path / "synthetic-mawps.loss.json").read_text())
    assert len(stored["per_record"]) == 6
    assert "syn-MAWPS loss" in compare_table([load_run(tmp_path)])
    # A stored loss is reused as it is (edited here, and sealed again, as lowbit seals what it writes).
    (tmp_path / "synthetic-mawps.loss.json").write_text(json.dumps(sealed({**stored, "loss": 1.2345})))
    assert main(args) == 0  # nothing to generate, nothing to score: the stored loss is reused
    assert json.loads((tmp_path / "summary.json").read_text())["datasets"]["synthetic-mawps"]["response_loss"][
        "loss"] == 1.2345


def test_loss_only_evaluation_generates_nothing(tmp_path, capsys):
    """`--no-accuracy --response-loss`: the loss equals the full evaluation's, no generation rows are written, the
    printed summary and the compare table show the loss; `--no-accuracy` alone is refused before any work."""
    from lowbit.cli import main
    from lowbit.recipes.compare import compare_table, load_run

    base = ["evaluate", "--model", "tiny", "--datasets", "synthetic-mawps", "--loss-limit", "4", "--response-loss"]
    assert main([*base, "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "full")]) == 0
    assert main([*base, "--no-accuracy", "--out", str(tmp_path / "loss")]) == 0
    full = json.loads((tmp_path / "full" / "summary.json").read_text())["datasets"]["synthetic-mawps"]
    only = json.loads((tmp_path / "loss" / "summary.json").read_text())
    d = only["datasets"]["synthetic-mawps"]
    assert d["accuracy"] is None and only["average"] is None and only["generated"] == 0
    assert d["response_loss"]["loss"] == pytest.approx(full["response_loss"]["loss"], rel=1e-6)
    assert not (tmp_path / "loss" / "synthetic-mawps.jsonl").exists()
    assert "response loss" in capsys.readouterr().out
    assert "syn-MAWPS loss" in compare_table([load_run(tmp_path / "loss")])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        main(["evaluate", "--model", "tiny", "--datasets", "synthetic-mawps", "--no-accuracy",
              "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


class _Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the NLL of every token can be written down by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def _hand_nll(table, prev: int, nxt: int) -> float:
    row = [float(v) for v in table[prev]]
    m = max(row)
    return -(row[nxt] - (m + math.log(sum(math.exp(v - m) for v in row))))


def test_hand_computation_on_a_three_record_file(tmp_path):
    """A 3-record LLM-Adapters file, read back from disk: the loss is the token-weighted mean, over each response's
    tokens and the EOS only, of -log softmax(table[previous token])[token], written out with math.log/exp."""
    from lowbit.data.loaders import load_source

    tok = make_tokenizer()
    recs = [r for r in RECORDS if r["output"]]
    path = tmp_path / "three.json"
    path.write_text(json.dumps(recs))
    records = load_source(path)
    model = _Bigram(len(tok))
    total, count, per = 0.0, 0, []
    for r in recs:
        prompt = tok(format_prompt(r["instruction"], "", "apiq"), add_special_tokens=False)["input_ids"]
        ids = tok(format_prompt(r["instruction"], "", "apiq") + r["output"], add_special_tokens=False)["input_ids"]
        ids = ids + [tok.eos_token_id]
        nll = [_hand_nll(model.table.detach(), ids[t - 1], ids[t]) for t in range(len(prompt), len(ids))]
        per.append(sum(nll) / len(nll))
        total, count = total + sum(nll), count + len(nll)
    for bs in (1, 2, 3):  # batched (right-padded) equals one at a time
        res = response_loss(model, tok, records, batch_size=bs)
        assert res["n"] == 3 and res["tokens"] == count
        assert res["loss"] == pytest.approx(total / count, rel=1e-12)
        assert [m for _, m, _ in res["per_record"]] == pytest.approx(per, rel=1e-12)


def test_masking_scores_the_response_only():
    """Changing what the model predicts at prompt positions leaves the loss as it is; changing a prediction of a
    response token changes it."""
    tok = make_tokenizer()
    rec = RECORDS[0]
    prompt = tok(format_prompt(rec["instruction"], "", "apiq"), add_special_tokens=False)["input_ids"]
    ids = tok(format_prompt(rec["instruction"], "", "apiq") + rec["output"], add_special_tokens=False)["input_ids"]
    ids = ids + [tok.eos_token_id]
    predictors_of_response = {ids[t - 1] for t in range(len(prompt), len(ids))}
    prompt_only = [i for i in set(prompt) if i not in predictors_of_response]
    assert prompt_only  # tokens that only ever predict prompt tokens
    model = _Bigram(len(tok))
    before = response_loss(model, tok, [rec])
    assert before["tokens"] == len(ids) - len(prompt)  # the response tokens and the EOS
    with torch.no_grad():
        model.table[prompt_only] += 5 * torch.randn(len(prompt_only), len(tok), dtype=torch.float64)
    assert response_loss(model, tok, [rec])["loss"] == pytest.approx(before["loss"], rel=1e-12)
    with torch.no_grad():
        model.table[ids[len(prompt) - 1], ids[len(prompt)]] -= 3.0  # the first response token's prediction
    assert response_loss(model, tok, [rec])["loss"] > before["loss"] + 1e-3
