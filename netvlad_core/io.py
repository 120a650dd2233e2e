"""Atomic writes, JSON/HDF5 helpers and safe checkpoint loading."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import NetVLADError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings ``.<name>.<pid>.*.tmp`` that :func:`atomic_path` left for ``path`` in a
    process that no longer runs (a killed run), and return them. Those of live processes are left alone."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if path.parent.is_dir() else ():
        pid_text = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the file system is full (or the quota exhausted). h5py and torch report it only in
    their message text (``errno = 28``, ``No space left on device``), the OS through ``errno``."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text:
            return True
        # the error it was raised from, or during the handling of (unless ``raise … from None`` hid that)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


def disk_full_error(path: str | os.PathLike, needed: int | None = None) -> NetVLADError:
    """The one-line error for a write to ``path`` that ran out of space (how much was needed, when known)."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    except OSError:
        free = None
    parts = [f"{path}: cannot write, no space left on device"]
    if needed is not None:
        parts.append(f"needs about {_size(needed)}")
    if free is not None:
        parts.append(f"{_size(free)} free")
    return NetVLADError(parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else ""))


def ensure_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raise the disk-full error before any work when the file system of ``path`` has less than ``needed`` bytes
    free (a cheap check; the write itself is still guarded by :func:`atomic_path`)."""
    path = Path(path)
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if shutil.disk_usage(folder).free < needed:
        raise disk_full_error(path, needed)


def reserve_space(path: str | os.PathLike, size: int) -> None:
    """Reserve the blocks of the first ``size`` bytes of the existing file ``path`` (``posix_fallocate``; the file
    grows to ``size`` if smaller), so that writes within them cannot fail for want of space later: HDF5 crashes
    the process when it meets a full disk while closing a file, and a memory map of a sparse file dies with SIGBUS.
    A full disk raises the one-line error here. File systems without the call are left as they are."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, size) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    On an exception the temporary file or folder is removed and ``path`` is left as it was, so a reader never sees a
    half-written artifact under the final name. The temporary name ``.<name>.<pid>.<random>.tmp`` carries the
    writer's process id: one left by a killed process is deleted by the next :func:`atomic_path` for the same
    ``path``. A write that runs out of disk space becomes one :class:`NetVLADError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; give the artifact the usual umask permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, NetVLADError):
            if str(tmp) in str(e):  # a nested atomic write named our temporary: name the final file
                raise NetVLADError(str(e).replace(str(tmp), str(path))) from None
            raise
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(path) from None
        raise


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[Any]:
    """Build an HDF5 file in memory (an ``h5py.File``) and write it to ``path`` atomically when the block ends.

    The bytes reach the disk through ordinary file writes, so a full disk is the usual one-line error of
    :func:`atomic_path`: HDF5 itself, meeting a full disk while closing a file, crashes the process. For files that
    fit in memory twice (descriptor samples, centroids, ground truth); large resumable files reserve their space
    instead (:func:`reserve_space`)."""
    import h5py

    path = Path(path)
    h5 = h5py.File(f"{path.name}.{os.getpid()}.{id(path)}", "w", driver="core", backing_store=False)
    try:
        yield h5
        h5.flush()
        image = h5.id.get_file_image()
    finally:
        h5.close()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(image)


def distinct_paths(inputs: dict[str, str | os.PathLike | None], outputs: dict[str, str | os.PathLike | None]) -> None:
    """Raise one :class:`NetVLADError` when two outputs name the same file, or an output is one of the inputs
    (``{option name: path}``; ``None`` values are skipped), before any work is done."""
    seen: dict[Path, str] = {}
    for option, value in inputs.items():
        if value is not None:
            seen.setdefault(Path(value).resolve(), f"the input {option}")
    for option, value in outputs.items():
        if value is None:
            continue
        key = Path(value).resolve()
        if key in seen:
            raise NetVLADError(f"{value}: given as {option} and as {seen[key]}; every output must be a file of its "
                               f"own, other than the inputs")
        seen[key] = f"the output {option}"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as pretty, strict JSON, atomically. Floats are written as ``repr`` (full precision); NaN or
    infinity, which strict JSON cannot hold, raise :class:`NetVLADError` naming ``path`` before anything is written."""
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        raise NetVLADError(f"{path}: cannot write NaN or infinity as JSON (strict JSON has no such numbers)") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a strict JSON file: ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's json module accepts by
    default) are refused with one :class:`NetVLADError` naming ``path``, like any other invalid JSON."""
    path = Path(path)

    def refuse(constant: str):
        raise NetVLADError(f"{path}: not valid JSON ({constant} is not a JSON number)")

    try:
        return json.loads(path.read_text(), parse_constant=refuse)
    except FileNotFoundError:
        raise NetVLADError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise NetVLADError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_state(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a user-facing error for missing or foreign files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise NetVLADError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NetVLADError(f"{path}: not a loadable weights-only checkpoint ({first})") from None


def save_state(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` atomically (state dicts and plain containers of tensors/numbers only).

    Saved through a file object: given a path, ``torch.save`` names the zip archive's records after the file, here
    the random temporary name, so equal states would give different bytes (and DVC hashes) on every run.
    """
    import torch

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path
