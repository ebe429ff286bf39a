"""``lowbit demo --quantization-only``: the embedded tiny arithmetic LLaMA quantized at 4 and 2 bits with RTN,
GPTQ, MagR+GPTQ and NormalFloat; held-out perplexity, output error and accuracy on the four synthetic test families
before fine-tuning.

The base model was pre-trained on general arithmetic text but never on the instruction/rationale format, so its
accuracy before fine-tuning is near zero by design; the fine-tuning issues extend this demo with adapters.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from ..io import atomic_write_json

log = logging.getLogger(__name__)

# (method, bits, group size, label)
FULL_VARIANTS = [
    ("rtn", 4, 64, "RTN"), ("gptq", 4, 64, "GPTQ"), ("magr-gptq", 4, 64, "MagR+GPTQ"), ("nf", 4, 64, "NF4"),
    ("rtn", 2, 64, "RTN"), ("rtn", 2, -1, "RTN per-channel"), ("gptq", 2, 64, "GPTQ"),
    ("magr-gptq", 2, 64, "MagR+GPTQ"), ("nf", 2, 64, "NF2"),
]
QUICK_VARIANTS = [("rtn", 4, 64, "RTN"), ("gptq", 4, 64, "GPTQ"), ("rtn", 2, 64, "RTN"), ("gptq", 2, 64, "GPTQ")]


def run_demo(out_dir: Path, quick: bool = False, model_dir: str | Path | None = None, n_eval: int | None = None
             ) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.synthetic import FAMILIES, test_split
    from ..eval.accuracy import accuracy
    from ..eval.perplexity import perplexity
    from ..models.tiny import calibration_ids, heldout_text_ids, tiny_model_dir
    from ..quant import QuantConfig, quantize_model

    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir else tiny_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no config.json; pass a Hugging Face model "
                                f"directory with --model, or omit it to use the embedded tiny model")
    n_eval = n_eval or (10 if quick else 50)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqlen = 256
    calib = calibration_ids(tok, nsamples=16 if quick else 64, seqlen=seqlen)
    held = heldout_text_ids(tok, n_docs=300 if quick else 1500)
    tests = {f: test_split(f, n_eval, seed=0) for f in FAMILIES}

    def measure(model) -> dict:
        accs = {f: accuracy(model, tok, tests[f], f, max_new_tokens=48)[0] for f in FAMILIES}
        return {"ppl": perplexity(model, held, seqlen, max_windows=24), "accuracy": accs,
                "avg_accuracy": sum(accs.values()) / len(accs)}

    rows = [{"bits": 16, "method": "full precision", "group_size": None, "rel_output_error": 0.0, "seconds": 0.0,
             **measure(base)}]
    log.info("full precision: ppl %.3f", rows[0]["ppl"])
    for method, bits, g, label in (QUICK_VARIANTS if quick else FULL_VARIANTS):
        model = copy.deepcopy(base)
        cfg = QuantConfig(method=method, bits=bits, group_size=g)
        t0 = time.perf_counter()
        report = quantize_model(model, cfg, calib, progress=False)
        dt = time.perf_counter() - t0
        errs = [r["rel_output_error"] for r in report if "rel_output_error" in r]
        rows.append({"bits": bits, "method": label, "group_size": g, "rel_output_error": sum(errs) / len(errs),
                     "seconds": dt, **measure(model)})
        log.info("%d-bit %-16s ppl %.3f (%.1fs)", bits, label, rows[-1]["ppl"], dt)
    atomic_write_json(out_dir / "results.json", {"model": str(model_dir), "n_eval_per_family": n_eval,
                                                  "rows": rows})
    print(format_table(rows))
    print(f"\n(model: {model_dir}; {n_eval} test problems per family; results: {out_dir / 'results.json'})")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| bits | method | group | held-out ppl | ppl ratio | mean rel. output error | accuracy before "
             "fine-tuning (avg %) | quantize time (s) |", "|---|---|---|---|---|---|---|---|"]
    fp = rows[0]["ppl"]
    for r in rows:
        g = "-" if r["group_size"] is None else ("channel" if r["group_size"] == -1 else str(r["group_size"]))
        lines.append(f"| {r['bits']} | {r['method']} | {g} | {r['ppl']:.3f} | {r['ppl'] / fp:.2f} | "
                     f"{r['rel_output_error']:.4f} | {r['avg_accuracy']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)
