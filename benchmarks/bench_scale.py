"""Scale: peak memory and wall time of quantization, adapter initialisation and a training step at LLaMA-2-7B width.

A random checkpoint of the real 7B shapes (``lowbit.models.random_llama``; only ``--layers`` decoder layers, 2, 4 and
8 by default) is generated on demand into ``--model-dir`` (a cache, never committed). Each phase then runs in its
own subprocess (``_scale_workers.py``), which reports its own peak RSS (``VmHWM``; the parent also polls it, for a
child that dies before reporting) and the parent its wall time. Every phase runs on ``--device`` (default cuda when
available; on CUDA the children also report ``max_memory_allocated``, RSS being host memory only):

(a) ``python -m lowbit quantize``: 2-bit, group 64, ``--method gptq`` and ``magr-gptq`` (``--magr-iters`` 5),
    calibration 16×512 (and 128×2048 with ``--large-calib``: hours on a CPU), ``--ppl-windows 0``; extra flags
    (``--stream``, ``--calib-store bfloat16`` where this lowbit has them) pass through ``--quantize-args``;
(b) adapter initialisation on the MagR+GPTQ base through the ``tiny-cloq-2bit`` / ``tiny-diablo-calibrated-2bit``
    recipes pointed at the checkpoint (CLoQ LoRA r=64, calibrated DiaBlo N=64; ``initialise``);
(c) one AdamW step with gradient checkpointing on the packed base (``load_quantized`` + zero-init DiaBlo N=64 or
    LoRA r=64), batch 1×512 and 4×512; the DiaBlo / LoRA ratio of peak memory.

Per phase and variant the peaks are fitted as ``a + b · layers`` (least squares) and extrapolated to 32 layers,
next to the analytical model of ``_scale_memory.py``, whose fixed cost is measured: a child that imports torch and
transformers (the baseline) and one that also imports the model classes and lowbit's drivers (about 0.17 GiB more,
which every phase pays). A phase that fails records its error text; the others still run.

Usage: ``python benchmarks/bench_scale.py [--quick] [--layers 2 4 8] [--model-dir DIR] [--quantize-args "..."]``.
``--quick``: 1 layer of width 256 (intermediate 688, 4 heads, vocabulary 1024), 4×64 calibration, 1×64 / 4×64
training batches.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import tempfile
from pathlib import Path

import _scale_memory as mm
from _common import base_parser, header_line, machine_info, md_table, setup, write_results
from _scale_workers import spawn

from lowbit.models.random_llama import LlamaShape

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the recipes' targets
RECIPES = {"cloq": ("tiny-cloq-2bit", "lora", "CLoQ LoRA"), "calibrated": ("tiny-diablo-calibrated-2bit", "diablo",
                                                                          "calibrated DiaBlo")}
BITS, GROUP = 2, 64
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit" / "bench_scale"


def parse_args():
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    for flag, default in (("hidden", 4096), ("intermediate", 11008), ("heads", 32), ("vocab", 32000)):
        ap.add_argument(f"--{flag}", type=int, default=default, help=f"(default {default})")
    ap.add_argument("--kv-heads", type=int, default=None, help="(default: --heads)")
    ap.add_argument("--model-dir", default=None, help=f"checkpoint cache (default {CACHE}; --quick: temporary)")
    ap.add_argument("--work-dir", default=None, help="quantized models, adapters, logs (default: temporary)")
    ap.add_argument("--keep-work", action="store_true", help="keep --work-dir's outputs")
    ap.add_argument("--calib", default=None, help="calibration .txt (default: random words written to the work dir)")
    ap.add_argument("--methods", nargs="+", default=["gptq", "magr-gptq"])
    ap.add_argument("--magr-iters", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--large-calib", action="store_true", help="also calibrate on 128×2048 (hours on a CPU)")
    ap.add_argument("--quantize-args", default="", help="extra `lowbit quantize` flags, e.g. '--stream'")
    ap.add_argument("--phases", nargs="+", default=["quantize", "init", "train"], choices=["quantize", "init", "train"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--train-seqlen", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=64)
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge earlier runs' scale.json files (predictions recomputed) instead of running")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per phase (default 6 h; --quick 300)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = [1], 256, 688, 4, 1024
        args.nsamples, args.seqlen, args.train_seqlen, args.large_calib = 4, 64, 64, False
    args.child_timeout = args.child_timeout or (300 if args.quick else 6 * 3600)
    return args


# ---------------------------------------------------------------------------------------------- inputs

def write_calib(path: Path, tokens: int) -> Path:
    """Random-ish words and numbers, about 4 characters per needed token (the tiny tokenizer's ratio is ~0.75)."""
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "qu", "an", "dor", "is", "ne", "pra", "ul", "zo", "et"]
    words = ["".join(rng.choices(syll, k=rng.randint(1, 3))) for _ in range(400)] + [str(i) for i in range(100)]
    lines, size = [], 0
    while size < 4 * tokens:
        line = " ".join(rng.choices(words, k=rng.randint(8, 30))) + rng.choice([".", "!", "?", " = 12."])
        lines.append(line)
        size += len(line) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def quantize_flags() -> set[str]:
    """The option strings `lowbit quantize` accepts in this checkout."""
    from lowbit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["quantize"]
    return {s for a in sub._actions for s in a.option_strings}


