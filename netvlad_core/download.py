"""Fetching and unpacking the dataset spec files: resumable HTTP(S) downloads, safe archive extraction.

- :func:`fetch` makes a file the current copy of one URL: a completed download is kept with a small record of the
  remote file beside it (``.remote.json``: ETag, Last-Modified, length, sha256) and reused only once the server
  says, to a conditional request, that the file has not changed (or when it matches the sha256 asked for); a new
  download goes through a ``.part`` file that a later call resumes with an HTTP ``Range`` + ``If-Range`` request,
  only for the same URL and the same remote file (recorded in ``.part.json``), verifies an optional sha256 and
  only then renames the file into place. :func:`public_url` is the URL as it is printed and recorded: without
  user name, password or query string (a signed URL's signature).
- :func:`safe_extract` unpacks a tar (plain/gz/bz2/xz) or zip archive into a folder, all or nothing, refusing
  members that would land outside it (absolute paths, ``..``, links pointing out, device files).
- :func:`resolve_spec_source` turns ``--spec`` (a URL, a local archive or a folder of .mat files) into a folder
  in which the spec .mat files can be found.

Standard library only (urllib, tarfile, zipfile) plus tqdm for the progress bar.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit
from urllib.request import Request, url2pathname, urlopen

from .errors import NetVLADError
from .io import atomic_path, write_json

#: The authors' archive of dbStruct .mat files (pitts30k/250k, tokyoTM, tokyo247); about 2 MB.
#: Its sha256 is not published: pass the digest printed by the first download to pin it.
AUTHORS_SPEC_URL = "https://www.di.ens.fr/willow/research/netvlad/data/netvlad_v100_datasets.tar.gz"

USER_AGENT = "netvlad-pipeline/0.1 (+urllib)"
_CHUNK = 1 << 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Interrupted(Exception):
    """A transfer that stopped early; the ``.part`` file keeps what arrived so far."""


class _NotModified(Exception):
    """The server answered a conditional request with 304: the cached copy is still the remote file."""


class _RequestFailed(Exception):
    """No usable reply (connection refused, DNS failure, timeout, an HTTP error status); the text says why."""


def public_url(url: str) -> str:
    """``url`` as it may be printed and recorded: scheme, host, port and path, without the user name and password
    and without the query string and fragment (a signed URL's ``X-Amz-Signature=…``, a token). The request itself
    uses the full URL."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _url_key(url: str) -> str:
    """What records compare to tell URLs apart (the full URL, query included), without storing its credentials."""
    return hashlib.sha256(url.encode()).hexdigest()


def _request(url: str, headers: dict) -> Request:
    """A urllib request for ``url``; ``user:password@`` becomes an HTTP Basic ``Authorization`` header (urllib would
    take it for part of the host name) that is not sent on to a redirect's target."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return Request(url, headers=headers)
    request = Request(urlunsplit(parts._replace(netloc=hostport)), headers=headers)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def normalise_sha256(value: str | None) -> str | None:
    """Lower-case hex digest, or ``None``; anything but 64 hex digits is a user error."""
    if value is None or value == "":
        return None
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:"):]
    if not _HEX64.match(v):
        raise NetVLADError(f"sha256 {value!r} is not 64 hexadecimal digits")
    return v


def _reason(e: BaseException) -> str:
    if isinstance(e, HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, URLError):
        r = e.reason
        return str(r) if not isinstance(r, BaseException) else (str(r) or type(r).__name__)
    if isinstance(e, (TimeoutError,)):
        return "timed out"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` → (START, TOTAL); unknown parts are None."""
    if not value:
        return None, None
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def part_info_path(part: Path) -> Path:
    """The small JSON file beside a ``.part`` that records where its bytes came from: ``{"url", "url_sha256",
    "etag", "last_modified", "content_type", "size"}`` (the URL without credentials, the sha256 of the full URL,
    the server's ``ETag``, ``Last-Modified``, ``Content-Type`` and full length; ``null`` if not sent)."""
    return part.with_name(part.name + ".json")


def remote_info_path(dest: str | os.PathLike) -> Path:
    """The record kept beside a completed download ``dest``: the ``.part`` record of the reply it came from, with
    ``size`` the file's length and its ``sha256``; what :func:`fetch` revalidates the cached copy with."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".remote.json")


def _remote_identity(url: str, headers, size: int | None) -> dict:
    return {"url": public_url(url), "url_sha256": _url_key(url), "etag": headers.get("ETag"),
            "last_modified": headers.get("Last-Modified"), "content_type": headers.get("Content-Type"), "size": size}


def _same_url(info: Any, url: str) -> bool:
    """Whether a record was made for ``url`` (records of earlier versions hold the full URL instead of its hash)."""
    if not isinstance(info, dict):
        return False
    return info.get("url_sha256") == _url_key(url) if "url_sha256" in info else info.get("url") == url


def _if_range(info: dict | None, url: str) -> str | None:
    """The ``If-Range`` validator under which the ``.part`` recorded by ``info`` may be resumed from ``url``: its
    strong ETag, else its Last-Modified date; ``None`` when the part may not be resumed (no record, another URL,
    no validator: nothing would tell whether the remote file is still the same)."""
    if not _same_url(info, url):
        return None
    etag, modified = info.get("etag"), info.get("last_modified")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):  # weak tags are not allowed in If-Range
        return etag
    return modified if isinstance(modified, str) and modified else None


def _read_record(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _read_part_info(part: Path) -> dict | None:
    return _read_record(part_info_path(part))


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    part_info_path(part).unlink(missing_ok=True)


def discard_download(dest: str | os.PathLike) -> None:
    """Remove a cached download and its records (a file that turned out not to be what was asked for, e.g. an
    error page served with status 200), so that the next :func:`fetch` downloads it again."""
    dest = Path(dest)
    remote_info_path(dest).unlink(missing_ok=True)
    dest.unlink(missing_ok=True)
    _discard_part(dest.with_suffix(dest.suffix + ".part"))


def _same_remote(info: dict, headers, total: int | None) -> bool:
    """Whether a 206 reply's validators and full length agree with those recorded for the ``.part``."""
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        got = headers.get(header)
        if got is not None and info.get(key) is not None and got != info[key]:
            return False
    return total is None or info.get("size") is None or total == info["size"]


def _revalidation(dest: Path, url: str, digest: str) -> dict | None:
    """The record of the cached copy ``dest`` (sha256 ``digest``) when it may be revalidated against ``url``: it
    names that URL, the file still has the recorded length and sha256, and the server gave a validator (ETag or
    Last-Modified). ``None`` otherwise (then only a new download says what the file is now)."""
    info = _read_record(remote_info_path(dest))
    if not _same_url(info, url) or info.get("sha256") != digest or info.get("size") != dest.stat().st_size:
        return None
    return info if any(isinstance(info.get(k), str) and info[k] for k in ("etag", "last_modified")) else None


def _transfer(url: str, part: Path, *, timeout: float, progress: bool, desc: str, restarted: bool = False,
              conditional: dict | None = None) -> None:
    """One HTTP request that appends to (or restarts) ``part``; returns when the file is complete. ``conditional``
    (the record of a cached copy) makes a fresh request conditional on the remote file having changed; a 304
    reply raises :class:`_NotModified`."""
    from tqdm import tqdm

    shown = public_url(url)

    def restart() -> None:
        _discard_part(part)
        return _transfer(url, part, timeout=timeout, progress=progress, desc=desc, restarted=True)

    offset = part.stat().st_size if part.is_file() else 0
    info = _read_part_info(part) if offset else None
    validator = _if_range(info, url) if offset else None
    if offset and validator is None:
        # Bytes of unknown origin (another URL, an older run, a server without ETag/Last-Modified): start over.
        _discard_part(part)
        offset = 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator  # a changed remote file answers 200 (everything), not the range
    elif conditional is not None:
        if conditional.get("etag"):
            headers["If-None-Match"] = conditional["etag"]
        if conditional.get("last_modified"):
            headers["If-Modified-Since"] = conditional["last_modified"]
    try:
        resp = urlopen(_request(url, headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 304 and not offset and conditional is not None:
            e.close()
            raise _NotModified() from None
        if e.code == 416 and offset:
            # Range not satisfiable: the .part is either complete or longer than the file (bad).
            _, total = _content_range(e.headers.get("Content-Range"))
            e.close()
            if total == offset and info.get("size") in (None, total):
                return
            if restarted:
                raise NetVLADError(f"{shown}: server refuses the range request (HTTP 416) even from byte 0") from None
            return restart()
        raise _RequestFailed(_reason(e)) from None
    except (URLError, OSError, http.client.HTTPException, ValueError) as e:
        # Connection refused, DNS failure, timeout before the response: nothing arrived, nothing to resume.
        raise _RequestFailed(_reason(e)) from None

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if total is None and length is not None:
                total = offset + length
            if start != offset or not _same_remote(info, resp.headers, total):
                # A range we did not ask for, or of another remote file (a server that ignored If-Range):
                # do not splice it in; start again from byte 0.
                resp.close()
                if restarted:
                    raise NetVLADError(f"{shown}: server answered a range request with an unexpected Content-Range")
                return restart()
            mode = "ab"
        else:
            # 200: a fresh download, a remote file that changed (If-Range or If-None-Match did not match), or a
            # server that ignores Range: everything again. Record where the bytes come from before the first one.
            offset, mode, total = 0, "wb", length
            part.unlink(missing_ok=True)  # never old bytes under the new record, even if killed right here
            write_json(part_info_path(part), _remote_identity(url, resp.headers, length), replaces_input=True)
        with open(part, mode) as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc, disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    fh.flush()
                    raise _Interrupted(_reason(e)) from None
                if not chunk:
                    break
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Interrupted(f"received {size} of {total} bytes")


def _make_folder(folder: Path) -> None:
    """Create the download folder, or say in one line why it cannot be (a file in the way, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        what = "" if blocking == folder else f" (needed for the download folder {folder})"
        raise NetVLADError(f"{blocking}: not a folder{what}; downloads need a folder there") from None
    except OSError as e:
        raise NetVLADError(f"{folder}: cannot create the download folder ({e.strerror or e})") from None


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    log: Callable[[str], None] | None = None,
) -> str:
    """Make ``dest`` the current copy of ``url`` (http/https) and return the file's hex sha256.

    **A cached copy** (``dest`` already there) is reused only when it is what was asked for: with ``sha256`` when
    it has that digest (without asking the server, so this works offline); without, when the server answers a
    conditional request (``If-None-Match`` / ``If-Modified-Since`` with the ETag / Last-Modified recorded in
    ``dest.remote.json``, :func:`remote_info_path`) with ``304 Not Modified`` and the file still has the recorded
    length and sha256. Otherwise the file is downloaded again (a changed remote file answers the conditional
    request with itself) and replaces the copy once complete. When the server cannot be asked (unreachable, an
    HTTP error), a cached copy is not used without ``sha256``: the one-line error gives its digest, to pin it.

    **A download** goes to ``dest`` + ``.part``; beside it ``dest.part.json`` (:func:`part_info_path`) records the
    URL (without credentials, plus the sha256 of the full URL) and the server's ``ETag``, ``Last-Modified`` and
    length from the reply that started the file. An existing ``.part`` (from an interrupted run) is resumed only
    when that record names the same URL and holds a validator (a strong ETag, else Last-Modified); otherwise it is
    discarded and the download starts over. It is resumed with ``Range: bytes=N-`` and ``If-Range: <validator>``:
    a ``206`` reply whose ETag, Last-Modified and total length agree with the record is appended; a ``200`` (the
    remote file changed, or the server ignores ranges) restarts from byte 0; a 206 of another file (a server
    ignoring If-Range) is discarded and restarted; a ``416`` means the part is already complete (when its size
    equals the advertised and recorded total) or bad (it is discarded and the download restarts). A transfer that
    breaks off is resumed up to ``retries`` times within this call; after that the ``.part`` stays for the next
    call and a one-line :class:`NetVLADError` says so. When ``sha256`` is given and does not match, the downloaded
    file is removed and a :class:`NetVLADError` names the URL, the expected and the actual digest. ``dest`` appears
    (or changes) only once the file is complete and verified; its record is written atomically after it.

    ``user:password@`` in the URL is sent as HTTP Basic authentication; messages and records show the URL without
    credentials or query string (:func:`public_url`). ``log`` receives one line when a cached copy is reused or
    replaced.
    """
    expected = normalise_sha256(sha256)
    shown = public_url(url)
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise NetVLADError(f"{shown}: not an http(s) URL")
    dest = Path(dest)
    _make_folder(dest.parent)
    if (dest.exists() or dest.is_symlink()) and not dest.is_file():
        raise NetVLADError(f"{dest}: in the way of the download of {shown} (not a regular file)")
    part = dest.with_suffix(dest.suffix + ".part")
    cached = sha256_file(dest) if dest.is_file() else None
    conditional = None
    if cached is not None:
        if expected is not None:
            if cached == expected:
                return cached  # the pinned content itself: nothing the server says could make it more current
            if log:
                log(f"{dest}: the cached copy has sha256 {cached}, not {expected}; downloading {shown} again")
        else:
            conditional = _revalidation(dest, url, cached)
            if conditional is None and log:
                log(f"{dest}: no record of the remote file this cached copy came from (or it was modified); "
                    f"downloading {shown} again")
    attempt = 0
    while True:
        try:
            _transfer(url, part, timeout=timeout, progress=progress, desc=dest.name, conditional=conditional)
            break
        except _NotModified:
            if log:
                log(f"{shown}: unchanged on the server (ETag/Last-Modified as recorded); using the cached {dest}")
            return cached
        except _RequestFailed as e:
            if cached is not None and expected is None:
                raise NetVLADError(
                    f"{shown}: cannot check whether the cached copy {dest} is still current ({e}); to use it "
                    f"anyway, pin it with its sha256 {cached}") from None
            raise NetVLADError(f"{shown}: download failed ({e})") from None
        except _Interrupted as e:
            if attempt >= retries:
                got = part.stat().st_size if part.is_file() else 0
                raise NetVLADError(
                    f"{shown}: download interrupted ({e}); {got} bytes kept in {part}, run again to resume"
                ) from None
            attempt += 1
    actual = sha256_file(part)
    if expected is not None and actual != expected:
        _discard_part(part)
        raise NetVLADError(
            f"{shown}: sha256 mismatch, expected {expected}, got {actual} (the downloaded file was removed)"
        )
    record = {**(_read_part_info(part) or {"url": shown, "url_sha256": _url_key(url)}),
              "size": part.stat().st_size, "sha256": actual}
    remote_info_path(dest).unlink(missing_ok=True)  # never an old record beside the new file
    os.replace(part, dest)
    write_json(remote_info_path(dest), record, replaces_input=True)  # the cache's own record
    part_info_path(part).unlink(missing_ok=True)
    if cached is not None and log:
        log(f"{shown}: the file on the server changed since the cached copy (sha256 {cached} -> {actual}); "
            f"replaced {dest}")
    return actual


# ----------------------------------------------------------------------------------------------- archives


def _bad_member_name(name: str) -> str | None:
    """Why an archive member name may not be extracted, or None when it is fine."""
    if not name or "\x00" in name:
        return "empty or NUL in name"
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in p.parts:
        return "'..' in path"
    return None


def _escapes(base_dir: str, target: str) -> bool:
    """Does ``target`` (relative to ``base_dir``, both archive-relative posix paths) leave the archive root?"""
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
        return True
    norm = os.path.normpath(os.path.join(base_dir, target)).replace("\\", "/")
    return norm == ".." or norm.startswith("../") or norm.startswith("/")


def _check_tar_member(archive: Path, m: tarfile.TarInfo) -> None:
    why = _bad_member_name(m.name)
    if why is None:
        if m.ischr() or m.isblk() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            why = "device or special file"
        elif m.issym() and _escapes(os.path.dirname(m.name), m.linkname):
            why = f"symlink pointing outside ({m.linkname})"
        elif m.islnk() and _escapes("", m.linkname):
            why = f"hard link pointing outside ({m.linkname})"
    if why is not None:
        raise NetVLADError(f"{archive}: refusing unsafe member {m.name!r} ({why})")


_ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError)
try:  # the decompressors' own error types (zlib.error is not an OSError)
    import zlib

    _ARCHIVE_ERRORS += (zlib.error,)
except ImportError:  # pragma: no cover
    pass
try:
    import lzma

    _ARCHIVE_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    pass


def _extract_tar(archive: Path, tmp: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()  # reads the whole archive: a truncated one fails here
        for m in members:
            _check_tar_member(archive, m)
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(tmp, members=members, filter="data")
            except tarfile.FilterError as e:
                name = getattr(getattr(e, "tarinfo", None), "name", "?")
                raise NetVLADError(f"{archive}: refusing unsafe member {name!r} ({e})") from None
        else:  # Python < 3.11.4: our own checks above are the filter
            tar.extractall(tmp, members=members)


def _extract_zip(archive: Path, tmp: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            why = _bad_member_name(info.filename)
            mode = info.external_attr >> 16
            if why is None and mode and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
                why = "device or special file"
            if why is not None:
                raise NetVLADError(f"{archive}: refusing unsafe member {info.filename!r} ({why})")
        bad = zf.testzip()  # CRC of every member
        if bad is not None:
            raise NetVLADError(f"{archive}: corrupt member {bad!r} (CRC mismatch)")
        for info in infos:
            zf.extract(info, tmp)  # zip symlinks are written as plain files: nothing can point out


def safe_extract(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> list[Path]:
    """Unpack a tar (plain, gz, bz2, xz) or zip ``archive`` into ``dest_dir`` and return the files written.

    All or nothing: members go to a temporary sibling folder that replaces ``dest_dir`` only when every
    member was extracted. Absolute paths, ``..`` components, symlinks or hard links pointing outside, and
    device files are refused with a :class:`NetVLADError` naming the archive and the member (tarfile's
    ``filter='data'`` is applied as well where Python has it); a truncated or corrupt archive is a
    :class:`NetVLADError` naming the archive.
    """
    archive = Path(archive)
    dest_dir = Path(dest_dir)
    if not archive.is_file():
        raise NetVLADError(f"{archive}: file not found")
    with atomic_path(dest_dir, is_dir=True) as tmp:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp)
            elif _looks_like_tar(archive):
                _extract_tar(archive, tmp)
            else:
                raise NetVLADError(f"{archive}: not a tar or zip archive, or truncated or corrupt")
        except NetVLADError:
            raise
        except _ARCHIVE_ERRORS as e:
            raise NetVLADError(f"{archive}: truncated or corrupt archive ({_reason(e)})") from None
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
    return [dest_dir / p for p in files]


def _looks_like_tar(archive: Path) -> bool:
    """True when tarfile can open the archive's first header (compression detected by tarfile)."""
    try:
        with tarfile.open(archive, "r:*"):
            return True
    except _ARCHIVE_ERRORS:
        return False


# ----------------------------------------------------------------------------------------------- specs


def _has_mat(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob("*.mat"))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolve_spec_source(
    spec: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Return a folder in which the spec ``.mat`` files can be found (they may sit in subfolders).

    ``spec`` is
    - an ``http``/``https`` URL: downloaded (resumably, see :func:`fetch`) to
      ``work_dir/url-<hash of the URL>/<file name>`` and reused from there on later calls while the server says
      it is unchanged (or it matches ``sha256``); then unpacked; an archive that does not unpack is discarded;
    - a ``file://`` URL or a local path to an archive (tar/zip): unpacked into
      ``work_dir/local-<hash of the path>/<name>.contents``;
    - a single ``.mat`` file (local or URL): its folder is returned;
    - a folder already holding ``.mat`` files: returned as is.

    ``sha256`` (optional) is checked against the archive (a cached download that does not match is fetched
    again). The sha256 of every archive used is passed to ``log`` so that users can pin it.
    """
    work_dir = Path(work_dir)
    expected = normalise_sha256(sha256)
    text = os.fspath(spec)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()

    if scheme in ("http", "https"):
        name = Path(unquote(parsed.path)).name or "spec_download"
        folder = work_dir / f"url-{_short_hash(text)}"
        archive = folder / name
        digest = fetch(text, archive, sha256=expected, progress=progress, timeout=timeout, log=log)
        if log:
            log(f"sha256 {digest}  {public_url(text)}")
        try:  # unpacked afresh every time (safe_extract replaces the folder): never the previous download's files
            return _unpack_specs(archive, folder / f"{name}.contents")
        except NetVLADError as e:  # e.g. an HTML error page served as the archive: do not keep reusing it
            discard_download(archive)
            raise NetVLADError(f"{e} (downloaded from {public_url(text)}; the cached copy was discarded)") from None

    if scheme == "file":
        path = Path(url2pathname(unquote(parsed.path)))
    elif len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise NetVLADError(f"{public_url(text)}: unsupported URL scheme {parsed.scheme!r} (use http, https or file, "
                           f"or a local path)")
    else:
        path = Path(text)

    if path.is_dir():
        if expected is not None:
            raise NetVLADError(f"{path}: sha256 checks an archive, but the spec is a folder")
        if not _has_mat(path):
            raise NetVLADError(f"{path}: no .mat files in this folder or below")
        return path
    if not path.is_file():
        raise NetVLADError(f"{path}: spec file or folder not found")
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise NetVLADError(f"{path}: sha256 mismatch, expected {expected}, got {digest}")
    if log:
        log(f"sha256 {digest}  {path}")
    folder = work_dir / f"local-{_short_hash(str(path.resolve()))}"
    return _unpack_specs(path, folder / f"{path.name}.contents")


def _unpack_specs(archive: Path, contents: Path) -> Path:
    if archive.suffix.lower() == ".mat":
        return archive.parent
    safe_extract(archive, contents)
    if not _has_mat(contents):
        raise NetVLADError(f"{archive}: no .mat files inside the archive")
    return contents


def find_spec_file(folder: str | os.PathLike, filename: str) -> Path:
    """The file ``filename`` in ``folder`` or below (the shallowest one); a NetVLADError when absent or ambiguous."""
    folder = Path(folder)
    hits = sorted((p for p in folder.rglob(filename) if p.is_file()), key=lambda p: (len(p.parts), str(p)))
    if not hits:
        found = sorted({p.name for p in folder.rglob("*.mat")})
        listing = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "none"
        raise NetVLADError(f"{folder}: no {filename} in this folder or below (.mat files found: {listing})")
    best = [p for p in hits if len(p.parts) == len(hits[0].parts)]
    if len(best) > 1:
        raise NetVLADError(f"{folder}: {filename} is ambiguous ({best[0]} and {best[1]})")
    return best[0]
