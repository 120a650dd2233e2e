"""Atomic writes, JSON/HDF5 helpers and safe checkpoint loading."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import glob
import json
import os
import shutil
import stat
import sys
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


def _check_output_path(path: Path, *, is_dir: bool) -> None:
    """One line for an output path that cannot be written: an existing folder where a file goes (or the reverse), a
    parent that is a file."""
    if path.is_dir() and not is_dir:
        raise NetVLADError(f"{path}: is a folder; give the path of the output file")
    if is_dir and path.exists() and not path.is_dir():
        raise NetVLADError(f"{path}: is a file; give the path of the output folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NetVLADError(f"{path}: cannot be created, {parent} is a file, not a folder")
            break


def _check_not_an_input(path: Path, *, is_dir: bool) -> None:
    ledger = _ACTIVE_LEDGER.get()
    if ledger is None:
        return
    ledger.check_output(path)
    if is_dir:
        inside = ledger.read_under(path)
        if inside is not None:
            raise NetVLADError(f"{path}: an output folder that holds {inside}, a file this command reads; write it "
                               f"elsewhere, an output must not replace an input")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False, replaces_input: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    On an exception the temporary file or folder is removed and ``path`` is left as it was, so a reader never sees a
    half-written artifact under the final name. The temporary name ``.<name>.<pid>.<random>.tmp`` carries the
    writer's process id: one left by a killed process is deleted by the next :func:`atomic_path` for the same
    ``path``. A write that runs out of disk space becomes one :class:`NetVLADError` naming ``path``; so do a
    ``path`` that is an existing folder (a file for ``is_dir``) or whose parent is a file. Under a command's
    :class:`FileLedger` a ``path`` that the command has read (for a folder: one holding such a file) is refused,
    before and after the block, unless ``replaces_input`` says the command rewrites it by design (its own
    checkpoint or progress record).
    """
    path = Path(path)
    _check_output_path(path, is_dir=is_dir)
    if not replaces_input:
        _check_not_an_input(path, is_dir=is_dir)
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
        if not replaces_input:
            _check_not_an_input(path, is_dir=is_dir)  # a side file read inside the block
        _check_output_path(path, is_dir=is_dir)
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


# ------------------------------------------------------------------------------ what one command reads and writes


class FileLedger:
    """The files one command has read and the outputs it declared, so that no output replaces an input.

    :func:`tracked_files` makes one the active ledger of a command (the CLI does it for every command). While it is
    active, every file opened for reading through Python's ``open`` (``json``, ``torch.load``, PIL, numpy, scipy,
    pandas …) is recorded by an audit hook (PEP 578), and readers that bypass Python's ``open`` (h5py, a ``git`` or
    ``dvc`` subprocess) record theirs with :func:`note_read`. Then:

    - :func:`atomic_path`, the one writer of every artifact, refuses to replace a file the command has read;
    - :func:`distinct_paths` declares a command's outputs before any work: an output that was read already, or that
      is read later (a side file such as a run's ``flags.json``), is refused at that moment, before anything is
      written.

    Files that a command reads and rewrites by design (a checkpoint it resumes from, a download's validators) are
    written with ``replaces_input=True``. Files are the same when their real paths or their (device, inode) are.
    """

    def __init__(self) -> None:
        self._read_paths: dict[str, str] = {}
        self._read_inodes: dict[tuple[int, int], str] = {}
        self._read_trees: list[tuple[str, frozenset[str], str]] = []  # (real root, relative names, what)
        self._outputs: dict[str, str] = {}

    @staticmethod
    def _real(path: str | os.PathLike) -> str:
        return os.path.realpath(os.fspath(path))

    @staticmethod
    def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

    def read(self, path: str | os.PathLike, what: str | None = None) -> None:
        """Record ``path`` as read; a declared output read as an input is refused (one :class:`NetVLADError`)."""
        real = self._real(path)
        option = self._outputs.get(real)
        if option is not None:
            raise NetVLADError(f"{path}: read as an input{f' ({what})' if what else ''} and given as the output "
                               f"{option}; an output must not replace a file the command reads")
        self._read_paths.setdefault(real, what or "an input")
        inode = self._inode(path)
        if inode is not None:
            self._read_inodes.setdefault(inode, what or "an input")

    def read_many(self, root: str | os.PathLike, names: list[str], what: str) -> None:
        """Record the files ``root/<name>`` as read without a system call per file (a split's images, which loader
        processes open)."""
        self._read_trees.append((self._real(root), frozenset(os.path.normpath(n) for n in names), what))

    def read_of(self, path: str | os.PathLike) -> str | None:
        """How ``path`` was read (``"an input"`` or what the reader said), or None when the command did not read it."""
        real = self._real(path)
        found = self._read_paths.get(real)
        if found is None:
            inode = self._inode(path)
            found = self._read_inodes.get(inode) if inode is not None else None
        for root, names, what in self._read_trees if found is None else ():
            if real.startswith(root + os.sep) and os.path.relpath(real, root) in names:
                return what
        return found

    def read_under(self, folder: str | os.PathLike) -> str | None:
        """A file the command read inside ``folder`` (its real path), or None."""
        prefix = self._real(folder).rstrip(os.sep) + os.sep
        found = next((p for p in self._read_paths if p.startswith(prefix)), None)
        trees = (os.path.join(root, next(iter(names))) for root, names, _ in self._read_trees
                 if names and (root + os.sep).startswith(prefix))
        return found or next(trees, None)

    def declare_output(self, path: str | os.PathLike, option: str) -> None:
        """Record ``path`` as the output ``option``; refused when the command has read it already."""
        self.check_output(path, option)
        self._outputs[self._real(path)] = option

    def check_output(self, path: str | os.PathLike, option: str | None = None) -> None:
        was_read = self.read_of(path)
        if was_read is not None:
            how = "" if was_read == "an input" else f" ({was_read})"
            raise NetVLADError(f"{path}: {f'the output {option} ' if option else 'an output '}is a file this command "
                               f"reads{how}; write it elsewhere, an output must not replace an input")


