"""Quantizing a real pretrained checkpoint: lowbit vs GPTQModel on SmolLM2-135M (the ``smollm2-135m`` alias).

Both tools quantize the same float model (SmolLM2-135M-Instruct, dequantised from its Q4_1 GGUF file: every
number is relative to that float model) with the same calibration token windows (``--nsamples`` windows of
``--seqlen`` tokens of GSM8K train text, drawn once) and the same settings: bits, group 64, asymmetric, damping
0.01. Each tool runs with its own default column ordering (GPTQModel 7.6: ``act_group_aware`` on; lowbit:
act-order with static, contiguous groups), alternating ``--repeats`` times (the table gives the median time, its
spread and the time ratio lowbit / GPTQModel); then once each: "like for like" with reordering off in both (lowbit
also with ``group_params="block-start"``, GPTQModel's rule for a group's scale and zero), and lowbit's RTN,
MagR+GPTQ (``--no-magr`` skips it) and NF (``--defaults-and-like-for-like`` skips these three, ``--defaults-only``
everything but the defaults). Score: perplexity on ``--eval-windows`` windows of GSM8K
test text (the same token ids for every candidate; deterministic given the inputs), and quantization wall time.

Usage: ``python benchmarks/bench_real_quantize.py [--bits 4 2] [--repeats 2] [--quick]`` (needs ``make real``
and GPTQModel; ~3 minutes per quantization on 2 CPU cores; ``--quick``: the tiny model, 2 windows).
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel refuses to start on CPU without it

import copy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    base_parser,
    ci_cell,
    header_line,
    machine_info,
    md_table,
    ratio_stats,
    setup,
    summary,
    verdict_row,
    write_results,
)

from lowbit.data.testsets import default_data_dir  # noqa: E402
from lowbit.eval.perplexity import perplexity  # noqa: E402
from lowbit.quant import QuantConfig, quantize_model  # noqa: E402
from lowbit.recipes.loading import resolve_model  # noqa: E402


def gsm8k_ids(tok, data_dir: Path, split: str, n_tokens: int) -> torch.Tensor:
    """1-D token ids of GSM8K questions + solutions (``gsm8k_openai/<split>.jsonl``), at least ``n_tokens``."""
    import json

    path = data_dir / "gsm8k_openai" / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: set LOWBIT_DATA_DIR to the folder holding gsm8k_openai/")
    ids: list[int] = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ids += tok(f"{r['question']}\n{r['answer']}\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


def gsm8k_windows(tok, nsamples: int, seqlen: int, eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration ``(nsamples, seqlen)``: windows at seeded random offsets of GSM8K train text (one draw, the same
    for every tool and benchmark); held-out: the first ``eval_windows * seqlen`` tokens of GSM8K test text."""
    data_dir = default_data_dir()
    if data_dir is None:
        raise SystemExit("GSM8K files not found: set LOWBIT_DATA_DIR")
    g = torch.Generator().manual_seed(0)
    train = gsm8k_ids(tok, Path(data_dir), "train", 4 * nsamples * seqlen)
    starts = torch.randint(0, len(train) - seqlen, (nsamples,), generator=g).tolist()
    calib = torch.stack([train[s: s + seqlen] for s in starts])
    return calib, gsm8k_ids(tok, Path(data_dir), "test", eval_windows * seqlen)


def lowbit_run(fp_model, qcfg: QuantConfig, calib: torch.Tensor):
    model = copy.deepcopy(fp_model)
    t0 = time.perf_counter()
    quantize_model(model, qcfg, calib, progress=False)
    return model, time.perf_counter() - t0


def gptqmodel_run(path: str, bits: int, calib: torch.Tensor, act_group_aware: bool, tmp: Path):
    """GPTQModel 7.6 quantizes ``path``; the packed checkpoint is saved and loaded back (TORCH backend) to score."""
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=bits, group_size=64, sym=False, desc_act=False, damp_percent=0.01,
                          act_group_aware=act_group_aware)
    model = GPTQModel.load(path, qcfg, device="cpu", dtype=torch.float32)
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in calib]
    t0 = time.perf_counter()
    model.quantize(data, batch_size=1)
    dt = time.perf_counter() - t0
    out = tmp / f"gptqmodel-{bits}bit-{'gar' if act_group_aware else 'plain'}"
    model.save(str(out))
    del model
    # Its CPU kernel runs in fp16 only: score its dequantised weights in float32, like lowbit's.
    loaded = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from lowbit.quant.arch import set_submodule

    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        for name, m in [(n, m) for n, m in loaded.named_modules() if isinstance(m, TorchLinear)]:
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.copy_(m.dequantize_weight().t().float())
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            set_submodule(loaded, name, lin)
    return loaded.float().eval(), dt


