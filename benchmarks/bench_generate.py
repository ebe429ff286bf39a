"""Batched vs one-at-a-time greedy generation on the embedded tiny model: wall time, examples/s, and a check that
both give the same continuations.

Prompts are the synthetic test problems of all four families in the Math10K prompt (~110–160 tokens). The ratio is
batched time / one-at-a-time time (< 1: batching is faster), the median of the per-round ratios of paired rounds
(``--repeats`` at least, after a warm-up, order alternating) with its bootstrap 95% interval and a verdict
against ≤ 0.5 (batching at least twice as fast).
Writes `benchmarks/results/generate.json` and prints a markdown table.
Usage: `python benchmarks/bench_generate.py [--quick] [--prompts 32] [--max-new-tokens 32] [--batch-size 16]
[--threads 1]`.
"""

from __future__ import annotations

import statistics

import torch
from _common import base_parser, ci_cell, header_line, machine_info, md_table, paired_ratios, verdict_row, write_results

from lowbit.data.prompts import format_prompt
from lowbit.data.synthetic import FAMILIES, test_split
from lowbit.eval.generate import generate


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.batch_size = 4, 4, 4
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.tiny import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    per = -(-args.prompts // len(FAMILIES))
    prompts = [format_prompt(r["instruction"]) for f in FAMILIES for r in test_split(f, per)][: args.prompts]
    lens = [len(ids) for ids in tok(prompts)["input_ids"]]

    outs: dict[str, list[str]] = {}

    def single():
        outs["single"] = [generate(model, tok, [p], max_new_tokens=args.max_new_tokens, batch_size=1)[0]
                          for p in prompts]

    def batched():
        outs["batched"] = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size)

    pr = paired_ratios({"single": single, "batched": batched}, "single", min_repeats=max(2, args.repeats),
                       max_repeats=3 if args.quick else 10, time_cap_s=120.0, targets={"batched": 0.5})
    t_single, t_batched = pr["times"]["single"]["times_s"], pr["times"]["batched"]["times_s"]
    vs = pr["ratios"]["batched"]
    out_single, out_batched = outs["single"], outs["batched"]
    rows = []
    for name, ts, bs in (("one at a time", t_single, 1), (f"batched ({args.batch_size})", t_batched, args.batch_size)):
        med = statistics.median(ts)
        rows.append({"mode": name, "batch_size": bs, "median_s": med, "spread_s": max(ts) - min(ts),
                     "examples_per_s": len(prompts) / med})
    ratio = 1 / vs["ratio"]
    result = {"benchmark": "generate", "machine": info, "model": "embedded tiny LLaMA (3.7M params, fp32)",
              "prompts": len(prompts), "prompt_tokens": [min(lens), max(lens)],
              "max_new_tokens": args.max_new_tokens, "repeats": pr["repeats"], "rows": rows,
              "batched_over_single": vs,
              "verdicts": [verdict_row("generate", f"batched ({args.batch_size}) / one-at-a-time greedy generation, "
                                       f"tiny model, {len(prompts)} prompts", {**vs, "repeats": pr["repeats"]})],
              "speedup_batched_vs_single": ratio, "identical_outputs": out_single == out_batched,
              "quick": args.quick}
    table = md_table(["mode", "median s", "spread s", "examples/s"],
                     [[r["mode"], r["median_s"], r["spread_s"], r["examples_per_s"]] for r in rows])
    md = (f"### Greedy generation on the tiny model: batched vs one at a time\n\n{header_line(info)}; "
          f"{len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, {args.max_new_tokens} new tokens, median of "
          f"{pr['repeats']} paired runs.\n\n{table}\n\nBatched / one at a time: {ci_cell(vs)} (95% CI), "
          f"{vs['verdict']} against ≤ 0.5; batched is {ratio:.1f}x faster; identical outputs: "
          f"{out_single == out_batched}.\n")
    write_results(args.out_dir, "generate", result, md)


if __name__ == "__main__":
    main()
