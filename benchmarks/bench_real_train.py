"""Training step on a real checkpoint: lowbit QLoRA vs PEFT + bitsandbytes, and DiaBlo vs LoRA, on SmolLM2-135M.

Every candidate trains the same float model (``smollm2-135m``: LLaMA architecture, 30 layers of width 576, tied
embeddings) on the same batch (``--batch`` × ``--seq`` tokens of GSM8K train text) with the same adapter settings:
those of lowbit's QLoRA recipe (``tiny-qlora-4bit``: NF4 base in blocks of 64; LoRA r = 16, α = 32), on all seven
decoder projections, dropout 0 (deterministic), fp32 compute, AdamW (lr 1e-4), no gradient checkpointing (PEFT's
``prepare_model_for_kbit_training`` would turn it on; off in both, like for like).

1. lowbit QLoRA (``quantize_model`` with ``QuantConfig(method="nf", bits=4, group_size=64)``, then
   ``apply_adapters`` with LoRA) vs the tools users have today: ``get_peft_model(LoraConfig(...))`` on a model
   loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, fp32 compute)`` (``--bnb-by-hand``:
   the float model with its projections replaced by ``bnb.nn.Linear4bit``, the fallback where ``from_pretrained``
   refuses). Both start from zero ``B``, so their first losses differ only by each tool's NF4 rounding; both are
   printed, with the float model's. If bitsandbytes 4-bit cannot run here, the output says so and part 2 still runs.
2. lowbit DiaBlo vs lowbit LoRA on the same NF4 base (one quantized copy, saved and loaded back) at equal trainable
   parameters: N is the block count whose DiaBlo size is closest to LoRA r = 16's (one that divides every dimension
   if one lands within 2 %; otherwise the last block is zero-padded, as DiaBlo does for such N).

One step = forward + loss + backward + AdamW update. Time: all candidates in one process, interleaved round-robin,
``--repeats`` timed steps after one warm-up step (whose loss is the initial loss); median and spread. Memory: each
candidate again in a fresh subprocess (``--quick``: bitsandbytes' only), which reports the rise of its peak RSS
during its first step over the RSS before it (activations, gradients, AdamW state, temporaries; glibc's mmap
threshold is fixed at 64 KiB there so that freed tensors leave the RSS instead of being reused unseen) and its own
peak RSS (``VmHWM``: ``ru_maxrss`` of a child starts from its parent's RSS at the fork); plus the exact bytes of the
frozen base weights (bitsandbytes' quantization state included).

Default batch 2 × 256, not 4 × 256: on the shared 2-core CPU (load average ~8 from other jobs) one 4 × 256 step
took 50-77 s with torch's 2 threads, so a full run (3 candidates × (1 warm-up + repeats) steps, 3 memory runs,
~1 min of loading and quantizing) would have taken far more than 8 minutes. The recorded run (``--repeats 2
--threads 1``: one thread suffers less from the other jobs) took ~10 s a step and ~4 min in all; ``--batch 4``
about doubles the step time.

Usage: ``python benchmarks/bench_real_train.py [--quick] [--repeats 5] [--batch 2] [--seq 256] [--threads N]``
(needs ``make real``, bitsandbytes and peft; ``--quick``: the tiny model, 2 × 64 tokens, 2 repeats).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    base_parser,
    header_line,
    interleaved,
    machine_info,
    md_table,
    peak_memory_delta,
    setup,
    summary,
    write_results,
)
from bench_real_quantize import gsm8k_ids
from torch import nn

from lowbit.adapters import AdapterConfig, apply_adapters, expected_trainable
from lowbit.quant import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from lowbit.recipes.loading import resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32.0  # lowbit's QLoRA recipe (tiny-qlora-4bit.yaml)
QCFG = QuantConfig(method="nf", bits=4, group_size=64)  # the same recipe's base: NF4, blocks of 64 (bnb's too)
LR = 1e-4
MATCH_TOL = 0.02
LABELS = {"lowbit-lora": "lowbit QLoRA: NF4 QuantLinear + LoRA", "peft-bnb": "PEFT LoRA on bnb Linear4bit NF4",
          "lowbit-diablo": "lowbit DiaBlo on NF4 QuantLinear"}


# ----------------------------------------------------------------------------------------------- candidates

def _bnb_linear4bit(lin: nn.Linear, dev: torch.device) -> nn.Module:
    """``lin`` as ``bnb.nn.Linear4bit`` NF4 with double-quantised absmax and fp32 compute (quantized on ``.to``)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=True, device="cpu")
    q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to(dev)