def memory_settings(flags: set[str], extra: list[str]) -> dict:
    """What the memory model assumes about `lowbit quantize` from its flags and ``--quantize-args``."""
    def value(flag, default):
        return extra[extra.index(flag) + 1] if flag in extra[:-1] else default
    stream = "--stream" in flags and "--no-stream" not in extra
    return {"stream": stream, "stream_flag_exists": "--stream" in flags, "calib_store": value("--calib-store",
            "float32"), "load_dtype": value("--dtype", "float32"),
            "note": "streaming assumed on wherever --stream exists and --no-stream is not passed"}


# ---------------------------------------------------------------------------------------------- phases

def ensure_checkpoint(shape: LlamaShape, root: Path, ctx: dict) -> tuple[Path, dict | None]:
    """The cached checkpoint of ``shape`` (generated, and measured, when missing)."""
    spec = {"layers": shape.layers, "hidden": shape.hidden, "intermediate": shape.intermediate, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "vocab": shape.vocab, "seed": 0}
    path = root / "random-llama-{layers}l-{hidden}h-{intermediate}i-{heads}a-{kv_heads}kv-{vocab}v".format(**spec)
    if (path / "random_llama.json").is_file():
        return path, None
    r = ctx["run"]("generate", {**spec, "out": str(path), "overwrite": True}, f"generate-{shape.layers}")
    return path, {"phase": "generate", "variant": "random checkpoint (fp16)", **r,
                  "predicted": predicted(mm.predict_generate, shape, ctx["plain_baseline"])}


def quantize_rows(shape: LlamaShape, model: Path, ctx: dict) -> tuple[list[dict], dict]:
    args, ms, rows, bases = ctx["args"], ctx["memory"], [], {}
    calibs = [(args.nsamples, args.seqlen)] + ([(128, 2048)] if args.large_calib else [])
    for method in args.methods:
        for n, s in calibs:
            out = ctx["work"] / f"q-{shape.layers}-{method}-{n}x{s}"
            argv = ["quantize", "--model", str(model), "--out", str(out), "--method", method, "--bits", str(BITS),
                    "--group-size", str(GROUP), "--calib", str(ctx["calib"]), "--nsamples", str(n), "--seqlen",
                    str(s), "--ppl-windows", "0", "--device", ctx["device"], "--overwrite"] + (
                ["--magr-iters", str(args.magr_iters)] if method.startswith("magr") else []) + ctx["qextra"]
            r = ctx["run"]("quantize", {"argv": argv}, f"quantize-{shape.layers}-{method}-{n}x{s}")
            settings = dict(method=method, bits=BITS, group=GROUP, nsamples=n, seqlen=s, stream=ms["stream"],
                            load_bytes=mm.DTYPE_BYTES[ms["load_dtype"]],
                            store_bytes=mm.DTYPE_BYTES.get(ms["calib_store"], 4))
            pred = predicted(mm.predict_quantize, shape, ctx["baseline"], **settings)
            rows.append({"phase": "quantize", "variant": f"{method} {n}×{s}", **r, "predicted": pred,
                         "command": "python -m lowbit " + shlex.join(argv)})
            if not r["error"] and (n, s) == calibs[0]:
                bases[method] = out
    return rows, bases