def main() -> None:
    ap = base_parser(__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-gptqmodel", action="store_true")
    ap.add_argument("--no-magr", action="store_true", help="skip MagR+GPTQ (200 proximal iterations: ~20 min here)")
    ap.add_argument("--defaults-only", action="store_true", help="only the two defaults (the timed comparison)")
    ap.add_argument("--defaults-and-like-for-like", action="store_true",
                    help="only the two defaults and the reordering-off candidates (skip RTN, NF, MagR+GPTQ)")
    ap.add_argument("--tag", default="", help="suffix of the result files (several runs side by side)")
    ap.add_argument("--tmp", default="/tmp/lowbit_bench_real")
    args = ap.parse_args()
    if args.quick:
        args.model, args.nsamples, args.seqlen, args.eval_windows, args.bits = "tiny", 4, 128, 2, [4]
    repeats = args.repeats or (1 if args.quick else 2)
    setup(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model)[0]
    tok = AutoTokenizer.from_pretrained(path)
    calib, held = gsm8k_windows(tok, args.nsamples, args.seqlen, args.eval_windows)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ppl = lambda m: perplexity(m, held, args.seqlen, args.eval_windows)  # noqa: E731
    fp_ppl = ppl(fp)
    rows, records, verdicts = [], [], []
    tmp = Path(args.tmp)
    for bits in args.bits:
        default = {"lowbit GPTQ (default: act-order + static groups)":
                   lambda b=bits: lowbit_run(fp, QuantConfig(method="gptq", bits=b), calib)}
        if not args.no_gptqmodel:
            default["GPTQModel (default: act_group_aware)"] = lambda b=bits: gptqmodel_run(path, b, calib, True, tmp)
        times: dict[str, list[float]] = {k: [] for k in default}
        ppls: dict[str, float] = {}
        for i in range(repeats):  # interleaved: every default candidate once per round, order alternating
            for name, fn in (list(default.items()) if i % 2 == 0 else list(default.items())[::-1]):
                model, dt = fn()
                times[name].append(dt)
                if i == repeats - 1:  # deterministic given the inputs: scored once, in the last round
                    ppls[name] = ppl(model)
                print(f"[{bits}-bit] {name}: {dt:.1f} s"
                      + (f", ppl {ppls[name]:.3f}" if i == repeats - 1 else ""), flush=True)
                del model
        # Like for like (reordering off in both), lowbit's other methods: once each (perplexity is deterministic).
        once = {} if args.defaults_only else {"lowbit GPTQ, reordering off":
                lambda b=bits: lowbit_run(fp, QuantConfig(method="gptq", bits=b, options={
                    "act_order": False, "static_groups": False}), calib)}
        if not args.defaults_only:
            once["lowbit GPTQ, reordering off, block-start group params"] = lambda b=bits: lowbit_run(
                fp, QuantConfig(method="gptq", bits=b, options={
                    "act_order": False, "static_groups": False, "group_params": "block-start"}), calib)
        if not args.no_gptqmodel and not args.defaults_only:
            once["GPTQModel, reordering off"] = lambda b=bits: gptqmodel_run(path, b, calib, False, tmp)
        if not (args.defaults_and_like_for_like or args.defaults_only):
            once["lowbit RTN"] = lambda b=bits: lowbit_run(fp, QuantConfig(method="rtn", bits=b), calib)
            if not args.no_magr:
                once["lowbit MagR+GPTQ"] = lambda b=bits: lowbit_run(fp, QuantConfig(method="magr-gptq", bits=b),
                                                                     calib)
            once["lowbit NF"] = lambda b=bits: lowbit_run(fp, QuantConfig(method="nf", bits=b), calib)
        for name, fn in once.items():
            model, dt = fn()
            times[name], ppls[name] = [dt], ppl(model)
            print(f"[{bits}-bit] {name}: ppl {ppls[name]:.3f}, {dt:.1f} s", flush=True)
            del model
        base_t = summary(times.get("GPTQModel (default: act_group_aware)",
                                   times["lowbit GPTQ (default: act-order + static groups)"]))["median_s"]
        for name, ts in times.items():
            s = summary(ts)
            rec = {"bits": bits, "candidate": name, "ppl": ppls[name], "ppl_ratio_to_fp": ppls[name] / fp_ppl,
                   "time_s": s, "time_ratio_to_gptqmodel_default": s["median_s"] / base_t}
            records.append(rec)
            rows.append([bits, name, f"{ppls[name]:.3f}", f"{ppls[name] / fp_ppl:.3f}",
                         f"{s['median_s']:.1f} (spread {s['spread_s']:.1f})", f"{s['median_s'] / base_t:.2f}", len(ts)])
        names = list(default)
        if len(names) == 2 and repeats >= 2:  # the paired ratio of the defaults: lowbit / GPTQModel per round
            vs = ratio_stats(times[names[0]], times[names[1]], 1.0)
            records[-len(times)]["paired_time_ratio_to_gptqmodel_default"] = vs
            verdicts.append(verdict_row(f"real_quantize{args.tag}", f"quantizing {args.model} at {bits} bits "
                                        "(defaults), time lowbit / GPTQModel", {**vs, "repeats": repeats}))
            rows.append([bits, "paired time ratio lowbit / GPTQModel (defaults), median [95% CI]", None, None,
                         None, f"{ci_cell(vs)}: {vs['verdict']} (≤ 1)", repeats])
        _write(args, fp_ppl, rows, records, verdicts)  # after every bit width: a long run keeps what it measured


def _write(args, fp_ppl: float, rows: list, records: list, verdicts: list) -> None:
    info = machine_info()
    extra = (f"; model {args.model} (float ppl {fp_ppl:.3f}); calibration {args.nsamples} x {args.seqlen} GSM8K "
             f"train tokens; held-out {args.eval_windows} x {args.seqlen} GSM8K test tokens; group 64, asymmetric, "
             f"damp 0.01")
    md = (f"### Quantizing {args.model}: lowbit vs GPTQModel\n\n{header_line(info, extra)}\n\n"
          + md_table(["bits", "candidate", "held-out ppl", "ppl / float", "quantize time (s)",
                      "time / GPTQModel default", "runs"], rows))
    write_results(args.out_dir, "real_quantize" + args.tag,
                  {"machine": info, "model": args.model, "fp_ppl": fp_ppl, "quick": args.quick, "records": records,
                   "verdicts": verdicts}, md)


if __name__ == "__main__":
    main()
