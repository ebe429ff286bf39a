"""Shared helpers of the benchmark scripts: machine description, interleaved timing, peak memory, result files.

Every script measures ratios against a baseline run in the same process, with the candidates interleaved
round-robin (``interleaved``), so that load from other jobs on a shared machine hits all of them alike; each
result records the load average before and after. Results go to ``benchmarks/results/<name>.json`` and a short
markdown table to ``benchmarks/results/<name>.md`` (``--out-dir`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))

from lowbit.io import atomic_write_json, atomic_write_text  # noqa: E402

# ----------------------------------------------------------------------------------------------- arguments

def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small shapes, 1-2 repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <name>.json and <name>.md go")
    return ap


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, seed, and resolve the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(dev)


# ----------------------------------------------------------------------------------------------- machine

def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def machine_info(device: torch.device | None = None) -> dict:
    """CPU model and its relevant ISA flags, core count, torch build, threads, load, GPU if any."""
    model, flags = _cpu_model_and_flags()
    info = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "isa": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE")
                if k in os.environ},
        "loadavg_start": list(os.getloadavg()),
    }
    if device is not None and device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                       "peak_bandwidth_gbs": gpu_peak_bandwidth_gbs(device)}
    return info


def bf16_note(info: dict) -> str:
    if info.get("gpu"):
        return ""
    if info["isa"].get("avx512_bf16") or info["isa"].get("amx_bf16"):
        return "this CPU has native bf16 dot products (avx512_bf16/amx)"
    return ("this CPU lacks avx512_bf16/amx_bf16: bf16 matmuls are emulated and much slower than fp32 here "
            "(bf16 numbers are reported as measured)")


def gpu_peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (2 transfers per clock), if torch exposes them."""
    p = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return None


def measured_copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Achievable device bandwidth: a large device-to-device copy (read + write bytes / time)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ts = interleaved({"copy": lambda: b.copy_(a)}, repeats, device=device)["copy"]
    return 2 * nbytes / statistics.median(ts) / 1e9


# ----------------------------------------------------------------------------------------------- timing

def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``repeats`` rounds, each round calling
    every function once in turn (so slow drifts in machine load affect all candidates alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
        sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def bootstrap_median_ci(xs: list[float], n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """``(median, lo, hi)``: the median of ``xs`` and its 95% percentile-bootstrap interval."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    return statistics.median(xs), meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


def ratio_verdict(lo: float, hi: float, target: float | None, higher_is_better: bool = False) -> str:
    """``met`` / ``missed`` / ``unresolved`` for a ratio's 95% interval against ``target`` (``ratio <= target``
    is met, or ``>=`` when higher is better); ``report`` without a target."""
    if target is None:
        return "report"
    if higher_is_better:
        return "met" if lo >= target else "missed" if hi < target else "unresolved"
    return "met" if hi <= target else "missed" if lo > target else "unresolved"


def paired_ratios(fns: dict[str, Callable[[], object]], baseline: str, *, min_repeats: int = 5,
                  max_repeats: int = 30, time_cap_s: float = 600.0, rel_half_width: float = 0.05, warmup: int = 1,
                  targets: dict[str, float | None] | None = None, higher_is_better: bool = False,
                  device: torch.device | None = None,
                  prepare: dict[str, Callable[[], object]] | None = None) -> dict:
    """Time every function of ``fns`` against ``fns[baseline]`` in paired rounds: after ``warmup`` untimed rounds,
    each round calls every function once (the order rotated by one per round, so drifts in machine load and
    cache state hit all alike) and gives one ratio ``t_k / t_baseline`` per candidate. Rounds are added until
    every candidate's bootstrap 95% interval of the median ratio is within ``±rel_half_width`` of it, or
    ``max_repeats`` rounds, or ``time_cap_s`` seconds (checked once ``min_repeats`` rounds are done).

    Returns ``{"repeats", "times": {name: summary}, "ratios": {name: {"ratio", "ci95", "narrow", "target",
    "verdict", "ratios"}}}`` (``ratios`` for every name but the baseline); the verdict comes from the interval only
    (:func:`ratio_verdict` against ``targets[name]``; ``report`` without a target). ``prepare[name]``, where
    given, runs untimed before every call of ``fns[name]`` (per-call state a timed call consumes)."""
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(fns)}")
    names = list(fns)
    targets = targets or {}
    prepare = prepare or {}
    for _ in range(warmup):
        for k, f in fns.items():
            if k in prepare:
                prepare[k]()
            f()
        sync(device)
    t_start = time.perf_counter()
    times: dict[str, list[float]] = {k: [] for k in names}
    rounds = 0
    while True:
        shift = rounds % len(names)
        for k in names[shift:] + names[:shift]:
            if k in prepare:
                prepare[k]()
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
        rounds += 1
        if rounds < max(min_repeats, 2):
            continue
        per = {k: [a / b for a, b in zip(times[k], times[baseline])] for k in names if k != baseline}
        cis = {k: bootstrap_median_ci(v) for k, v in per.items()}
        narrow = {k: max(hi - med, med - lo) <= rel_half_width * med for k, (med, lo, hi) in cis.items()}
        if all(narrow.values()) or rounds >= max_repeats or time.perf_counter() - t_start >= time_cap_s:
            break
    ratios = {k: ratio_stats(times[k], times[baseline], targets.get(k), higher_is_better) for k in per}
    return {"repeats": rounds, "times": {k: summary(v) for k, v in times.items()}, "ratios": ratios}


def ratio_stats(a: list[float], b: list[float], target: float | None = None, higher_is_better: bool = False,
                rel_half_width: float = 0.05) -> dict:
    """The paired ratio ``a[i] / b[i]`` of two timings taken in the same rounds: median, bootstrap 95% interval,
    whether it is within ``±rel_half_width``, and the verdict against ``target``."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired timings need two equal-length lists of >= 2, got {len(a)} and {len(b)}")
    per = [x / y for x, y in zip(a, b)]
    med, lo, hi = bootstrap_median_ci(per)
    return {"ratio": med, "ci95": [lo, hi], "narrow": max(hi - med, med - lo) <= rel_half_width * med,
            "target": target, "verdict": ratio_verdict(lo, hi, target, higher_is_better),
            "ratios": [round(r, 5) for r in per]}