def peft_bnb(path: str, dev: torch.device, by_hand: bool) -> tuple[nn.Module, str]:
    """PEFT LoRA on a bitsandbytes NF4 model; returns the model and how its base was built."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if by_hand:
        from lowbit.quant.arch import set_submodule

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
        for name, m in [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]:
            set_submodule(model, name, _bnb_linear4bit(m, dev))
        how = "float model, projections replaced by bnb.nn.Linear4bit(nf4, compress_statistics=True)"
    else:
        bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bc, dtype=torch.float32,
                                                     device_map={"": str(dev)})
        how = "from_pretrained(BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp32 compute))"
    n4 = sum(hasattr(getattr(m, "weight", None), "quant_state") for m in model.modules())
    if n4 == 0:
        raise RuntimeError("no bitsandbytes 4-bit layer in the loaded model")
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg), f"{how}; {n4} Linear4bit layers"


def build(kind: str, path: str, qbase: Path, blocks: int, dev: torch.device, by_hand: bool) -> tuple[nn.Module, dict]:
    """Candidate ``kind`` (a key of ``LABELS``) ready to train, and its sizes."""
    torch.manual_seed(0)  # the same LoRA A draw for both lowbit LoRA models (main process and memory subprocess)
    t0 = time.perf_counter()
    info: dict = {}
    if kind == "peft-bnb":
        model, info["how"] = peft_bnb(path, dev, by_hand)
    else:
        model = load_quantized(qbase, device=dev)
        adapter = kind.split("-")[1]
        apply_adapters(model, AdapterConfig(adapter=adapter, rank=RANK, alpha=ALPHA, num_blocks=blocks, dropout=0.0,
                                            targets=list(TARGETS)), progress=False)
    model.train()
    info["build_s"] = time.perf_counter() - t0
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, {**info, **weight_bytes(model)}


def weight_bytes(model: nn.Module) -> dict:
    """Exact bytes of the frozen base (shared tensors once) and of its 4-bit linears; bitsandbytes keeps its absmax
    and codebooks in ``weight.quant_state``, outside the module's parameters and buffers, so those are added."""
    def qstate(p) -> list[torch.Tensor]:
        qs = getattr(p, "quant_state", None)
        if qs is None:
            return []
        s2 = getattr(qs, "state2", None)
        ts = [qs.absmax, qs.code, getattr(qs, "offset", None)] + ([s2.absmax, s2.code] if s2 is not None else [])
        return [t for t in ts if isinstance(t, torch.Tensor)]

    def nbytes(ts, seen: set) -> int:
        n = 0
        for t in ts:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
        return n

    frozen = [t for t in model.parameters() if not t.requires_grad] + list(model.buffers())
    base = nbytes(frozen + [t for p in frozen for t in qstate(p)], set())
    seen: set = set()
    lin4 = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            lin4 += nbytes(list(m.buffers()), seen)
        elif hasattr(getattr(m, "weight", None), "quant_state"):
            lin4 += nbytes([m.weight] + qstate(m.weight) + ([m.bias] if m.bias is not None else []), seen)
    return {"base_bytes": base, "linear4bit_bytes": lin4}


def match_blocks(shapes: list[tuple[int, int]], lora_params: int) -> dict:
    """DiaBlo N with the trainable count closest to ``lora_params``: one dividing every dimension if one lands within
    ``MATCH_TOL``, else the closest of all (padded blocks)."""
    counts = {n: expected_trainable(shapes, "diablo", num_blocks=n) for n in range(1, min(map(min, shapes)) + 1)}
    exact = [n for n, c in counts.items() if all(i % n == 0 and o % n == 0 for i, o in shapes)
             and abs(c / lora_params - 1) <= MATCH_TOL]
    n = min(exact or counts, key=lambda k: abs(counts[k] - lora_params))
    return {"num_blocks": n, "diablo_params": counts[n], "lora_params": lora_params,
            "relative_difference": counts[n] / lora_params - 1, "divides_every_dimension": n in exact}


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor):
    losses: list[float] = []

    def step() -> None:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return step, losses


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