def init_rows(shape: LlamaShape, model: Path, bases: dict, ctx: dict) -> list[dict]:
    args, rows = ctx["args"], []
    method = "magr-gptq" if "magr-gptq" in bases else next(iter(bases), None)
    for init, (recipe, adapter, label) in RECIPES.items():
        variant = f"{label} ({'r' if adapter == 'lora' else 'N'}={args.rank if adapter == 'lora' else args.num_blocks})"
        n_ad = mm.adapter_params(shape, adapter, args.targets, args.rank, args.num_blocks)
        pred = predicted(mm.predict_init, shape, ctx["baseline"], init=init, bits=BITS, group=GROUP,
                         nsamples=args.nsamples, seqlen=args.seqlen, adapter_params=n_ad,
                         stream=ctx["memory"]["stream"])
        if method is None:
            rows.append({"phase": "init", "variant": variant, "error": "no quantized base", "peak_rss_bytes": None,
                         "wall_s": None, "predicted": pred})
            continue
        out = ctx["work"] / f"init-{shape.layers}-{init}"
        overrides = [f"model.name={model}", f"model.quantized={bases[method]}", f"quant.method={method}",
                     f"quant.bits={BITS}", f"quant.group_size={GROUP}", f"calibration.sources=[{ctx['calib']}]",
                     f"calibration.nsamples={args.nsamples}", f"calibration.seqlen={args.seqlen}",
                     f"adapter.rank={args.rank}", f"adapter.num_blocks={args.num_blocks}",
                     f"adapter.targets=[{','.join(args.targets)}]", f"output_dir={out}",
                     f"train.threads={args.threads or 'null'}"]
        if method.startswith("magr"):
            overrides.append(f"quant.options={{magr_iters: {args.magr_iters}}}")
        r = ctx["run"]("init", {"recipe": recipe, "overrides": overrides, "out": str(out)},
                       f"init-{shape.layers}-{init}")
        rows.append({"phase": "init", "variant": variant, **r, "predicted": pred, "recipe": recipe,
                     "overrides": overrides, "base": method})
    return rows


def train_rows(shape: LlamaShape, bases: dict, ctx: dict) -> list[dict]:
    args, rows = ctx["args"], []
    base = bases.get("magr-gptq") or next(iter(bases.values()), None)
    for batch in args.batches:
        for adapter in ("diablo", "lora"):
            size = f"N={args.num_blocks}" if adapter == "diablo" else f"r={args.rank}"
            variant = f"{'DiaBlo' if adapter == 'diablo' else 'LoRA'} {size} {batch}×{args.train_seqlen}"
            pred = predicted(mm.predict_train, shape, ctx["baseline"], adapter=adapter, targets=args.targets,
                             batch=batch, seqlen=args.train_seqlen, bits=BITS, group=GROUP, rank=args.rank,
                             num_blocks=args.num_blocks)
            spec = {"quantized": str(base), "adapter": adapter, "rank": args.rank, "num_blocks": args.num_blocks,
                    "targets": args.targets, "batch": batch, "seqlen": args.train_seqlen}
            r = ctx["run"]("train", spec, f"train-{shape.layers}-{adapter}-{batch}") if base else {
                "error": "no quantized base", "peak_rss_bytes": None, "wall_s": None}
            rows.append({"phase": "train", "variant": variant, "adapter": adapter, "batch": batch, **r,
                         "predicted": pred})
    return rows


# ---------------------------------------------------------------------------------------------- fits and tables

def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares ``(a, b)`` of ``y = a + b x``; ``None`` with fewer than two distinct ``x``."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def fits(rows: list[dict], width: dict) -> list[dict]:
    """Per phase and variant: the memory and time lines over the layer counts, and both 32-layer predictions."""
    out = []
    for key in dict.fromkeys((r["phase"], r["variant"]) for r in rows):
        ok = [r for r in rows if (r["phase"], r["variant"]) == key and not r.get("error") and r.get("peak_rss_bytes")]
        mem = line_fit([r["layers"] for r in ok], [r["peak_rss_bytes"] / mm.GiB for r in ok])
        t = line_fit([r["layers"] for r in ok], [r["wall_s"] for r in ok])
        proto = next(r for r in rows if (r["phase"], r["variant"]) == key)
        model32 = repredict(proto, LlamaShape(layers=32, **width), proto["predicted"]["baseline_bytes"])
        out.append({"phase": key[0], "variant": key[1], "layers": [r["layers"] for r in ok],
                    "fit_gib": None if mem is None else {"a": mem[0], "b_per_layer": mem[1]},
                    "fit_32_gib": None if mem is None else mem[0] + 32 * mem[1],
                    "model_32_gib": model32["total_bytes"] / mm.GiB, "model_32_terms": model32["terms"],
                    "time_per_layer_s": None if t is None else t[1],
                    "fit_32_s": None if t is None else t[0] + 32 * t[1]})
    return out