def paired_ratio(candidate: Callable[[], object], baseline: Callable[[], object], *, min_repeats: int = 5,
                 max_repeats: int = 30, time_cap_s: float = 600.0, rel_half_width: float = 0.05, warmup: int = 1,
                 target: float | None = None, device: torch.device | None = None) -> dict:
    """:func:`paired_ratios` for one candidate: the median ratio candidate/baseline, its interval, the verdict
    against ``target`` and both timing summaries."""
    r = paired_ratios({"c": candidate, "b": baseline}, "b", min_repeats=min_repeats, max_repeats=max_repeats,
                      time_cap_s=time_cap_s, rel_half_width=rel_half_width, warmup=warmup, targets={"c": target},
                      device=device)
    return {**r["ratios"]["c"], "repeats": r["repeats"], "candidate": r["times"]["c"], "baseline": r["times"]["b"]}


def ci_cell(r: dict) -> str:
    """``0.97 [0.93, 1.01]``: a ratio record's median and 95% interval for a table cell."""
    return f"{r['ratio']:.3g} [{r['ci95'][0]:.3g}, {r['ci95'][1]:.3g}]"


def verdict_row(benchmark: str, what: str, r: dict, target_text: str | None = None) -> dict:
    """One line of the generated README benchmark table (collected by ``benchmarks/summarize.py``)."""
    t = r.get("target")
    return {"benchmark": benchmark, "what": what, "ratio": r["ratio"], "ci95": r["ci95"],
            "repeats": r.get("repeats", len(r.get("ratios", []))),
            "target": target_text or (None if t is None else f"≤ {t:g}"), "verdict": r["verdict"]}


def timed_once(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def summary(ts: list[float]) -> dict:
    """Median and spread (max - min, and the interquartile range) of repeated timings, in seconds."""
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "spread_s": max(ts) - min(ts),
            "iqr_s": q[2] - q[0], "repeats": len(ts), "times_s": [round(t, 6) for t in ts]}


# ----------------------------------------------------------------------------------------------- memory

def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def own_peak_rss_bytes() -> int | None:
    """This process's own peak RSS (``VmHWM``; unlike ``ru_maxrss``, not inherited from the parent process)."""
    return _proc_status_bytes("VmHWM")


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_delta(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory above the level before ``fn`` while it runs once.

    CUDA: ``max_memory_allocated`` (the caching allocator's exact tensor peak). CPU: the process's peak RSS
    (``VmHWM``, reset just before) minus its RSS before — every page touched, allocator overhead included; a
    peak that reuses memory freed earlier in the process can read low, so this is a lower bound. ``None`` where
    /proc is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_delta_bytes": torch.cuda.max_memory_allocated(device) - before, "how": "cuda max_allocated"}
    before = _proc_status_bytes("VmRSS")
    if before is None or not _reset_hwm():
        fn()
        return {"peak_delta_bytes": None, "how": "unavailable"}
    fn()
    return {"peak_delta_bytes": max(0, _proc_status_bytes("VmHWM") - before), "how": "VmHWM - VmRSS (cpu)"}


def saved_tensor_bytes(fn: Callable[[], object], module: torch.nn.Module | None = None) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn`` runs its forward pass: the
    activation memory a layer adds to a network. Storages of ``module``'s parameters and buffers (which exist
    anyway) are not counted."""
    seen: dict[int, int] = {}
    own = set() if module is None else {t.untyped_storage().data_ptr()
                                        for t in list(module.parameters()) + list(module.buffers())}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def max_rss_bytes() -> int:
    """Peak RSS of this process so far (``ru_maxrss``; Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def module_bytes(m: torch.nn.Module) -> int:
    """Parameter + buffer bytes of a module (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in list(m.parameters()) + list(m.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------- data

def realistic_activations(n_tokens: int, inp: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Correlated (rank in/8 + noise) activations with log-normal channel scales and 8 outlier channels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = max(8, inp // 8)
    X = torch.randn(n_tokens, r, generator=g) @ (torch.randn(r, inp, generator=g) / r**0.5)
    X = X * torch.exp(0.5 * torch.randn(inp, generator=g)) + 0.05 * torch.randn(n_tokens, inp, generator=g)
    out = torch.randperm(inp, generator=g)[:8]
    X[:, out] *= 25
    return X.to(device)


# ----------------------------------------------------------------------------------------------- output

def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, result: dict, markdown: str) -> None:
    """``<out_dir>/<name>.json`` (with the final load average) and ``<out_dir>/<name>.md``; prints the table."""
    result.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / f"{name}.json", result)
    atomic_write_text(out_dir / f"{name}.md", markdown.rstrip() + "\n")
    print(markdown)
    print(f"[wrote {out_dir / (name + '.json')} and {name}.md]")


def header_line(info: dict, extra: str = "") -> str:
    """One italic line: machine, torch, threads, 1-minute load average at the start and now."""
    la0, la1 = info["loadavg_start"][0], os.getloadavg()[0]
    gpu = f", GPU {info['gpu']['name']}" if info.get("gpu") else ""
    return (f"_{info['cpu']} ({info['cpu_count']} cores{gpu}), torch {info['torch']}, {info['threads']} threads, "
            f"load average {la0:.2f} at start / {la1:.2f} at end{extra}_")
