"""Calibration data for quantization: text sources -> ``(nsamples, seqlen)`` token windows, plus a held-out slice.

Sources are local files (``.txt``; ``.json``/``.jsonl`` records with a ``text`` field, Alpaca/Math10K fields
``instruction``/``input``/``output``, or GSM8K ``question``/``answer``, whose text
:func:`lowbit.data.records.record_text` takes) or, for users with network access, the names ``wikitext2`` and
``c4`` (loaded with ``datasets``); ``data:gsm8k_openai/train.jsonl`` names a file under the data directory
(``$LOWBIT_DATA_DIR``). Records of a training file the validation sets are carved from (``gsm8k_openai/train.jsonl``,
``mawps/trainset.json``) whose question is held out for validation are left out (:mod:`lowbit.data.validation`).
As in the GPTQ reference, calibration samples are random windows of ``seqlen`` tokens from the concatenated text;
the last ``heldout_frac`` of the tokens is kept apart for perplexity and never used for calibration.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .records import read_utf8, record_text
from .validation import drop_held_out, training_file_data_dir

log = logging.getLogger(__name__)

HUB_SOURCES = ("wikitext2", "c4")


DATA_PREFIX = "data:"
#: What a calibration file must be, for the errors about one that is not.
CALIBRATION_FIX = ("calibration files are UTF-8 text: .txt (documents separated by blank lines), or .json/.jsonl "
                   "records with a text field; convert it or pass another file with --calib (a recipe's "
                   "calibration.sources)")


def resolve_source(source: str) -> str:
    """``data:<relative path>`` -> that file under the data directory (``$LOWBIT_DATA_DIR``, default
    ``../shared/data`` beside the checkout), so recipes name shipped files without absolute paths."""
    if not source.startswith(DATA_PREFIX):
        return source
    from .testsets import DATA_DIR_ENV, default_data_dir

    root = default_data_dir()
    if root is None:
        raise FileNotFoundError(f"calibration source {source!r} is read from the data directory, but none is set: "
                                f"set {DATA_DIR_ENV} to the folder holding {source[len(DATA_PREFIX):]}")
    path = root / source[len(DATA_PREFIX):]
    if not path.is_file():
        raise FileNotFoundError(f"calibration source {source!r}: {path} does not exist (data directory {root}, "
                                f"from {DATA_DIR_ENV} or the checkout default)")
    return str(path)


def load_texts(source: str) -> list[str]:
    """Documents from one source (file path, ``data:<path under the data directory>`` or hub name); a training
    file of the validation split (:func:`lowbit.data.validation.training_file_data_dir`) without its held-out
    records."""
    source = resolve_source(source)
    p = Path(source)
    if p.is_file():
        text = read_utf8(p, "calibration source", CALIBRATION_FIX)
        if p.suffix not in (".jsonl", ".json"):
            return [t for t in text.split("\n\n") if t.strip()]
        data = _json_records(p, text)
        root = training_file_data_dir(p)
        if root is not None:
            kept = drop_held_out(data, root)
            log.info("calibration source %s: left out %d records held out for validation", p, len(data) - len(kept))
            data = kept
        return [record_text(r) for r in data]
    if source in HUB_SOURCES:
        from datasets import load_dataset

        if source == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        else:
            ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                              split="train")
        return [t for t in ds["text"] if t.strip()]
    raise FileNotFoundError(f"calibration source {source!r} is neither an existing file nor one of {HUB_SOURCES}; "
                            f"pass a .txt/.json/.jsonl file with --calib")


def check_sources(sources: list[str]) -> None:
    """Read every local calibration file now (a few MB of text), so that a missing or undecodable one is reported
    before expensive work rather than after it; hub names and ``tiny`` are left to the reader."""
    for source in sources:
        if source != "tiny" and source not in HUB_SOURCES:
            load_texts(source)


def _json_records(p: Path, text: str) -> list:
    """The records of a calibration .json (an array, ``{"data": [...]}`` or one object) or .jsonl file; invalid
    JSON is a ``ValueError`` naming the file (and the line of a .jsonl)."""
    if p.suffix == ".jsonl":
        data = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"calibration source {p}: line {lineno} is not valid JSON ({e}); "
                                     f"{CALIBRATION_FIX}") from None
        return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration source {p} is not valid JSON ({e}); {CALIBRATION_FIX}") from None
    return data if isinstance(data, list) else data.get("data", [data]) if isinstance(data, dict) else [data]


def tokenize_sources(tokenizer, sources: list[str]) -> torch.Tensor:
    """All sources' documents, joined by blank lines and tokenized -> 1-D int64 token ids."""
    texts = [t for s in sources for t in load_texts(s)]
    text = "\n\n".join(t for t in texts if t.strip())
    if not text.strip():
        raise ValueError(f"calibration set {sources} is empty: no text found; pass a file with text records")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids.long()


def split_calibration(ids: torch.Tensor, nsamples: int, seqlen: int, heldout_frac: float = 0.1,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (``(nsamples, seqlen)`` random calibration windows, held-out 1-D ids)."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
    n_held = int(len(ids) * heldout_frac)
    train = ids[: len(ids) - n_held]
    held = ids[len(ids) - n_held:]
    if len(train) < seqlen + 1:
        raise ValueError(f"calibration set too short: {len(train)} tokens (after holding out {n_held} for "
                         f"perplexity) but seqlen={seqlen} needs at least {seqlen + 1}; pass more text with --calib "
                         f"or lower --seqlen")
    if len(train) < nsamples * seqlen:
        log.warning("calibration set has %d tokens < nsamples*seqlen = %d: windows will overlap",
                    len(train), nsamples * seqlen)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - seqlen, (nsamples,), generator=g)
    windows = torch.stack([train[s: s + seqlen] for s in starts.tolist()])
    return windows, held
