"""One home for output directories: :class:`RunDir` answers "does this directory hold the same run?" for every lowbit
command (quantize, finetune, evaluate, export, the experiment runner), from a sealed stamp of the settings that
produced it, and refuses, resumes or replaces by one rule.

The stamp (``lowbit_run.json``) holds the command, its settings (any JSON mapping the command chooses: every setting
that changes the result) and whether the run finished. A damaged stamp is a :class:`~lowbit.io.DamagedFileError`
carrying the path and the fix; nothing here parses messages.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from .io import DamagedFileError, atomic_write_json, read_json, recover_dir

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
    configs of older lowbit versions pass a comparison that normalises them.
    """

    def __init__(self, path: str | Path, command: str,
                 same: Callable[[dict, dict], bool] | None = None) -> None:
        self.path = recover_dir(Path(path).expanduser())  # a directory swap cut short by a crash is finished first
        self.command = command
        self.same = same or (lambda a, b: a == b)

    @property
    def stamp_path(self) -> Path:
        return self.path / STAMP

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def read_stamp(self) -> dict | None:
        """The stamp, or ``None`` without one; :class:`DamagedFileError` when it is damaged."""
        if not self.stamp_path.is_file():
            return None
        stamp = read_json(self.stamp_path, f"delete {self.path} and run the command again")
        if not isinstance(stamp, dict) or not isinstance(stamp.get("settings"), dict):
            raise DamagedFileError(self.stamp_path, f"{self.stamp_path} is not a lowbit run stamp",
                                   f"delete {self.path} and run the command again")
        return stamp

    def state(self, settings: dict) -> str:
        """``new`` (missing or empty), ``done`` / ``partial`` (the same settings, finished or not), ``other`` (other
        settings or another command), ``unstamped`` (holds files but no stamp) or ``damaged`` (unreadable stamp)."""
        if self.path.exists() and not self.path.is_dir():
            return OTHER
        if self.is_empty():
            return NEW
        try:
            stamp = self.read_stamp()
        except DamagedFileError as e:
            log.warning("%s", e.reason)
            return DAMAGED
        if stamp is None:
            return UNSTAMPED
        if stamp.get("command") != self.command or not self.same(stamp["settings"], settings):
            return OTHER
        return DONE if stamp.get("complete") else PARTIAL

    def claim(self, settings: dict, *, overwrite: bool = False, resume: bool = True, flag: str = "--out") -> str:
        """Make the directory ready for a run of ``settings``; returns its state before. ``done``/``partial`` with
        ``resume``: kept as they are (the caller reuses or continues). Anything else that is not empty: replaced when
        ``overwrite``, else refused with a :class:`RunDirError` naming the path, what it holds and the fix."""
        state = self.state(settings)
        if state in (DONE, PARTIAL) and resume:
            return state
        if state != NEW:
            if not overwrite:
                held = {OTHER: f"another {self.command} run or other settings", UNSTAMPED: "files lowbit did not stamp",
                        DAMAGED: "a run whose stamp is damaged", DONE: "this run, finished",
                        PARTIAL: "this run, unfinished"}[state]
                raise RunDirError(self.path, state, f"{flag} {self.path} already holds {held}; choose another path, "
                                                    f"remove it, or pass --overwrite to replace it")
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_stamp(settings, complete=False)
        return state

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
