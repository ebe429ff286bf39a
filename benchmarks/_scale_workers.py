"""The child processes of ``bench_scale.py``: one phase per process, which prints one ``RESULT {json}`` line with
its own peak RSS (``VmHWM``, read in the child: a child's ``ru_maxrss`` starts from its parent's RSS at the fork).

``python benchmarks/_scale_workers.py PHASE SPEC_JSON`` with PHASE one of ``baseline`` (imports torch and
transformers, nothing else: the fixed cost every phase pays), ``generate`` (write a random checkpoint),
``quantize`` (``python -m lowbit quantize ARGV``, run in this process through :mod:`runpy`), ``init`` (a recipe's
adapter initialisation, :func:`lowbit.recipes.initialised.initialise`) and ``train`` (one AdamW step on a packed
base with fresh adapters). Every phase imports torch and transformers before its clock starts; ``phase_s`` is the
phase itself, the parent measures the whole process.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from _common import own_peak_rss_bytes  # noqa: E402  (imports torch)


def baseline(spec: dict) -> dict:
    """Nothing beyond torch and transformers, or (``imports``) also the model classes and lowbit's drivers."""
    if spec.get("imports"):
        from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

        import lowbit.adapters  # noqa: F401
        import lowbit.cli  # noqa: F401
        import lowbit.recipes.finetune  # noqa: F401
    return {}


def generate(spec: dict) -> dict:
    from lowbit.models.random_llama import write_random_llama

    out = write_random_llama(progress=False, **spec)
    return {"checkpoint_bytes": sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))}


def quantize(spec: dict) -> dict:
    """Exactly ``python -m lowbit ARGV``."""
    sys.argv = ["lowbit", *spec["argv"]]
    try:
        runpy.run_module("lowbit", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"lowbit quantize exited with status {e.code}") from None
    return {}


def _count(path: Path) -> int | None:
    from safetensors import safe_open

    files = list(path.rglob("adapter_model.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def init(spec: dict) -> dict:
    from lowbit.recipes.config import load_recipe
    from lowbit.recipes.initialised import initialise

    cfg = load_recipe(spec["recipe"], spec["overrides"])
    initialise(cfg, spec["out"])
    return {"trainable_params": _count(Path(spec["out"]))}


def train(spec: dict) -> dict:
    """One step (forward, loss, backward, AdamW update) with gradient checkpointing on random tokens."""
    import torch

    from lowbit.adapters import AdapterConfig, apply_adapters
    from lowbit.quant import load_quantized

    t0 = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_quantized(spec["quantized"], device=dev)
    cfg = AdapterConfig(adapter=spec["adapter"], init="default", rank=spec["rank"], alpha=16.0,
                        num_blocks=spec["num_blocks"], targets=spec["targets"])
    report = apply_adapters(model, cfg, None, progress=False)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (spec["batch"], spec["seqlen"]), generator=g).to(dev)
    t1 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"trainable_params": report["trainable"], "loss": float(loss), "load_s": t1 - t0,
            "step_s": time.perf_counter() - t1}


# ---------------------------------------------------------------------------------------------- parent side

def spawn(phase: str, spec: dict, log: Path, timeout: float, threads: int | None, cuda: bool = False) -> dict:
    """Run one phase in a fresh process; -> its RESULT (peak RSS, phase time, error) plus the wall time. Without
    ``cuda`` the child sees no GPU, so every phase runs on the CPU whatever lowbit's own device defaults are."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env.update(BENCH_SCALE_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    log.parent.mkdir(parents=True, exist_ok=True)
    polled, killed, t0 = 0, False, time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), phase, json.dumps(spec)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
        while proc.poll() is None:  # VmHWM of the live child: the peak of a child killed before it reports
            polled = max(polled, _vmhwm(proc.pid))
            if time.perf_counter() - t0 > timeout and not killed:
                proc.kill()
                killed = True
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    text = log.read_text()
    line = next((x for x in reversed(text.splitlines()) if x.startswith("RESULT ")), None)
    why = f"killed after the {timeout:.0f} s timeout" if killed else f"exit status {proc.returncode}"
    res = json.loads(line[7:]) if line else {"error": f"{why}, no result", "phase_s": None, "peak_rss_bytes": None}
    res["peak_rss_bytes"] = res.get("peak_rss_bytes") or polled or None
    if res["error"]:
        res["error"] += " | log tail: " + " ".join(text[-600:].split())
    return {**res, "wall_s": wall, "log": str(log)}


def _vmhwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


PHASES = {"baseline": baseline, "generate": generate, "quantize": quantize, "init": init, "train": train}


def main() -> None:
    phase, spec = sys.argv[1], json.loads(sys.argv[2])
    import torch
    import transformers  # noqa: F401  (the baseline's cost, paid before the clock starts)

    if os.environ.get("BENCH_SCALE_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_SCALE_THREADS"]))
    t0 = time.perf_counter()
    out: dict = {"error": None}
    try:
        out.update(PHASES[phase](spec))
    except Exception as e:  # reported in the JSON: one failing phase must not end the benchmark
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    out.update(phase_s=time.perf_counter() - t0, peak_rss_bytes=own_peak_rss_bytes())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