_ACTIVE_LEDGER: contextvars.ContextVar[FileLedger | None] = contextvars.ContextVar("netvlad_file_ledger", default=None)
_HOOK_INSTALLED = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


def _record_opens(event: str, args: tuple) -> None:
    """The audit hook: files opened for reading while a ledger is active are recorded in it."""
    if event != "open":
        return
    ledger = _ACTIVE_LEDGER.get()
    if ledger is None:
        return
    path, mode, flags = args
    if path is None or isinstance(path, int):
        return
    if mode is not None:
        if any(c in mode for c in "wax+"):
            return
    elif isinstance(flags, int) and flags & _WRITE_FLAGS:
        return
    ledger.read(path if isinstance(path, str) else os.fsdecode(path))


@contextlib.contextmanager
def tracked_files() -> Iterator[FileLedger]:
    """Make a new :class:`FileLedger` the active one for the block (a command's run) and yield it."""
    global _HOOK_INSTALLED
    if not _HOOK_INSTALLED:  # an audit hook cannot be removed: installed once, it does nothing without a ledger
        sys.addaudithook(_record_opens)
        _HOOK_INSTALLED = True
    token = _ACTIVE_LEDGER.set(FileLedger())
    try:
        yield _ACTIVE_LEDGER.get()
    finally:
        _ACTIVE_LEDGER.reset(token)


def note_read(path: str | os.PathLike, what: str | None = None) -> None:
    """Record in the active ledger (if any) a file read without Python's ``open``: an HDF5 file opened by h5py, a
    file a ``git``/``dvc`` subprocess reads for the command. ``what`` says how, for the error message."""
    ledger = _ACTIVE_LEDGER.get()
    if ledger is not None:
        ledger.read(path, what)


def open_h5_for_reading(path: str | os.PathLike):
    """``h5py.File(path, "r")``, recorded in the active :class:`FileLedger` (h5py opens files outside Python)."""
    import h5py

    note_read(path, "an HDF5 input")
    return h5py.File(path, "r")


def note_reads_under(root: str | os.PathLike, names: list[str], what: str) -> None:
    """Record in the active ledger (if any) that the command reads the files ``root/<name>`` (see
    :meth:`FileLedger.read_many`)."""
    ledger = _ACTIVE_LEDGER.get()
    if ledger is not None:
        ledger.read_many(root, names, what)


