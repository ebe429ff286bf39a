"""Atomic file and directory writes (nothing half-written is ever left under a final name, and each file gets the
mode ``open()`` would give it), file hashes, the checked readers of the files lowbit writes (safetensors, JSON), which
name a truncated or corrupt file instead of surfacing a library error, and checksums for damage those formats cannot
notice: sealed JSON objects and SHA-256 file manifests."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    """The process's umask. Linux reports it in /proc (reading it there changes nothing, so a thread creating a file
    meanwhile is unaffected); elsewhere it is set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(mode: int, is_dir: bool = False, umask: int | None = None) -> int:
    """The permission bits ``open()`` / ``mkdir()`` would have given: ``0o666 & ~umask`` for a file (``0o777`` for a
    directory or a file with an execute bit), whatever a library's private temporary file had (mkstemp: 0600)."""
    umask = _umask() if umask is None else umask
    return (0o777 if is_dir or mode & 0o111 else 0o666) & ~umask


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; nothing more can be done there
        pass
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Give every file and directory under ``root`` its :func:`normal_mode` and fsync it (files first, then their
    directory). Libraries that write atomically themselves (``safetensors.torch.save_file``) leave their files 0600,
    unlike every other file of the directory."""
    umask = _umask()
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p):
                continue
            _chmod_normal(p, umask)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if d != str(root):  # the root's mode is set when it is created (atomic_dir)
            _chmod_normal(d, umask)
        fsync_dir(d)


def _chmod_normal(path: str, umask: int) -> None:
    st = os.stat(path)
    want = normal_mode(st.st_mode, stat.S_ISDIR(st.st_mode), umask)
    if stat.S_IMODE(st.st_mode) != want:
        os.chmod(path, want)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace`` (the file and
    then the directory entry are fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, normal_mode(0))  # mkstemp creates 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_figure(path: str | Path, fig, dpi: int = 120) -> Path:
    """Render a matplotlib figure as PNG, write it atomically, and close the figure (also on error)."""
    import matplotlib.pyplot as plt  # the caller has matplotlib already; lowbit.io stays import-cheap

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_write_json(path: str | Path, obj, seal: bool = False) -> None:
    """Write ``obj`` as indented JSON; ``seal=True`` adds :data:`SEAL` (see :func:`sealed`)."""
    atomic_write_text(path, json.dumps(sealed(obj) if seal else obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------- directories

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). Returns ``False``, having
    changed nothing, where the system or the file system does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no renameat2 in this C library (glibc < 2.28, musl)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def check_new_dir(path: str | Path, flag: str = "output directory") -> Path:
    """Refuse a ``path`` that exists and is not an empty directory (a file, or a directory holding anything): the
    check every writer of a new output directory runs before its work, unless the user asked to overwrite."""
    path = recover_dir(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{flag} {path} already exists and is not an empty directory; choose a new path, remove "
                         "it, or pass --overwrite")
    return path


def backup_path(path: str | Path) -> Path:
    """Where :func:`atomic_dir` keeps the previous ``path`` while it swaps without an atomic exchange."""
    path = Path(path)
    return path.with_name(f".{path.name}.lowbit-old")


def recover_dir(path: str | Path) -> Path:
    """Finish or undo a directory swap of :func:`atomic_dir` that a crash interrupted; returns ``path``.

    ``path`` missing with a backup present (a crash between moving the old directory aside and moving the new one
    in): the backup, the previous complete result, is put back. ``path`` and a backup both present (a crash after
    the swap): the backup is deleted. Readers of directories written with :func:`atomic_dir` call this first.
    """
    path = Path(path)
    if not Path(os.path.abspath(path)).name:  # the file-system root: nothing is ever swapped there
        return path
    backup = backup_path(os.path.abspath(path))
    if not os.path.lexists(backup):
        return path
    if os.path.lexists(path):
        shutil.rmtree(backup, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):  # another process recovered it first
            os.rename(backup, path)
            fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``. On error the temporary directory is
    removed and ``path`` is untouched.

    Every file and directory of the new result gets the mode ``open()`` / ``mkdir()`` would give it
    (:func:`normal_mode`), also one a library wrote through a private temporary file. Crash safety: every file and
    directory of the new result is fsynced before the swap. An existing ``path`` is
    swapped with the new directory in one atomic step where Linux supports it (``renameat2``), so ``path`` always
    names a complete result, old or new. Elsewhere the old directory is first renamed to :func:`backup_path` and
    the new one then renamed to ``path``; a crash between the two leaves ``path`` missing and the backup complete,
    and :func:`recover_dir` (run by the next :func:`atomic_dir` on ``path`` and by lowbit's readers) restores it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, normal_mode(0, is_dir=True))  # mkdtemp creates 0700
    try:
        yield tmp
        _finish_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete directory ``tmp`` at ``path`` (see :func:`atomic_dir`)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        fsync_dir(path.parent)
        return
    if exchange_paths(tmp, path):
        fsync_dir(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old result
        return
    backup = backup_path(path)
    os.rename(path, backup)
    fsync_dir(path.parent)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # an error (not a crash): put the old result back at once
            os.rename(backup, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(backup, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- readers

def _recreate_hint(what: str | None) -> str:
    return f"re-create it ({what})" if what else "re-create it with the command that wrote it"


class DamagedFileError(ValueError):
    """A file lowbit wrote is truncated, corrupt or fails its checksum. ``path``: the file; ``reason``: what is wrong
    (the message without the fix); ``fix``: how to re-create it. Callers that treat a damaged cache as "compute it
    again" catch this type and log ``reason``, never parse the message. A ``ValueError``, so existing handlers of
    bad input keep working."""

    def __init__(self, path: str | Path, reason: str, fix: str) -> None:
        self.path, self.reason, self.fix = Path(path), reason, fix
        super().__init__(f"{reason}; {fix}")


def _damaged(path: str | Path, reason: str, what: str | None) -> DamagedFileError:
    return DamagedFileError(path, reason, _recreate_hint(what))


def read_json(path: str | Path, what: str | None = None) -> Any:
    """The JSON value in ``path`` (a sealed object is verified and returned without its seal, :func:`check_seal`).
    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` naming the file when it is not valid JSON
    (truncated or corrupt) or its seal disagrees; ``what`` says how to re-create it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {_recreate_hint(what)}")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"{path} is truncated or corrupt (not valid JSON: {e})", what) from None
    return check_seal(obj, path, what)


def load_safetensors(path: str | Path, device: str | torch.device = "cpu", what: str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, moved to ``device``.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming it when it cannot be read as
    safetensors (truncated, corrupt header, unreadable): the library's own errors say neither which file nor what
    to do. ``what`` says how to re-create it. Tensors are read on the CPU, so an error of ``device`` (out of
    memory, no GPU) is never reported as a corrupt file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {_recreate_hint(what)}")
    errors = (SafetensorError, OSError, RuntimeError, ValueError)

    def corrupt(e: Exception) -> ValueError:
        return _damaged(path, f"{path} is truncated or corrupt ({type(e).__name__}: {e})", what)

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")  # validates the header against the file size
    except errors as e:
        raise corrupt(e) from None
    out = {}
    with handle as f:
        for key in f.keys():
            try:
                t = f.get_tensor(key)
            except errors as e:
                raise corrupt(e) from None
            out[key] = t if str(device) == "cpu" else t.to(device)  # outside the try: a device error is no corruption
    return out


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path, what: str | None = None,
                 keys: list[str] | None = None) -> None:
    """Raise ``ValueError`` naming ``source`` and the tensor when a floating tensor of ``tensors`` (those in ``keys``,
    default all) holds NaN or Inf."""
    import torch

    for k in keys if keys is not None else list(tensors):
        t = tensors[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise _damaged(source, f"{source}: tensor {k} holds {n} NaN/Inf values of {t.numel()}; the file is "
                           f"corrupt (or was saved from a diverged run)", what)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checksums

SEAL = "content_sha256"


def _content_digest(obj: dict) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(obj: dict) -> dict:
    """``obj`` plus :data:`SEAL`, the SHA-256 of the rest of it as canonical JSON: a file damaged into other valid
    JSON (a flipped digit, a renamed key) is then detected by :func:`check_seal` instead of read as a wrong value."""
    return {**{k: v for k, v in obj.items() if k != SEAL}, SEAL: _content_digest(obj)}


def check_seal(obj: Any, source: str | Path, what: str | None = None) -> Any:
    """``obj`` without its seal; ``ValueError`` "checksum mismatch: SOURCE is corrupt" when the seal disagrees with
    the content. Values without a seal (older lowbit, other tools, hand-written) pass unchecked."""
    if not isinstance(obj, dict) or SEAL not in obj:
        return obj
    if obj[SEAL] != _content_digest(obj):
        raise _damaged(source, f"checksum mismatch: {source} is corrupt", what)
    return {k: v for k, v in obj.items() if k != SEAL}


def file_manifest(root: str | Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` of files under ``root`` (names relative to it), which :func:`verify_files`
    checks."""
    return {n: {"bytes": (Path(root) / n).stat().st_size, "sha256": sha256_file(Path(root) / n)} for n in sorted(names)}


def verify_files(root: str | Path, manifest: dict[str, dict], what: str | None = None) -> None:
    """Check the files of a manifest (:func:`file_manifest`): ``FileNotFoundError`` for one that is missing,
    ``ValueError`` naming one whose size differs ("truncated or corrupt") or whose bytes changed ("checksum mismatch:
    FILE is corrupt": a flipped bit inside tensor data, which the file format itself cannot notice). Costs one read of
    each file (SHA-256 runs at about 1 GB/s)."""
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) for v in manifest.values()):
        raise _damaged(root, f"the file manifest of {root} is corrupt", what)
    for name, want in sorted(manifest.items()):
        p = Path(root) / name
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (listed in the manifest of {root}); {_recreate_hint(what)}")
        size, written = p.stat().st_size, want.get("bytes")
        if size != written:
            raise _damaged(p, f"{p} is truncated or corrupt ({size:,} bytes, "
                           f"{f'{written:,}' if isinstance(written, int) else '?'} written)", what)
        if sha256_file(p) != want.get("sha256"):
            raise _damaged(p, f"checksum mismatch: {p} is corrupt", what)