# ----------------------------------------------------------------------------------------------- memory

def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of ``/proc/self/status`` in bytes (``None`` without /proc)."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def worker(args) -> None:
    """One candidate in a fresh process: its first step's peak RSS rise; prints one JSON line."""
    dev = setup(args)
    batch = torch.load(Path(args.tmp) / "batch.pt").to(dev)
    model, sizes = build(args.worker, args.path, Path(args.tmp) / "qbase", args.blocks, dev, args.bnb_by_hand)
    step, losses = make_step(model, optimizer(model), batch)
    hwm_build, rss_before = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    mem = peak_memory_delta(step, dev)  # resets VmHWM first: afterwards it is the step's peak
    hwm_step = _status_bytes("VmHWM")
    peak = max(hwm_build, hwm_step) if hwm_build and hwm_step else None
    print("RESULT " + json.dumps({"peak_rise_bytes": mem["peak_delta_bytes"], "how": mem["how"],
                                  "rss_before_step_bytes": rss_before, "process_peak_rss_bytes": peak,
                                  "loss": losses[0], **sizes}), flush=True)


def measure_memory(kind: str, args, tmp: Path, blocks: int, dev: torch.device) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", args.path, "--tmp", str(tmp), "--blocks", str(blocks),
           "--device", dev.type] + (["--threads", str(args.threads)] if args.threads else []) + (
               ["--bnb-by-hand"] if args.bnb_by_hand else [])
    # A fixed mmap threshold also turns off glibc's adaptive one, which would let freed activations (< 32 MiB) stay
    # in the heap and be reused without raising the RSS.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    return json.loads(line[len("RESULT "):])


# ----------------------------------------------------------------------------------------------- main