def repredict(row: dict, shape: LlamaShape, baseline: float) -> dict:
    """``row``'s prediction for another shape (the same settings)."""
    p = row["predicted"]["settings"]
    fn = {"generate": mm.predict_generate, "quantize": mm.predict_quantize, "init": mm.predict_init,
          "train": mm.predict_train}[row["phase"]]
    return fn(shape, baseline, **p)


def predicted(fn, shape: LlamaShape, baseline: float, **settings) -> dict:
    """``fn``'s prediction, with the settings it was made with (for :func:`repredict`)."""
    return {**fn(shape, baseline, **settings), "settings": settings}


def render(result: dict, info: dict) -> str:
    gib = lambda b: None if not b else b / mm.GiB  # noqa: E731
    w = result["width"]
    rows = [[r["phase"], r["variant"], r["layers"], gib(r.get("peak_rss_bytes")), gib(r["predicted"]["total_bytes"]),
             r.get("wall_s"), r.get("phase_s"), (r.get("error") or "")[:80] or None] for r in result["rows"]]
    table = md_table(["phase", "variant", "layers", "peak RSS GiB", "model GiB", "wall s", "phase s", "error"], rows)
    frows = [[f["phase"], f["variant"], None if not f["fit_gib"] else f"{f['fit_gib']['a']:.2f} + "
              f"{f['fit_gib']['b_per_layer']:.3f}·L", f["fit_32_gib"], f["model_32_gib"], f["time_per_layer_s"],
              f["fit_32_s"]] for f in result["fits"]]
    ftable = md_table(["phase", "variant", "fit GiB", "32 layers: fit GiB", "32 layers: model GiB", "s per layer",
                       "32 layers: fit s"], frows)
    ratios = md_table(["layers", "batch", "DiaBlo / LoRA peak", "above baseline", "trainable DiaBlo / LoRA"],
                      [[d["layers"], d["batch"], d["peak_ratio"], d["above_baseline_ratio"], d["trainable_ratio"]]
                       for d in result["diablo_over_lora"]])
    base, imp = result["baseline"], result["imports"]
    return (f"### Scale: peak memory and time per phase vs layers (h={w['hidden']}, m={w['intermediate']}, "
            f"{w['heads']} heads, V={w['vocab']}{', quick' if result['quick'] else ''})\n\n{header_line(info)}; one "
            f"subprocess per phase; baseline (import torch, transformers) {gib(base['peak_rss_bytes']) or 0:.2f} GiB, "
            f"{base['wall_s']:.1f} s; with the model classes and lowbit imported (the model's fixed cost) "
            f"{gib(imp['peak_rss_bytes']) or 0:.2f} GiB; quantize memory model: streaming "
            f"{'on' if result['memory_model']['stream'] else 'off'}; extra quantize args: "
            f"`{result['quantize_args'] or 'none'}`.\n\n{table}\n\nFits over layers and 32-layer predictions:\n\n"
            f"{ftable}\n\nTraining step, DiaBlo vs LoRA:\n\n{ratios}\n")


def diablo_over_lora(rows: list[dict]) -> list[dict]:
    out = []
    for r in (r for r in rows if r["phase"] == "train" and r["adapter"] == "diablo"):
        lo = next((x for x in rows if x["phase"] == "train" and x["adapter"] == "lora" and x["layers"] == r["layers"]
                   and x["batch"] == r["batch"]), None)
        if lo and r.get("peak_rss_bytes") and lo.get("peak_rss_bytes") and not r["error"] and not lo["error"]:
            base = r["baseline_bytes"]
            out.append({"layers": r["layers"], "batch": r["batch"],
                        "peak_ratio": r["peak_rss_bytes"] / lo["peak_rss_bytes"],
                        "above_baseline_ratio": (r["peak_rss_bytes"] - base) / max(1, lo["peak_rss_bytes"] - base),
                        "trainable_ratio": (r.get("trainable_params") or 0) / max(1, lo.get("trainable_params") or 1)})
    return out


