"""Shared fixtures: tiny real datasets (JPEG files + split folders), a tiny model, a loopback HTTP server."""

from __future__ import annotations

import hashlib
import re
import threading
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.manifest import Split, write_split
from netvlad_core.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def make_jpegs(root: Path, names: list[str], size=(64, 48), seed: int = 0) -> None:
    """Write real JPEG files with random smooth content under ``root``."""
    rng = np.random.default_rng(seed)
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(p, quality=90)


def make_split(tmp: Path, *, num_db: int = 12, num_q: int = 5, size=(64, 48), seed: int = 0,
               name: str = "test") -> Path:
    """A split folder over real JPEGs: database on a line every 5 m, queries near some of them."""
    rng = np.random.default_rng(seed)
    root = tmp / "images"
    db = [f"db/{i:04d}.jpg" for i in range(num_db)]
    q = [f"queries_real/q{i:04d}.jpg" for i in range(num_q)]
    make_jpegs(root, db + q, size=size, seed=seed)
    db_utm = np.stack([np.arange(num_db) * 5.0, np.zeros(num_db)], 1) + [500000.0, 4000000.0]
    q_utm = db_utm[rng.choice(num_db, num_q)] + rng.normal(0, 2, (num_q, 2))
    split = Split(dataset="tiny", name=name, image_root=root, db_paths=db, db_utm=db_utm, q_paths=q, q_utm=q_utm)
    return write_split(split, tmp / "splits" / name)


class TinyModel(torch.nn.Module):
    """A small conv net with the PlaceModel surface: ``forward`` → L2-normalised descriptors."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 3, stride=4, padding=1)
        self.out_dim = dim
        self.calls = 0
        self.fail_after: int | None = None

    def local_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.conv(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return torch.nn.functional.normalize(self.local_descriptors(x).mean((2, 3)), dim=1)


@pytest.fixture
def tiny_split(tmp_path: Path) -> Path:
    return make_split(tmp_path)


# The input size and normalisation of TinyModel (the rest of the config is not used by it)
TINY_MODEL_CONFIG = ModelConfig(backbone="resnet18_layer3", weights="none", input_height=48, input_width=64)


# ----------------------------------------------------------------------------------------- a loopback HTTP server


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (path with its query string → bytes) as a plain web server does: a strong ETag (from
    the sha256 of the content) and Last-Modified (``server.modified``, a fixed date by default), ``Range: bytes=N-``
    with ``If-Range``, conditional GETs (``If-None-Match`` before ``If-Modified-Since``: 304), HEAD; per-path quirks
    from the server's sets. Every request is recorded."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        srv = self.server
        data = srv.files.get(self.path)
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        srv.if_ranges.append(self.headers.get("If-Range"))
        srv.conditionals.append((self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")))
        srv.auth.append(self.headers.get("Authorization"))
        srv.methods.append("HEAD" if head else "GET")
        if data is None:
            self.send_error(404, "Not Found")
            return
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        modified = srv.modified.get(self.path, "Mon, 01 Jan 2024 00:00:00 GMT")
        validators = self.path not in srv.no_validators
        none_match, since = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        if validators and (none_match is not None and none_match in (etag, "*")
                           or none_match is None and since is not None
                           and parsedate_to_datetime(modified) <= parsedate_to_datetime(since)):
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        if_range = self.headers.get("If-Range")
        if rng and if_range is not None and if_range not in (etag, modified) and self.path not in srv.ignore_if_range:
            rng = None  # RFC 9110: a validator that does not match means "send the whole (new) file"
        start = 0
        if rng and self.path not in srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        cut_short = self.path in srv.cut_without_length
        if not cut_short:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", srv.content_types.get(self.path, "application/octet-stream"))
        if validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        self.end_headers()
        if head:
            return
        if self.path in srv.truncate_once or cut_short:  # send half and hang up (promised all, or nothing said)
            srv.truncate_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (``server.url``) serving ``server.files``; see :class:`RangeHandler`."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.files, srv.requests, srv.truncate_once, srv.ignore_range = {}, [], set(), set()
    srv.if_ranges, srv.modified, srv.ignore_if_range, srv.no_validators = [], {}, set(), set()
    srv.conditionals, srv.auth, srv.methods, srv.cut_without_length, srv.content_types = [], [], [], set(), {}
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