def nf4_base(path: str, batch: torch.Tensor, out: Path, dev: torch.device) -> dict:
    """Quantize the float model once (saved to ``out`` for every lowbit candidate); the float model's loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    with torch.no_grad():
        float_loss = model(input_ids=batch, labels=batch, use_cache=False).loss.item()
    t0 = time.perf_counter()
    quantize_model(model, QCFG, progress=False)
    quantize_s = time.perf_counter() - t0
    shapes = [(m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and n.split(".")[-1] in TARGETS]
    save_quantized(model, out, QCFG, source=path)
    return {"float_loss": float_loss, "quantize_s": quantize_s, "shapes": shapes}


def build_all(args, tmp: Path, blocks: int, batch: torch.Tensor, dev: torch.device, t0: float
              ) -> tuple[dict[str, tuple[nn.Module, dict]], str]:
    """The three candidates (two if bitsandbytes 4-bit fails: then the reason instead of its status)."""
    built = {"lowbit-lora": build("lowbit-lora", args.path, tmp / "qbase", blocks, dev, False)}
    try:
        import bitsandbytes as bnb

        model, sizes = build("peft-bnb", args.path, tmp / "qbase", blocks, dev, args.bnb_by_hand)
        probe = batch[:1, :8]
        model(input_ids=probe, labels=probe, use_cache=False).loss.backward()  # it must run both ways here
        model.zero_grad(set_to_none=True)
        built["peft-bnb"] = (model, sizes)
        status = f"bitsandbytes {bnb.__version__} 4-bit works on {dev.type}: {sizes['how']}"
    except Exception as e:  # noqa: BLE001 - any failure is reported, and part 2 still runs
        status = f"bitsandbytes 4-bit could NOT run on {dev.type}: {type(e).__name__}: {e}"[:500]
        print(f"WARNING: {status}; part 1 has no PEFT + bitsandbytes row", flush=True)
    built["lowbit-diablo"] = build("lowbit-diablo", args.path, tmp / "qbase", blocks, dev, False)
    log(t0, status)
    return built, status


def measure(args, dev: torch.device, repeats: int, t0: float) -> dict:
    """Everything measured: the NF4 base, the DiaBlo size, interleaved step times, losses, memory runs."""
    from transformers import AutoTokenizer

    from lowbit.data.testsets import default_data_dir

    data_dir = default_data_dir()
    if data_dir is None:
        raise SystemExit("GSM8K files not found: set LOWBIT_DATA_DIR")
    tok = AutoTokenizer.from_pretrained(args.path)
    batch = gsm8k_ids(tok, Path(data_dir), "train", args.batch * args.seq).view(args.batch, args.seq).to(dev)
    with tempfile.TemporaryDirectory(prefix="lowbit_real_train_") as tmp_name:
        tmp = Path(tmp_name)
        torch.save(batch.cpu(), tmp / "batch.pt")
        base = nf4_base(args.path, batch, tmp / "qbase", dev)
        log(t0, f"float loss {base['float_loss']:.4f}; NF4 base quantized in {base['quantize_s']:.1f} s")
        match = match_blocks(base["shapes"], expected_trainable(base["shapes"], "lora", rank=RANK))
        print(f"DiaBlo N={match['num_blocks']}: {match['diablo_params']:,} vs LoRA r={RANK}: "
              f"{match['lora_params']:,} trainable ({100 * match['relative_difference']:+.2f} %)", flush=True)
        built, status = build_all(args, tmp, match["num_blocks"], batch, dev, t0)
        fns, losses = {}, {}
        for k, (model, _) in built.items():
            fns[k], losses[k] = make_step(model, optimizer(model), batch)
        ts = interleaved(fns, repeats, warmup=1, device=dev)
        log(t0, "timed: " + ", ".join(f"{k} {summary(v)['median_s']:.2f} s" for k, v in ts.items()))
        sizes = {k: s for k, (_, s) in built.items()}
        # Free the models (the step closures hold them too) before the memory subprocesses run beside this one.
        del built, fns, model
        gc.collect()
        # --quick: one subprocess (bitsandbytes' when it runs), to exercise the path; each costs a fresh import.
        which = [] if args.no_memory else list(sizes)
        mem = {}
        for k in [next(k for k in ("peft-bnb", "lowbit-diablo") if k in sizes)] if args.quick and which else which:
            mem[k] = measure_memory(k, args, tmp, match["num_blocks"], dev)
            log(t0, f"memory {k}: " + (f"peak rise {mib(mem[k]['peak_rise_bytes']):.0f} MiB"
                                       if mem[k].get("peak_rise_bytes") is not None else str(mem[k])[:300]))
    rows = {}
    for k, sz in sizes.items():
        m = mem.get(k, {})
        rows[k] = {"key": k, "candidate": LABELS[k], **sz, **summary(ts[k]), "initial_loss": losses[k][0],
                   "losses": [round(x, 5) for x in losses[k]], "peak_rise_bytes": m.get("peak_rise_bytes"),
                   "rss_before_step_bytes": m.get("rss_before_step_bytes"),
                   "process_peak_rss_bytes": m.get("process_peak_rss_bytes"), "memory_error": m.get("error"),
                   "memory_run_loss": m.get("loss")}
    return {"base": base, "match": match, "bnb_status": status, "rows": rows}


def mib(b: int | None) -> float | None:
    return None if b is None else b / 2**20


def report(args, info: dict, dev: torch.device, repeats: int, data: dict, wall: float) -> None:
    rows, base, match, status = data["rows"], data["base"], data["match"], data["bnb_status"]
    bnb_ok = "peft-bnb" in rows

    def ratio(k: str, ref: str, key: str) -> float | None:
        a, b = rows.get(k, {}).get(key), rows.get(ref, {}).get(key)
        return a / b if a and b else None

    # Part 1's reference is PEFT + bitsandbytes, part 2's lowbit LoRA (so lowbit LoRA has one ratio per part).
    ratios = {f"{k} / {ref}": {"time": ratio(k, ref, "median_s"), "step_peak": ratio(k, ref, "peak_rise_bytes"),
                               "base_bytes": ratio(k, ref, "base_bytes")}
              for k, ref in (("lowbit-lora", "peft-bnb"), ("lowbit-diablo", "lowbit-lora"))}
    init = {k: r["initial_loss"] for k, r in rows.items()}
    loss_line = (f"initial loss: float model {base['float_loss']:.4f}, lowbit NF4 {init['lowbit-lora']:.4f}"
                 + (f", bitsandbytes NF4 {init['peft-bnb']:.4f} (difference "
                    f"{init['lowbit-lora'] - init['peft-bnb']:+.4f})" if bnb_ok else ", bitsandbytes: not run"))
    print(loss_line, flush=True)
    heads = ["candidate", "trainable", "s/step median", "spread s", "time × ref", "step peak RSS rise MiB",
             "peak × ref", "base weights MiB", "of which 4-bit linears MiB", "initial loss"]

    def line(k: str, ref: str, name: str) -> list:
        r = rows[k]
        return [name, f"{r['trainable_params']:,}", r["median_s"], r["spread_s"], ratio(k, ref, "median_s"),
                mib(r["peak_rise_bytes"]), ratio(k, ref, "peak_rise_bytes"), mib(r["base_bytes"]),
                mib(r["linear4bit_bytes"]), f"{r['initial_loss']:.4f}"]

    part1 = [line("lowbit-lora", "peft-bnb", f"lowbit QLoRA (NF4 QuantLinear + LoRA r={RANK})")]
    part1 += ([line("peft-bnb", "peft-bnb", f"PEFT LoRA r={RANK} on bnb Linear4bit NF4 (reference)")] if bnb_ok
              else [[f"PEFT + bitsandbytes: not run ({status})"] + [None] * (len(heads) - 1)])
    part2 = [line("lowbit-lora", "lowbit-lora", f"lowbit LoRA r={RANK} (reference)"),
             line("lowbit-diablo", "lowbit-lora", f"lowbit DiaBlo N={match['num_blocks']}")]
    md = (f"### Training step on {args.model}: lowbit vs PEFT + bitsandbytes, DiaBlo vs LoRA ({args.batch}×{args.seq} "
          f"GSM8K tokens, AdamW, fp32)\n\n{header_line(info)}; median of {repeats} interleaved steps after 1 warm-up; "
          f"adapters on all 7 projections (LoRA α={ALPHA:g}, dropout 0); memory: first step in a fresh subprocess "
          f"per candidate{' (--quick: one only)' if args.quick else ''}.\n\n{status}.\n\n"
          f"Part 1, lowbit vs the tools users have today (ratios to PEFT + bitsandbytes):\n\n"
          f"{md_table(heads, part1)}\n\nPart 2, same NF4 base, equal trainable parameters (DiaBlo "
          f"{match['diablo_params']:,} vs LoRA {match['lora_params']:,}, {100 * match['relative_difference']:+.2f} "
          f"%; ratios to LoRA):\n\n{md_table(heads, part2)}\n\n{loss_line[0].upper()}{loss_line[1:]}. lowbit NF4 "
          f"quantization {base['quantize_s']:.1f} s; total wall time {wall:.0f} s.\n")
    result = {"benchmark": "real_train", "machine": info, "device": str(dev), "model": args.model,
              "batch": [args.batch, args.seq], "repeats": repeats, "quick": args.quick, "targets": TARGETS,
              "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0}, "quant": QCFG.to_dict(), "lr": LR,
              "bitsandbytes": status, "bitsandbytes_ok": bnb_ok, "diablo_match": match,
              "float_loss": base["float_loss"], "initial_losses": init, "quantize_s": base["quantize_s"],
              "rows": list(rows.values()), "ratios": ratios, "wall_s": wall}
    write_results(args.out_dir, "real_train", result, md)


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (see the docstring for why not 4)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--bnb-by-hand", action="store_true", help="build the bnb model by replacing the float model's "
                                                               "projections instead of from_pretrained")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-candidate memory subprocesses")
    for internal in ("--worker", "--path", "--tmp"):
        ap.add_argument(internal, default=None, help="internal (memory subprocess)")
    ap.add_argument("--blocks", type=int, default=None, help="internal (memory subprocess)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.model, args.batch, args.seq = "tiny", 2, 64
    repeats = args.repeats or (2 if args.quick else 5)
    dev = setup(args)
    info = machine_info(dev)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    args.path = resolve_model(args.model)[0]
    data = measure(args, dev, repeats, t0)
    report(args, info, dev, repeats, data, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