def distinct_paths(inputs: dict[str, str | os.PathLike | None], outputs: dict[str, str | os.PathLike | None],
                   folders: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Check a command's output files before any work (``{option name: path}``; ``None`` values are skipped): an
    existing folder or a path under a file, two outputs naming the same file, or an output that is one of ``inputs``,
    raise one :class:`NetVLADError`; so does an output folder of ``folders`` that is a file or under one. With an
    active
    :class:`FileLedger` the outputs are also declared in it: one that the command has read already, or reads later
    (a side file found on the way), is refused then."""
    for value in outputs.values():
        if value is not None:
            _check_output_path(Path(value), is_dir=False)
    for value in (folders or {}).values():
        if value is not None:
            _check_output_path(Path(value), is_dir=True)
    seen: dict[Path, str] = {}
    for option, value in inputs.items():
        if value is not None:
            seen.setdefault(Path(os.path.realpath(value)), f"the input {option}")
    for option, value in outputs.items():
        if value is None:
            continue
        key = Path(os.path.realpath(value))
        if key in seen:
            raise NetVLADError(f"{value}: given as {option} and as {seen[key]}; every output must be a file of its "
                               f"own, other than the inputs")
        seen[key] = f"the output {option}"
    ledger = _ACTIVE_LEDGER.get()
    if ledger is not None:
        for option, value in outputs.items():
            if value is not None:
                ledger.declare_output(value, option)


def write_json(path: str | os.PathLike, data: Any, *, replaces_input: bool = False) -> Path:
    """Write ``data`` as pretty, strict JSON, atomically. Floats are written as ``repr`` (full precision); NaN or
    infinity, which strict JSON cannot hold, raise :class:`NetVLADError` naming ``path`` before anything is written."""
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        raise NetVLADError(f"{path}: cannot write NaN or infinity as JSON (strict JSON has no such numbers)") from None
    with atomic_path(path, replaces_input=replaces_input) as tmp:
        tmp.write_text(text)
    return path


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` when it is a regular file; otherwise one :class:`NetVLADError` that says what it is instead: not
    found (also a dangling symlink, or a folder on the way that is a file), a folder, a FIFO, a device or a socket
    (never opened: reading one would wait for a writer or never end), a symlink loop, or unreadable. ``what``
    names the file in the message."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NetVLADError(f"{path}: {what} not found" + (" (a dangling symlink)" if path.is_symlink() else "")
                           ) from None
    except NotADirectoryError:
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        why = f" ({blocker} is a file, not a folder)" if blocker is not None else ""
        raise NetVLADError(f"{path}: {what} not found{why}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NetVLADError(f"{path}: a symlink loop, not a {what}") from None
        raise NetVLADError(f"{path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise NetVLADError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "special")
        raise NetVLADError(f"{path}: is {kind}, not a regular {what}")
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a strict JSON file: ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's json module accepts by
    default) are refused with one :class:`NetVLADError` naming ``path``, like any other invalid JSON."""
    path = Path(path)

    def refuse(constant: str):
        raise NetVLADError(f"{path}: not valid JSON ({constant} is not a JSON number)")

    require_file(path)
    try:
        return json.loads(path.read_text(), parse_constant=refuse)
    except OSError as e:
        raise NetVLADError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise NetVLADError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise NetVLADError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _looks_like(head: bytes) -> str:
    text = head.lstrip().lower()
    if not head:
        return "; the file is empty"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<")):
        return f"; it starts like a web page, {head.lstrip()[:32]!r}…, an error or login page?"
    return ""


def torch_load_problem(error: BaseException, path: str | os.PathLike) -> str:
    """What ``torch.load(weights_only=True)`` found wrong with the file ``path``, in a few words of our own. torch's
    messages advise loading with ``weights_only=False`` (which runs whatever the file's pickle calls): that advice
    is never passed on."""
    import re

    text = str(error)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return (f"its pickle calls {match.group(1)}, which could run code; only tensors, containers and numbers "
                f"are read")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        head = b""
    if "PytorchStreamReader" in text:  # a zip archive (torch's format since 1.6) that does not read
        detail = text.split("PytorchStreamReader", 1)[1].split(". ")[0].strip().rstrip(".")
        return f"a truncated or corrupt checkpoint: {detail}{_looks_like(head)}"
    if "WeightsUnpickler error" in text or "Weights only load failed" in text:
        after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        detail = next((line.strip() for line in after.splitlines() if line.strip()), "")
        return (f"neither torch's zip format nor a pickle of tensors"
                f"{f', the unpickler says: {detail}' if detail else ''}{_looks_like(head)}")
    if isinstance(error, EOFError):
        return "the file is empty" if not head else f"the file ends early (truncated){_looks_like(head)}"
    sentences = [s for s in re.split(r"(?<=\.)\s+", text.strip().splitlines()[0] if text.strip() else "")
                 if "weights_only" not in s and "trusted source" not in s]
    return (" ".join(sentences) or type(error).__name__) + _looks_like(head)


def load_state(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a user-facing error for missing or foreign files."""
    import torch

    path = require_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise NetVLADError(f"{path}: not a loadable weights-only checkpoint ({torch_load_problem(e, path)})") from None


def save_state(path: str | os.PathLike, obj: Any, *, replaces_input: bool = False) -> Path:
    """``torch.save`` atomically (state dicts and plain containers of tensors/numbers only).

    Saved through a file object: given a path, ``torch.save`` names the zip archive's records after the file, here
    the random temporary name, so equal states would give different bytes (and DVC hashes) on every run.
    """
    import torch

    path = Path(path)
    with atomic_path(path, replaces_input=replaces_input) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path
