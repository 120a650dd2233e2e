"""`netvlad retrieve`: two folders of real JPEGs, no manifest: the top-K list equals a brute-force ranking of the
same descriptors, the descriptors are the model's own on those files, the HTML page links every image it shows, and
(where a Chromium is installed) the page renders them in a headless browser."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from netvlad_core.datasets.images import load_image
from netvlad_core.models import ModelConfig, build_model, save_model
from stages.cli import app
from tests.conftest import make_jpegs

SMALL = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)
RED = (230, 20, 20)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("retrieve")
    db_names = [f"street {i // 4}/img_{i:02d}.jpg" for i in range(11)]  # nested folders, a space in the names
    make_jpegs(tmp / "photos" / "db", db_names, size=(64, 48), seed=1)
    make_jpegs(tmp / "photos" / "queries", [f"q{i}.jpeg" for i in range(4)], size=(64, 48), seed=2)
    Image.new("RGB", (64, 48), RED).save(tmp / "photos" / "db" / "red.png")  # a flat colour the screenshot can find
    (tmp / "photos" / "db" / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    net = build_model(SMALL).eval()
    with torch.no_grad():  # centroids from the photos' own local descriptors: distances far apart, no near-ties
        files = sorted((tmp / "photos").rglob("*.jp*g"))
        local = net.local_descriptors(torch.stack([load_image(f, 48, 64, SMALL.mean, SMALL.std) for f in files]))
        local = local.permute(0, 2, 3, 1).reshape(-1, net.feature_dim).numpy()
    net.pool.init_params(local[np.random.default_rng(0).choice(len(local), 4, replace=False)], local)
    save_model(tmp / "model.pt", net, SMALL)
    return {"tmp": tmp, "net": net, "db": tmp / "photos" / "db", "queries": tmp / "photos" / "queries"}


def invoke(world: dict, out: Path, *extra: str):
    return CliRunner().invoke(app, ["retrieve", "--model", str(world["tmp"] / "model.pt"), "--database",
                                    str(world["db"]), "--queries", str(world["queries"]), "--out", str(out),
                                    "--workers", "0", "--batch-size", "3", "--no-progress", "--device", "cpu", *extra])


def test_top_k_equals_a_brute_force_ranking_of_the_models_descriptors(world):
    out = world["tmp"] / "results" / "matches.csv"
    res = invoke(world, out, "--top", "4", "--html", str(world["tmp"] / "results" / "page.html"))
    assert res.exit_code == 0, res.output
    features = out.with_name("matches.features.h5")
    with h5py.File(features) as f:
        db, q = f["db"][()].astype(np.float64), f["query"][()].astype(np.float64)
    db_files = sorted(p for p in world["db"].rglob("*") if p.suffix in (".jpg", ".png"))
    q_files = sorted(world["queries"].glob("*.jpeg"))
    db_files.sort(key=lambda p: p.relative_to(world["db"]).as_posix())
    with torch.no_grad():  # the rows are the model's descriptors of these files, in this order
        for files, rows in ((db_files, db), (q_files, q)):
            images = torch.stack([load_image(p, 48, 64, SMALL.mean, SMALL.std) for p in files])
            np.testing.assert_allclose(world["net"](images).numpy(), rows, atol=1e-5)
    d2 = ((q[:, None, :] - db[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), d2.shape), d2), axis=1)[:, :4]
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["query", "rank", "database", "squared_distance"] and len(table) == 4 * len(q)
    names = [p.relative_to(world["db"]).as_posix() for p in db_files]
    for i, qf in enumerate(q_files):
        rows = table[table["query"] == qf.name]
        assert rows["rank"].tolist() == [1, 2, 3, 4]
        assert rows["database"].tolist() == [names[j] for j in order[i]]
        np.testing.assert_allclose(rows["squared_distance"], d2[i, order[i]], rtol=1e-5, atol=1e-6)
    assert "notes.txt" not in set(table["database"])
    assert "retrieve: 4 queries × top 4 of 12 database images" in res.output


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "row":
            self.rows.append([])
        elif tag == "img":
            self.rows[-1].append(urllib.parse.unquote(attrs["src"]))


def test_the_page_shows_each_query_beside_its_matches(world):
    results = world["tmp"] / "results"
    if not (results / "page.html").exists():
        assert invoke(world, results / "matches.csv", "--top", "4", "--html", str(results / "page.html")).exit_code == 0
    parser = _Images()
    parser.feed((results / "page.html").read_text())
    table = pd.read_csv(results / "matches.csv")
    assert len(parser.rows) == 4
    for row, (query, matches) in zip(parser.rows, table.groupby("query", sort=False)):
        files = [(results / src).resolve() for src in row]
        assert all(f.is_file() for f in files)
        assert files[0] == (world["queries"] / query).resolve()
        assert files[1:] == [(world["db"] / m).resolve() for m in matches["database"][:4]]  # --page-matches 5 > 4


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium to render the page")
def test_the_page_renders_its_images_in_a_headless_browser(world, tmp_path):
    """The red database image is ranked somewhere for some query (it is in the database of 12 and each query shows
    its top 4): render the page with every match shown and find its colour on the screenshot."""
    out = tmp_path / "m.csv"
    assert invoke(world, out, "--top", "12", "--page-matches", "12", "--html", str(tmp_path / "page.html"),
                  "--features", str(tmp_path / "f.h5")).exit_code == 0
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=2800,900", (tmp_path / "page.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    red = (np.abs(pixels - RED) < 12).all(1)
    assert red.sum() > 4 * 150 * 150  # the flat red photo, at 200×150 on the page, once per query row


def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["retrieve", "--model", str(world["tmp"] / "model.pt"), "--database", str(empty),
                                   "--queries", str(world["queries"]), "--out", str(tmp_path / "m.csv")])
    assert res.exit_code == 2 and "no .jpg/.jpeg/.png images (--database)" in res.output
    res = invoke(world, world["tmp"] / "model.pt")
    assert res.exit_code == 2 and "given as --out and as the input --model" in res.output
    assert not (tmp_path / "m.csv").exists() and not list(tmp_path.glob("*.h5"))


def test_the_documented_command_parses():
    import re
    import shlex

    import typer

    from tests.conftest import REPO

    text = (REPO / "docs" / "how-to" / "own-photos.md").read_text()
    found = [shlex.split(line) for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines() if line.startswith("netvlad retrieve")]
    assert found
    command = typer.main.get_command(app).commands["retrieve"]
    for argv in found:
        args = [a.strip("[]") for a in argv[2:] if a.strip("[]")]
        ctx = command.make_context("retrieve", args)
        assert ctx.params["model"] and ctx.params["database"] and ctx.params["queries"] and ctx.params["out"]
