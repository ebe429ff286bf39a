"""One home for output directories: :class:`RunDir` answers "does this directory hold the same run?" for every lowbit
command (quantize, finetune, evaluate, export, the experiment runner), from a sealed stamp of the settings that
produced it, and refuses, resumes or replaces by one rule.

The stamp (``lowbit_run.json``) holds the command, its settings (any JSON mapping the command chooses: every setting
that changes the result) and whether the run finished. A damaged stamp is a :class:`~lowbit.io.DamagedFileError`
carrying the path and the fix; nothing here parses messages. A directory without a stamp is read through the
command's own record where it has one (``recorded``: what an earlier lowbit wrote, or evaluate's ``settings.json``).

Where each command stamps: ``quantize`` inside its atomically written ``--out`` (finished); ``finetune`` when it
writes ``config.yaml`` (unfinished) and again after ``run.json`` (finished); ``export`` after the export is
complete; ``evaluate`` keeps ``settings.json`` (its format is read by other tools) as its record.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from .io import DamagedFileError, atomic_write_json, read_json, recover_dir, sealed

log = logging.getLogger(__name__)

STAMP = "lowbit_run.json"

#: The states of a directory against the settings about to run in it.
NEW, PARTIAL, DONE, OTHER, UNSTAMPED, DAMAGED = "new", "partial", "done", "other", "unstamped", "damaged"


class RunDirError(ValueError):
    """A directory that cannot be used for this run without losing something: ``path``, its ``state`` and the fix."""

    def __init__(self, path: Path, state: str, message: str) -> None:
        self.path, self.state = path, state
        super().__init__(message)


class RunDir:
    """An output directory of ``command`` (``quantize``, ``finetune``, ``evaluate``, ``export``, ``experiment``).

    ``same(old_settings, new_settings)`` decides equality of settings (default ``==``); commands whose settings hold
    configs of older lowbit versions pass a comparison that normalises them. ``what`` names the result in messages
    ("quantized model").

    ``recorded(path)`` reads the settings a command recorded in its own files, for a directory without a stamp: one
    an earlier lowbit wrote (quantize's ``quant_config.json``, finetune's ``config.yaml``), or a command whose own
    record is the stamp (evaluate's ``settings.json``, a format other tools read; it passes ``stamp=None``). It
    returns a stamp-like ``{"settings": ..., "complete": ...}``, ``None`` when the directory holds no record of
    the command, or raises :class:`~lowbit.io.DamagedFileError`. ``mine(path)``: whether the directory holds files
    of this command at all (default: any entry); a directory holding none is ``new``, so a command may write into a
    directory another one owns (evaluate into a fine-tuning run). ``record``: the file ``recorded`` reads, named
    when a directory lacks it.
    """

    def __init__(self, path: str | Path, command: str,
                 same: Callable[[dict, dict], bool] | None = None, *, what: str | None = None,
                 stamp: str | None = STAMP, recorded: Callable[[Path], dict | None] | None = None,
                 mine: Callable[[Path], bool] | None = None, record: str | None = None) -> None:
        self.path = recover_dir(Path(path).expanduser())  # a directory swap cut short by a crash is finished first
        self.command = command
        self.same = same or (lambda a, b: a == b)
        self.what = what or f"{command} run"
        self.stamp_name, self.recorded, self.mine, self.record = stamp, recorded, mine, record
        #: After :meth:`state`: the stamp (or record) read, and the damage found, if any.
        self.found: dict | None = None
        self.damage: DamagedFileError | None = None

    @property
    def stamp_path(self) -> Path:
        return self.path / (self.stamp_name or STAMP)

    def is_empty(self) -> bool:
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            return True
        return self.mine is not None and self.path.is_dir() and not self.mine(self.path)

    def read_stamp(self) -> dict | None:
        """The stamp (else the command's own record, ``recorded``), or ``None`` without one;
        :class:`DamagedFileError` when it is damaged."""
        if self.stamp_name is None or not self.stamp_path.is_file():
            found = self.recorded(self.path) if self.recorded is not None else None
            return None if found is None else {"command": self.command, **found}
        stamp = read_json(self.stamp_path, f"delete {self.path} and run the command again")
        if not isinstance(stamp, dict) or not isinstance(stamp.get("settings"), dict):
            raise DamagedFileError(self.stamp_path, f"{self.stamp_path} is not a lowbit run stamp",
                                   f"delete {self.path} and run the command again")
        return stamp

    def state(self, settings: dict) -> str:
        """``new`` (missing or empty), ``done`` / ``partial`` (the same settings, finished or not), ``other`` (other
        settings or another command), ``unstamped`` (holds files but no stamp or record) or ``damaged``
        (unreadable stamp or record: :attr:`damage`)."""
        self.found = self.damage = None
        if self.path.exists() and not self.path.is_dir():
            return OTHER
        if self.is_empty():
            return NEW
        try:
            stamp = self.found = self.read_stamp()
        except DamagedFileError as e:
            log.warning("%s", e.reason)
            self.damage = e
            return DAMAGED
        if stamp is None:
            return UNSTAMPED
        plain = json.loads(json.dumps(settings))  # as the stamp reads it back: tuples are lists there
        if stamp.get("command") != self.command or not self.same(stamp["settings"], plain):
            return OTHER
        return DONE if stamp.get("complete") else PARTIAL

    def check(self, settings: dict, *, overwrite: bool = False, resume: bool = True, flag: str = "--out") -> str:
        """The rule of :meth:`claim` without writing anything: returns the state; refuses (a :class:`RunDirError`
        naming the path, what it holds and the fix) a directory that is neither new nor (with ``resume``) this run,
        unless ``overwrite``. Commands that must leave the directory untouched until their expensive part succeeds
        call this first."""
        state = self.state(settings)
        if state == NEW or overwrite or (state in (DONE, PARTIAL) and resume):
            return state
        raise RunDirError(self.path, state, f"{flag} {self.path} {self.holds(state, settings)}; choose another "
                                            f"path, remove it, or pass --overwrite to replace it")

    def holds(self, state: str, settings: dict) -> str:
        """What the directory holds, for a message: "already holds a different quantized model (bits 4 there, 2
        now)"."""
        if state == OTHER and self.path.is_file():
            return "is a file, not a directory"
        if state == OTHER:
            old = (self.found or {}).get("settings") or {}
            if (self.found or {}).get("command") != self.command:
                return f"already holds the output of `{self.found['command']}`, not a {self.what}"
            plain = json.loads(json.dumps(settings))
            return f"already holds a different {self.what} ({describe_difference(old, plain)})"
        if state == DAMAGED:
            return f"holds a damaged {self.what} ({self.damage.reason if self.damage else 'unreadable stamp'})"
        unstamped = f"no {self.record}" if self.record else "files lowbit did not stamp"
        return {UNSTAMPED: f"is a non-empty directory that is not a lowbit {self.what} ({unstamped})",
                DONE: f"already holds this {self.what}, finished", PARTIAL: f"already holds this {self.what}, "
                                                                             f"unfinished"}[state]

    def claim(self, settings: dict, *, overwrite: bool = False, resume: bool = True, flag: str = "--out") -> str:
        """Make the directory ready for a run of ``settings``; returns its state before. ``done``/``partial`` with
        ``resume``: kept as they are (the caller reuses or continues). Anything else that is not empty: replaced when
        ``overwrite``, else refused with a :class:`RunDirError` naming the path, what it holds and the fix."""
        state = self.check(settings, overwrite=overwrite, resume=resume, flag=flag)
        if state in (DONE, PARTIAL) and resume:
            return state
        if state != NEW:
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_stamp(settings, complete=False)
        return state

    def stamp_text(self, settings: dict, complete: bool) -> str:
        """The stamp as file content, for a command that writes it inside an atomic directory of its own."""
        stamp = {"command": self.command, "settings": settings, "complete": complete}
        return json.dumps(sealed(stamp), indent=2) + "\n"

    def write_stamp(self, settings: dict, complete: bool, **record) -> None:
        """Write the stamp; ``record``: facts about the result (a weight hash, ...) kept beside the settings."""
        atomic_write_json(self.stamp_path, {"command": self.command, "settings": settings, "complete": complete,
                                            **record}, seal=True)

    def finish(self, settings: dict, **record) -> None:
        """Mark the run complete (after its last file is written)."""
        self.write_stamp(settings, complete=True, **record)

    def clear(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path)
        elif self.path.exists():
            self.path.unlink()


def describe_difference(old: dict, new: dict, limit: int = 4) -> str:
    """The settings that differ, flattened: ``"quantization.bits 4 there, 2 now"``."""
    a, b = _flatten(old), _flatten(new)
    diff = [k for k in sorted(set(a) | set(b), key=lambda k: (k not in b, k)) if a.get(k) != b.get(k)]
    text = ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in diff[:limit])
    return text + (f" and {len(diff) - limit} more" if len(diff) > limit else "") if diff else "other settings"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
