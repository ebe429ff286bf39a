"""The output directory of ``lowbit evaluate``: which settings produced the generations there (``settings.json``,
its record: a format other tools read) and the one rule for reusing, refusing or replacing them (:class:`RunDir`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..data.testsets import check_limit, known_datasets, resolve_datasets
from ..eval.config import EvalConfig
from ..io import DamagedFileError, read_json
from ..rundir import DAMAGED, OTHER, UNSTAMPED, RunDir, RunDirError

SETTINGS, SUMMARY = "settings.json", "summary.json"


def weights_fingerprint(path: str | None) -> str | None:
    """A cheap identity of a directory's weight files: a retrained adapter or re-quantized model in the same place
    must not be mixed with the generations of the old one. Their SHA-256 recorded by lowbit (quantized models,
    adapters: the same content rewritten, as by a resumed run, keeps its identity), else names, sizes and mtimes."""
    if path is None or not Path(path).is_dir():
        return None
    suffixes, h = (".safetensors", ".bin", ".pt", ".pth"), hashlib.sha256()
    metas = [Path(path) / m for m in ("quant_config.json", "lowbit_adapter.json") if (Path(path) / m).is_file()]
    try:
        recorded = (read_json(metas[0]).get("files") or {}) if metas else {}
    except DamagedFileError:
        # Loading reports the damage next, with the fix that fits the file; nothing is written before it.
        recorded = {}
    if recorded:
        h.update("".join(f"{n}:{d.get('sha256')};" for n, d in sorted(recorded.items()) if n.endswith(suffixes)
                         and isinstance(d, dict)).encode())
        return h.hexdigest()[:16]
    for f in sorted(f for f in Path(path).iterdir() if f.suffix in suffixes):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def settings_key(cfg: EvalConfig, model_path: str, quantized: bool, adapter_path: str | None, dtype: str) -> dict:
    max_new_tokens, num_beams = cfg.generation
    return {"model": model_path, "model_fingerprint": weights_fingerprint(model_path), "adapter": adapter_path,
            "adapter_fingerprint": weights_fingerprint(adapter_path), "prompt": cfg.prompt, "num_beams": num_beams,
            "max_new_tokens": max_new_tokens, "dtype": "as stored" if quantized else dtype}


def recorded_settings(out: Path) -> dict | None:
    """``settings.json``: evaluate's record of its run, its stamp (other tools read its format)."""
    f, fix = out / SETTINGS, "pass --overwrite to discard the generations there"
    old = read_json(f, fix) if f.is_file() else None
    if old is not None and not isinstance(old, dict):
        raise DamagedFileError(f, f"{f} is corrupt (not a settings object)", fix)
    return None if old is None else {"settings": old, "complete": False}


def out_dir(out: Path, dataset_names: list[str]) -> RunDir:
    """An evaluation's ``--out``: holds it when it has ``settings.json`` or rows of a known set (it may be a
    fine-tuning run directory, whose own files are not the evaluation's). Settings written by an earlier lowbit
    lack keys added since; those are not compared."""
    names = {*known_datasets(), *dataset_names}
    return RunDir(out, "evaluate", lambda old, new: all(old.get(k) == v for k, v in new.items()),
                  what="evaluation", stamp=None, recorded=recorded_settings, record=SETTINGS,
                  mine=lambda p: (p / SETTINGS).is_file() or any((p / f"{n}.jsonl").is_file() for n in names))


def check_settings(out: Path, key: dict, dataset_names: list[str], overwrite: bool) -> list[Path]:
    """Refuse an ``--out`` holding generations made with other settings (unless ``overwrite``); -> the result files
    to discard. Nothing is deleted or written here, so a run that fails later (a bad adapter) changes nothing."""
    rd = out_dir(out, dataset_names)
    state = rd.state(key)
    if state == UNSTAMPED and not overwrite:
        raise RunDirError(out, state, f"{out / SETTINGS} is missing, so the settings that generated the rows in "
                                      f"{out} are unknown; pass --overwrite to discard those rows (or choose another "
                                      f"--out)")
    rd.check(key, overwrite=overwrite)
    if not overwrite:
        return []
    # Other or unknown settings: every set there is stale. Only our own files: --out may be a fine-tuning run.
    names = known_datasets() if state in (OTHER, UNSTAMPED, DAMAGED) else dataset_names
    return [p for p in [out / f"{n}.jsonl" for n in names] + [out / SUMMARY] if p.exists()]


def check_eval_sets(names: list[str], limits: tuple[int | None, ...], data_dir: str | None) -> None:
    """Before any work: every set resolves (its files present) and no limit reads past what the training data
    excludes (:func:`lowbit.data.testsets.check_limit`)."""
    resolve_datasets(list(names), data_dir)
    for n in names:
        for limit in limits:
            check_limit(n, limit)
