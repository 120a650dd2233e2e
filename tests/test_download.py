"""Resumable, revalidated downloads against a real loopback HTTP server (the ``server`` fixture of conftest.py), safe
extraction, and the download stage end to end."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from netvlad_core.datasets.manifest import load_ground_truth, load_split
from netvlad_core.datasets.official import prepare_dataset
from netvlad_core.datasets.specs import DBStruct, write_dbstruct
from netvlad_core.download import fetch, public_url, remote_info_path, resolve_spec_source, safe_extract
from netvlad_core.errors import NetVLADError

REPO = Path(__file__).resolve().parents[1]


PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, size=300_000, dtype=np.uint8))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def record_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def etag_of(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()[:16]}"'


def write_part(dest: Path, data: bytes, url: str, remote: bytes, modified: str = "Mon, 01 Jan 2024 00:00:00 GMT"
               ) -> None:
    """A ``.part`` holding ``data`` and its record, as an interrupted download of ``url`` (serving ``remote``)
    leaves them."""
    part_of(dest).write_bytes(data)
    record_of(dest).write_text(json.dumps({"url": url, "etag": etag_of(remote), "last_modified": modified,
                                           "size": len(remote)}))


# ----------------------------------------------------------------------------------------------- fetch


def test_fetch_verifies_and_renames(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "dl" / "a.bin"
    assert fetch(server.url + "/a.bin", dest, sha256=PAYLOAD_SHA.upper(), progress=False) == PAYLOAD_SHA
    assert dest.read_bytes() == PAYLOAD and not part_of(dest).exists()
    assert server.requests == [("/a.bin", None)]


def test_checksum_mismatch_names_url_and_digests_and_removes_file(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    wrong = "0" * 64
    with pytest.raises(NetVLADError) as err:
        fetch(server.url + "/a.bin", dest, sha256=wrong, progress=False)
    msg = str(err.value)
    assert server.url + "/a.bin" in msg and wrong in msg and PAYLOAD_SHA in msg and "\n" not in msg
    assert not dest.exists() and not part_of(dest).exists()
    with pytest.raises(NetVLADError, match="not 64 hexadecimal digits"):
        fetch(server.url + "/a.bin", dest, sha256="abc", progress=False)


def test_existing_part_is_resumed_with_a_range_request(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.tar.gz"
    write_part(dest, PAYLOAD[:123_456], server.url + "/a.bin", PAYLOAD)
    assert fetch(server.url + "/a.bin", dest, sha256=PAYLOAD_SHA, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", "bytes=123456-")]
    assert server.if_ranges == [etag_of(PAYLOAD)], "resumed only if the remote file is still the same"
    assert dest.read_bytes() == PAYLOAD and not part_of(dest).exists() and not record_of(dest).exists()


def test_part_without_a_record_is_not_resumed(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    part_of(dest).write_bytes(b"y" * 1000)  # bytes of unknown origin (no record of the URL and remote file)
    assert fetch(server.url + "/a.bin", dest, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", None)]
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_records_url_and_remote_file(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.modified["/a.bin"] = "Tue, 02 Jan 2024 10:00:00 GMT"
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "a.bin"
    with pytest.raises(NetVLADError, match="download interrupted"):
        fetch(server.url + "/a.bin", dest, progress=False, retries=0)
    assert json.loads(record_of(dest).read_text()) == {
        "url": server.url + "/a.bin", "url_sha256": hashlib.sha256((server.url + "/a.bin").encode()).hexdigest(),
        "etag": etag_of(PAYLOAD), "last_modified": "Tue, 02 Jan 2024 10:00:00 GMT",
        "content_type": "application/octet-stream", "size": len(PAYLOAD)}


def test_part_of_another_url_is_not_resumed(server, tmp_path):
    other = bytes(np.random.default_rng(1).integers(0, 256, size=len(PAYLOAD), dtype=np.uint8))
    server.files["/a.bin"], server.files["/b.bin"] = PAYLOAD, other
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "spec.tar.gz"
    with pytest.raises(NetVLADError, match="download interrupted"):
        fetch(server.url + "/a.bin", dest, progress=False, retries=0)
    assert part_of(dest).stat().st_size == 150_000
    fetch(server.url + "/b.bin", dest, progress=False)  # same file name, same length, another URL
    assert dest.read_bytes() == other, "must not splice the first URL's bytes into the second file"
    assert server.requests[-1] == ("/b.bin", None)


@pytest.mark.parametrize("how", ["new content", "new date only"])
def test_remote_file_changed_since_the_interruption_restarts(server, tmp_path, how):
    server.files["/a.bin"] = PAYLOAD
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "a.bin"
    with pytest.raises(NetVLADError, match="download interrupted"):
        fetch(server.url + "/a.bin", dest, progress=False, retries=0)
    changed = bytes(np.random.default_rng(2).integers(0, 256, size=len(PAYLOAD), dtype=np.uint8))
    if how == "new content":  # a new ETag (and Last-Modified): If-Range fails, the server sends the new file
        server.files["/a.bin"] = changed
        server.modified["/a.bin"] = "Wed, 03 Jan 2024 00:00:00 GMT"
    else:  # only Last-Modified can tell: the record's ETag is weak, so If-Range carries the date
        record = json.loads(record_of(dest).read_text())
        record_of(dest).write_text(json.dumps({**record, "etag": "W/" + record["etag"]}))
        server.files["/a.bin"] = changed
        server.modified["/a.bin"] = "Wed, 03 Jan 2024 00:00:00 GMT"
    assert fetch(server.url + "/a.bin", dest, progress=False) == hashlib.sha256(changed).hexdigest()
    assert dest.read_bytes() == changed
    assert server.requests[-1] == ("/a.bin", "bytes=150000-")
    assert server.if_ranges[-1] == (etag_of(PAYLOAD) if how == "new content" else "Mon, 01 Jan 2024 00:00:00 GMT")


def test_range_of_another_remote_file_is_not_spliced_in(server, tmp_path):
    """A server that ignores If-Range and answers 206 from a changed file: the new ETag gives it away."""
    server.files["/a.bin"] = PAYLOAD
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "a.bin"
    with pytest.raises(NetVLADError, match="download interrupted"):
        fetch(server.url + "/a.bin", dest, progress=False, retries=0)
    changed = bytes(np.random.default_rng(3).integers(0, 256, size=len(PAYLOAD), dtype=np.uint8))
    server.files["/a.bin"] = changed
    server.ignore_if_range.add("/a.bin")
    assert fetch(server.url + "/a.bin", dest, progress=False) == hashlib.sha256(changed).hexdigest()
    assert server.requests[-2:] == [("/a.bin", "bytes=150000-"), ("/a.bin", None)]
    assert dest.read_bytes() == changed


def test_server_without_validators_restarts_instead_of_resuming(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.no_validators.add("/a.bin")
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "a.bin"
    with pytest.raises(NetVLADError, match="download interrupted"):
        fetch(server.url + "/a.bin", dest, progress=False, retries=0)
    assert fetch(server.url + "/a.bin", dest, sha256=PAYLOAD_SHA, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", None), ("/a.bin", None)], "nothing tells whether the file is the same"


def test_interrupted_transfer_resumes_on_the_next_run(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "a.bin"
    with pytest.raises(NetVLADError, match=r"download interrupted \(received 150000 of 300000 bytes\).*run again"):
        fetch(server.url + "/a.bin", dest, progress=False, retries=0)
    assert part_of(dest).read_bytes() == PAYLOAD[:150_000] and not dest.exists()
    assert fetch(server.url + "/a.bin", dest, sha256=PAYLOAD_SHA, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=150000-")]
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_transfer_is_retried_within_one_call(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.truncate_once.add("/a.bin")
    dest = tmp_path / "a.bin"
    assert fetch(server.url + "/a.bin", dest, sha256=PAYLOAD_SHA, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=150000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.ignore_range.add("/a.bin")
    dest = tmp_path / "a.bin"
    write_part(dest, b"x" * 5000, server.url + "/a.bin", PAYLOAD)  # not even the right bytes: a 200 overwrites
    assert fetch(server.url + "/a.bin", dest, sha256=PAYLOAD_SHA, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", "bytes=5000-")]
    assert dest.read_bytes() == PAYLOAD


def test_416_complete_part_or_bad_part(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    write_part(dest, PAYLOAD, server.url + "/a.bin", PAYLOAD)  # complete: 416 with the same total
    assert fetch(server.url + "/a.bin", dest, progress=False) == PAYLOAD_SHA
    assert server.requests == [("/a.bin", f"bytes={len(PAYLOAD)}-")]
    dest.unlink()
    write_part(dest, PAYLOAD + b"junk", server.url + "/a.bin", PAYLOAD)  # longer than the file: downloaded again
    assert fetch(server.url + "/a.bin", dest, progress=False) == PAYLOAD_SHA
    assert server.requests[-2:] == [("/a.bin", f"bytes={len(PAYLOAD) + 4}-"), ("/a.bin", None)]


def test_http_and_network_errors_are_one_line(server, tmp_path):
    with pytest.raises(NetVLADError, match=r"/missing\.tar\.gz: download failed \(HTTP 404"):
        fetch(server.url + "/missing.tar.gz", tmp_path / "m.tar.gz", progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NetVLADError) as err:
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", progress=False)
    assert "download failed" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NetVLADError, match="not an http"):
        fetch("ftp://example.org/x", tmp_path / "x", progress=False)


# ----------------------------------------------------------------------------------------------- the cache


def test_cached_copy_is_revalidated_and_replaced_when_the_remote_file_changed(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    url = server.url + "/a.bin"
    assert fetch(url, dest, progress=False) == PAYLOAD_SHA
    record = json.loads(remote_info_path(dest).read_text())
    assert record["etag"] == etag_of(PAYLOAD) and record["size"] == len(PAYLOAD) and record["sha256"] == PAYLOAD_SHA
    logged: list[str] = []
    assert fetch(url, dest, progress=False, log=logged.append) == PAYLOAD_SHA  # unchanged: a 304, no body
    assert server.conditionals[-1] == (etag_of(PAYLOAD), "Mon, 01 Jan 2024 00:00:00 GMT")
    assert len(server.requests) == 2 and "unchanged on the server" in logged[-1]
    changed = bytes(np.random.default_rng(4).integers(0, 256, size=len(PAYLOAD), dtype=np.uint8))
    server.files["/a.bin"] = changed
    server.modified["/a.bin"] = "Wed, 03 Jan 2024 00:00:00 GMT"
    assert fetch(url, dest, progress=False, log=logged.append) == hashlib.sha256(changed).hexdigest()
    assert dest.read_bytes() == changed and len(server.requests) == 3, "the 200 to the conditional GET is the file"
    assert json.loads(remote_info_path(dest).read_text())["etag"] == etag_of(changed)
    assert "changed since the cached copy" in logged[-1]


def test_only_last_modified_or_no_validator_at_all(server, tmp_path):
    """A weak-ETag-free server that sends only Last-Modified is asked with If-Modified-Since; one that sends no
    validator cannot be asked, so the file is downloaded again every time; a cached file modified locally too."""
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    url = server.url + "/a.bin"
    fetch(url, dest, progress=False)
    record = json.loads(remote_info_path(dest).read_text())
    remote_info_path(dest).write_text(json.dumps({**record, "etag": None}))
    fetch(url, dest, progress=False)
    assert server.conditionals[-1] == (None, "Mon, 01 Jan 2024 00:00:00 GMT") and len(server.requests) == 2
    dest.write_bytes(PAYLOAD[:-1] + b"x")  # the cached file changed on disk: its sha256 no longer matches the record
    assert fetch(url, dest, progress=False) == PAYLOAD_SHA and server.conditionals[-1] == (None, None)
    server.no_validators.add("/a.bin")
    remote_info_path(dest).unlink()
    fetch(url, dest, progress=False)
    fetch(url, dest, progress=False)
    assert server.conditionals[-2:] == [(None, None), (None, None)] and len(server.requests) == 5


def test_cached_copy_and_an_unreachable_server(server, tmp_path):
    """Without a sha256 a cached copy that cannot be revalidated is refused, with the digest to pin it; with the
    sha256 the pinned copy is used without asking the server; a copy of another digest is downloaded again."""
    server.files["/a.bin"] = PAYLOAD
    dest = tmp_path / "a.bin"
    url = server.url + "/a.bin"
    fetch(url, dest, progress=False)
    del server.files["/a.bin"]  # the server answers 404 now
    with pytest.raises(NetVLADError) as err:
        fetch(url, dest, progress=False)
    assert str(err.value) == (f"{url}: cannot check whether the cached copy {dest} is still current (HTTP 404 Not "
                              f"Found); to use it anyway, pin it with its sha256 {PAYLOAD_SHA}")
    n = len(server.requests)
    assert fetch(url, dest, sha256=PAYLOAD_SHA, progress=False) == PAYLOAD_SHA and len(server.requests) == n
    other = bytes(reversed(PAYLOAD))
    server.files["/a.bin"] = other
    assert fetch(url, dest, sha256=hashlib.sha256(other).hexdigest(), progress=False) == hashlib.sha256(
        other).hexdigest()
    assert dest.read_bytes() == other and server.conditionals[-1] == (None, None)


def test_credentials_and_query_are_sent_but_never_printed_or_recorded(server, tmp_path):
    server.files["/a.bin?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA"] = PAYLOAD
    url = f"http://alice:pa%40ss@127.0.0.1:{server.server_address[1]}/a.bin?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA"
    assert public_url(url) == server.url + "/a.bin"
    dest = tmp_path / "a.bin"
    assert fetch(url, dest, progress=False) == PAYLOAD_SHA
    assert server.requests[-1][0] == "/a.bin?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA"
    assert server.auth[-1] == "Basic " + base64.b64encode(b"alice:pa@ss").decode()
    for text in [remote_info_path(dest).read_text()]:
        assert "s3cr3t" not in text and "alice" not in text and "AKIA" not in text
    fetch(url, dest, progress=False)
    assert server.conditionals[-1][0] == etag_of(PAYLOAD), "the record still revalidates the copy"
    with pytest.raises(NetVLADError) as err:
        fetch(url.replace("/a.bin", "/b.bin"), tmp_path / "b.bin", progress=False)
    assert "s3cr3t" not in str(err.value) and "alice" not in str(err.value) and "/b.bin: download failed" in str(
        err.value)


def test_a_download_folder_that_is_a_file_is_one_line(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    (tmp_path / "dl").write_text("x")
    with pytest.raises(NetVLADError, match=r"/dl: not a folder \(needed for the download folder .*/dl/sub\)"):
        fetch(server.url + "/a.bin", tmp_path / "dl" / "sub" / "a.bin", progress=False)
    with pytest.raises(NetVLADError, match=r"/dl: not a folder; downloads need a folder there"):
        fetch(server.url + "/a.bin", tmp_path / "dl" / "a.bin", progress=False)


# ----------------------------------------------------------------------------------------------- archives


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz"),
                                         ("w", ".tar")])
def test_tar_formats_extract(tmp_path, mode, suffix):
    link = tarfile.TarInfo("datasets/alias.mat")
    link.type, link.linkname = tarfile.SYMTYPE, "a.mat"
    archive = make_tar(tmp_path / f"x{suffix}", [("datasets/a.mat", b"A"), ("datasets/sub/b.mat", b"B"), link], mode)
    files = safe_extract(archive, tmp_path / "out")
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == [
        "datasets/a.mat", "datasets/alias.mat", "datasets/sub/b.mat"]
    assert (tmp_path / "out/datasets/sub/b.mat").read_bytes() == b"B"
    assert (tmp_path / "out/datasets/alias.mat").read_bytes() == b"A"


def evil_symlink() -> tarfile.TarInfo:
    info = tarfile.TarInfo("datasets/link")
    info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
    return info


def device_file() -> tarfile.TarInfo:
    info = tarfile.TarInfo("datasets/dev")
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    "bad,member,why",
    [
        (("../evil", b"x"), "../evil", "'..' in path"),
        (("/tmp/abs_evil", b"x"), "/tmp/abs_evil", "absolute path"),
        (evil_symlink(), "datasets/link", "symlink pointing outside"),
        (device_file(), "datasets/dev", "device or special file"),
    ],
    ids=["dotdot", "absolute", "symlink", "device"],
)
def test_unsafe_tar_members_are_refused(tmp_path, bad, member, why):
    archive = make_tar(tmp_path / "bad.tar.gz", [("datasets/ok.mat", b"ok"), bad])
    with pytest.raises(NetVLADError) as err:
        safe_extract(archive, tmp_path / "work" / "out")
    msg = str(err.value)
    assert msg.startswith(str(archive)) and repr(member) in msg and why in msg
    assert not (tmp_path / "work" / "out").exists()  # nothing partial
    assert not (tmp_path / "evil").exists() and not (tmp_path / "work" / "evil").exists()
    assert [p.name for p in (tmp_path / "work").iterdir()] == []


def test_truncated_and_foreign_archives_are_refused(tmp_path):
    payload = bytes(np.random.default_rng(1).integers(0, 256, size=200_000, dtype=np.uint8))
    good = make_tar(tmp_path / "good.tar.gz", [("datasets/a.mat", payload)])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(NetVLADError, match=re.escape(str(cut))):
        safe_extract(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    zbytes = io.BytesIO()
    with zipfile.ZipFile(zbytes, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("datasets/a.mat", payload)
    cutzip = tmp_path / "cut.zip"
    cutzip.write_bytes(zbytes.getvalue()[:-100])
    with pytest.raises(NetVLADError, match=re.escape(str(cutzip))):
        safe_extract(cutzip, tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(NetVLADError, match=r"notes\.txt: not a tar or zip archive"):
        safe_extract(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_extracts_and_refuses_dotdot(tmp_path):
    archive = tmp_path / "specs.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("netvlad/datasets/a.mat", b"A" * 1000)
        zf.writestr("netvlad/b.mat", b"B")
    files = safe_extract(archive, tmp_path / "out")
    assert sorted(f.relative_to(tmp_path / "out").as_posix() for f in files) == [
        "netvlad/b.mat", "netvlad/datasets/a.mat"]
    assert (tmp_path / "out/netvlad/datasets/a.mat").read_bytes() == b"A" * 1000
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("ok.mat", b"x")
        zf.writestr("../evil.mat", b"x")
    with pytest.raises(NetVLADError, match=r"bad\.zip: refusing unsafe member '\.\./evil\.mat'"):
        safe_extract(bad, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "evil.mat").exists()


# ----------------------------------------------------------------------------------------------- a tiny pitts30k


def tiny_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value % 256, 80, 160)).save(path, format="JPEG")


def fake_pitts30k(tmp_path: Path) -> tuple[Path, Path, dict[str, DBStruct]]:
    """Three spec .mat files in a tar.gz (under datasets/, as the authors ship them) and the images."""
    rng = np.random.default_rng(3)
    specs, mats = {}, tmp_path / "mats" / "datasets"
    for k, split in enumerate(("train", "val", "test")):
        n_db, n_q = 6 + k, 3
        db = [f"{k:03d}/{k:03d}{i:03d}_pitch{1 + i % 2}_yaw{1 + i % 12}.jpg" for i in range(n_db)]
        q = [f"{k:03d}/{k:03d}{i:03d}_pitch1_yaw1.jpg" for i in range(n_q)]
        utm_db = rng.uniform(0, 60, size=(n_db, 2)) + [584000, 4477000]
        utm_q = utm_db[:n_q] + rng.uniform(-3, 3, size=(n_q, 2))
        specs[split] = DBStruct(split, db, utm_db, q, utm_q)
        write_dbstruct(mats / f"pitts30k_{split}.mat", specs[split])
    archive = tmp_path / "netvlad_v100_datasets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(mats, arcname="datasets")
    images = tmp_path / "images"
    for spec in specs.values():
        for i, p in enumerate(spec.db_image_fns):
            tiny_jpeg(images / p, i)
        for i, p in enumerate(spec.q_image_fns):
            tiny_jpeg(images / "queries_real" / p, 100 + i)
    return archive, images, specs


def test_prepare_dataset_end_to_end_over_http(server, tmp_path):
    archive, images, specs = fake_pitts30k(tmp_path)
    server.files["/data/netvlad_v100_datasets.tar.gz"] = archive.read_bytes()
    url = server.url + "/data/netvlad_v100_datasets.tar.gz"
    out = tmp_path / "data" / "pitts30k"
    logged: list[str] = []
    paths = prepare_dataset("pitts30k", out, spec=url, image_root=images, progress=False, log=logged.append)
    assert paths == [out / "train", out / "val", out / "test"]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert any(digest in line for line in logged)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]  # nothing else in --out
    assert (tmp_path / "data" / ".netvlad_cache").is_dir()  # the default cache sits next to --out

    for split, spec in specs.items():
        with open(out / split / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["path"] for r in rows] == spec.db_image_fns + ["queries_real/" + q for q in spec.q_image_fns]
        assert [r["role"] for r in rows] == ["database"] * spec.num_images + ["query"] * spec.num_queries
        got = np.array([[float(r["utm_east"]), float(r["utm_north"])] for r in rows])
        np.testing.assert_array_equal(got, np.vstack([spec.utm_db, spec.utm_q]))
        meta = json.loads((out / split / "split.json").read_text())
        assert (meta["dataset"], meta["split"], meta["num_db"], meta["num_queries"]) == (
            "pitts30k", split, spec.num_images, spec.num_queries)
        loaded = load_split(out / split)
        assert loaded.image_root == images.resolve()
        assert all(f.is_file() for f in loaded.db_files() + loaded.query_files())
        gt = load_ground_truth(out / split)
        for i in range(spec.num_queries):
            d = np.linalg.norm(spec.utm_db - spec.utm_q[i], axis=1)
            assert sorted(gt.positives[i].tolist()) == np.flatnonzero(d <= 25).tolist()

    # a second run reuses the cached archive, and a pinned digest is accepted
    n_requests = len(server.requests)
    prepare_dataset("pitts30k", out, spec=url, image_root=images, sha256=digest, progress=False)
    assert len(server.requests) == n_requests
    # a wrong pin: the cached copy is dropped, fetched again, refused; --out keeps the previous result
    before = (out / "test" / "manifest.csv").read_bytes()
    with pytest.raises(NetVLADError, match="sha256 mismatch"):
        prepare_dataset("pitts30k", out, spec=url, image_root=images, sha256="f" * 64, progress=False)
    assert (out / "test" / "manifest.csv").read_bytes() == before


def test_a_page_that_is_not_an_archive_is_not_kept_in_the_cache(server, tmp_path):
    server.files["/netvlad_v100_datasets.tar.gz"] = b"<html>Please log in</html>"
    url = server.url + "/netvlad_v100_datasets.tar.gz"
    with pytest.raises(NetVLADError, match=r"not a tar or zip archive.*\(downloaded from http://127\.0\.0\.1:\d+/"
                       r"netvlad_v100_datasets\.tar\.gz; the cached copy was discarded\)"):
        prepare_dataset("pitts30k", tmp_path / "out", spec=url, image_root=tmp_path, cache_dir=tmp_path / "cache",
                        progress=False)
    assert not list((tmp_path / "cache").rglob("*.tar.gz*")) and not (tmp_path / "out").exists()


def test_a_spec_archive_that_changed_on_the_server_is_downloaded_again(server, tmp_path):
    """resolve_spec_source and import share fetch's revalidation: the second run asks with If-None-Match, gets the
    new archive and unpacks it (not the first one's files)."""
    archive, _, _ = fake_pitts30k(tmp_path)
    first = archive.read_bytes()
    server.files["/specs.tar.gz"] = first
    url = server.url + "/specs.tar.gz"
    folder = resolve_spec_source(url, tmp_path / "work", progress=False)
    assert sorted(p.name for p in folder.rglob("*.mat")) == ["pitts30k_test.mat", "pitts30k_train.mat",
                                                             "pitts30k_val.mat"]
    second = tmp_path / "second.tar"
    with tarfile.open(second, "w") as tar:
        tar.add(tmp_path / "mats" / "datasets" / "pitts30k_test.mat", arcname="datasets/tokyo247.mat")
    server.files["/specs.tar.gz"] = second.read_bytes()
    logged: list[str] = []
    folder = resolve_spec_source(url, tmp_path / "work", progress=False, log=logged.append)
    assert sorted(p.name for p in folder.rglob("*.mat")) == ["tokyo247.mat"]
    assert server.conditionals[-1] == (etag_of(first), "Mon, 01 Jan 2024 00:00:00 GMT")
    assert any("changed" in line for line in logged), logged


def test_missing_image_leaves_out_uncreated(tmp_path):
    archive, images, specs = fake_pitts30k(tmp_path)
    missing = images / "queries_real" / specs["val"].q_image_fns[1]
    missing.unlink()
    (images / specs["val"].db_image_fns[4]).unlink()
    out = tmp_path / "data" / "pitts30k"
    with pytest.raises(NetVLADError) as err:
        prepare_dataset("pitts30k", out, spec=archive, image_root=images, cache_dir=tmp_path / "cache", progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{images.resolve()}: 2 of 10 images missing, first: {specs['val'].db_image_fns[4]}, "
                          f"queries_real/{specs['val'].q_image_fns[1]}")
    assert not out.exists() and not out.parent.exists()
    # and an image root inside --out is refused (it would be replaced)
    with pytest.raises(NetVLADError, match="inside the output folder"):
        prepare_dataset("pitts30k", tmp_path, spec=archive, image_root=images, progress=False)


def test_resolve_spec_source_variants(tmp_path):
    archive, _, _ = fake_pitts30k(tmp_path)
    work = tmp_path / "work"
    extracted = resolve_spec_source(archive.as_uri(), work, progress=False)
    assert sorted(p.name for p in extracted.rglob("*.mat")) == [
        "pitts30k_test.mat", "pitts30k_train.mat", "pitts30k_val.mat"]
    assert resolve_spec_source(tmp_path / "mats", work) == tmp_path / "mats"  # a folder holding .mat files
    with pytest.raises(NetVLADError, match="sha256 checks an archive"):
        resolve_spec_source(tmp_path / "mats", work, sha256="a" * 64)
    with pytest.raises(NetVLADError, match="spec file or folder not found"):
        resolve_spec_source(tmp_path / "nope.tar.gz", work)
    with pytest.raises(NetVLADError, match="unsupported URL scheme 'ftp'"):
        resolve_spec_source("ftp://example.org/x.tar.gz", work)


# ----------------------------------------------------------------------------------------------- the stage


def run_stage(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "stages.download", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stage_unknown_dataset_and_help(tmp_path):
    res = run_stage("--dataset", "paris", "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown dataset 'paris'")
    assert not (tmp_path / "out").exists()
    res = run_stage("--help")
    assert res.returncode == 0
    for option in ("--dataset", "--out", "--spec", "--image-root", "--sha256", "--cache-dir", "--split"):
        assert option in res.stdout


def test_stage_writes_splits_from_a_local_folder(tmp_path):
    _, images, specs = fake_pitts30k(tmp_path)
    out = tmp_path / "data" / "pitts30k"
    res = run_stage("--dataset", "pitts30k", "--out", str(out), "--spec", str(tmp_path / "mats"),
                    "--image-root", str(images), "--split", "test", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines() == [
        f"download: pitts30k test: {specs['test'].num_images} database images, 3 queries → {out / 'test'}"]
    assert [p.name for p in out.iterdir()] == ["test"]