def merge(paths: list[str]) -> dict:
    """One result from several runs' JSON (the same width; e.g. layer counts or phases run in separate sittings):
    their rows together, every prediction recomputed with the current memory model, fits over all rows."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len({json.dumps(r["width"], sort_keys=True) for r in runs}) != 1:
        raise SystemExit(f"--merge: the runs have different widths: {[r['width'] for r in runs]}")
    rows = []
    for run in runs:
        for r in run["rows"]:
            p = repredict(r, LlamaShape(layers=r["layers"], **run["width"]), r["baseline_bytes"])
            rows.append({**r, "predicted": {**p, "settings": r["predicted"]["settings"]},
                         "predicted_gib": p["total_bytes"] / mm.GiB, "source": Path(paths[runs.index(run)]).name})
    first = runs[0]
    return {**first, "merged_from": [Path(p).name for p in paths], "layers": sorted({r["layers"] for r in rows}),
            "methods": sorted({m for r in runs for m in r["methods"]}), "rows": rows,
            "fits": fits(rows, first["width"]), "diablo_over_lora": diablo_over_lora(rows),
            "calibration": [r["calibration"] for r in runs], "machines": [r["machine"] for r in runs]}


def main() -> None:
    args = parse_args()
    if args.merge:
        result = merge(args.merge)
        write_results(args.out_dir, "scale", result, render(result, result["machine"]))
        return
    dev = setup(args)
    info = machine_info(dev)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_scale-"))
    root = Path(args.model_dir) if args.model_dir else (work / "models" if args.quick else CACHE)
    width = {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
             "kv_heads": args.kv_heads or args.heads, "vocab": args.vocab}
    qextra = shlex.split(args.quantize_args)
    ctx = {"args": args, "work": work, "qextra": qextra, "memory": memory_settings(quantize_flags(), qextra),
           "device": dev.type, "run": lambda phase, spec, name: spawn(
               phase, spec, work / "logs" / f"{name}.log", args.child_timeout, args.threads, dev.type == "cuda")}
    longest = max([args.nsamples * args.seqlen] + ([128 * 2048] if args.large_calib else []))
    ctx["calib"] = Path(args.calib) if args.calib else write_calib(work / "calib.txt", int(1.2 * longest))
    baseline = ctx["run"]("baseline", {}, "baseline")
    imports = ctx["run"]("baseline", {"imports": True}, "imports")
    # The fixed cost of every phase process: torch, transformers, the model classes and lowbit imported.
    ctx["baseline"] = imports["peak_rss_bytes"] or baseline["peak_rss_bytes"] or 0
    ctx["plain_baseline"] = baseline["peak_rss_bytes"] or 0  # the generator imports no model class
    rows = []
    try:
        for L in args.layers:
            shape = LlamaShape(layers=L, **width)
            model, gen = ensure_checkpoint(shape, root, ctx)
            new = [gen] if gen else []
            bases = {}
            if {"quantize", "init", "train"} & set(args.phases):
                qrows, bases = quantize_rows(shape, model, ctx)
                new += qrows if "quantize" in args.phases else []
            new += init_rows(shape, model, bases, ctx) if "init" in args.phases else []
            new += train_rows(shape, bases, ctx) if "train" in args.phases else []
            rows += [{**r, "layers": L, "baseline_bytes": ctx["baseline"],
                      "peak_gib": (r.get("peak_rss_bytes") or 0) / mm.GiB,
                      "predicted_gib": r["predicted"]["total_bytes"] / mm.GiB} for r in new]
            if not args.keep_work:  # quantized bases and adapters of this layer count
                for p in work.glob(f"[qi]*-{L}-*"):
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "scale", "machine": info, "device": str(dev), "quick": args.quick, "width": width,
              "layers": args.layers, "bits": BITS, "group_size": GROUP, "methods": args.methods,
              "magr_iters": args.magr_iters, "calibration": [args.nsamples, args.seqlen],
              "large_calibration": args.large_calib, "quantize_args": args.quantize_args,
              "memory_model": ctx["memory"], "targets": args.targets, "rank": args.rank,
              "num_blocks": args.num_blocks, "train_seqlen": args.train_seqlen, "baseline": baseline,
              "imports": imports, "rows": rows,
              "fits": fits(rows, width), "diablo_over_lora": diablo_over_lora(rows)}
    write_results(args.out_dir, "scale", result, render(result, info))


if __name__ == "__main__":
    main()
