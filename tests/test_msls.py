"""MSLS with the official protocol: a small tree in the published layout (CSV files written by pandas, as the
originals are, with real JPEGs) read by `netvlad download --dataset msls`, against an independent implementation of
mapillary_sls' rules written here (and a few hand-checked facts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from netvlad_core.datasets.manifest import load_ground_truth, load_split
from netvlad_core.datasets.msls import SUBTASKS, TRAIN_CITIES
from tests.conftest import REPO, make_jpegs

BASE = np.array([723000.0, 6175000.0])  # both val cities on the SAME numbers: positives must stay within a city

# Per city and folder: (east offset, north offset, pano, night, {subtask: flag} overrides (all defaults to True)).
CITIES = {
    "cph": {
        "database": [
            (0, 0, False, False, {}),           # d0
            (10, 0, False, False, {}),          # d1
            (20, 0, False, False, {}),          # d2
            (100, 0, False, False, {}),         # d3
            (110, 0, True, False, {}),          # d4 panorama: never a positive
            (200, 0, False, False, {}),         # d5
            (300, 0, False, False, {"all": False}),  # d6 outside the subtask
            (400, 0, False, False, {"n2d": True}),  # d7 day, in n2d's database
            (402, 5, False, True, {"n2d": False}),   # d8 night: not in n2d's database
        ],
        "query": [
            (2, 0, False, False, {}),           # q0 → d0, d1, d2 (18 m)
            (105, 0, False, False, {}),         # q1 → d3 only (d4 is a panorama)
            (305, 0, False, False, {}),         # q2 → only d6, outside the subtask: dropped
            (500, 0, False, False, {}),         # q3 → nothing within 25 m: dropped
            (0, 3, True, False, {}),            # q4 panorama: excluded
            (201, 0, False, False, {"all": False}),  # q5 outside the subtask: excluded
            (402, 0, False, True, {"n2d": True}),    # q6 night → d7, d8 (n2d: d7 only)
        ],
    },
    "sf": {
        "database": [(0, 0, False, False, {}), (50, 0, False, False, {})],
        "query": [(48, 0, False, False, {}), (1, 0, False, False, {}), (1000, 0, False, False, {})],
    },
    "zurich": {  # a train city
        "database": [(0, 0, False, False, {}), (8, 0, False, False, {}), (30, 0, True, False, {})],
        "query": [(5, 0, False, False, {}), (20, 0, False, False, {}), (29, 0, False, False, {"all": False})],
    },
}
DEFAULT_SUBTASKS = {"all": True, "s2w": False, "w2s": False, "o2n": False, "n2o": False, "d2n": False, "n2d": False}


def write_city(root: Path, city: str, spec: dict) -> None:
    for folder, rows in spec.items():
        d = root / "train_val" / city / folder
        d.mkdir(parents=True, exist_ok=True)
        keys = [f"{city}{folder[0]}{i:03d}xk" for i in range(len(rows))]
        east = [BASE[0] + r[0] for r in rows]
        north = [BASE[1] + r[1] for r in rows]
        pd.DataFrame({"key": keys, "lon": 12.5, "lat": 55.6, "ca": 90.0, "captured_at": 1500000000000,
                      "pano": [r[2] for r in rows]}).to_csv(d / "raw.csv")
        pd.DataFrame({"key": keys, "utm": "", "easting": east, "northing": north, "night": [r[3] for r in rows],
                      "control_panel": False, "view_direction": "Forward", "unique_cluster": 0,
                      }).to_csv(d / "postprocessed.csv")
        pd.DataFrame({"key": keys, "sequence_key": f"seq_{city}_{folder}", "frame_number": range(len(rows))}
                     ).to_csv(d / "seq_info.csv")
        pd.DataFrame([{**DEFAULT_SUBTASKS, **r[4]} for r in rows], columns=list(SUBTASKS)).to_csv(
            d / "subtask_index.csv")
        make_jpegs(d / "images", [f"{k}.jpg" for k in keys], size=(16, 12))


@pytest.fixture(scope="module")
def msls_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msls") / "MSLS"
    for city, spec in CITIES.items():
        write_city(root, city, spec)
    for city in TRAIN_CITIES:  # the other train cities: one database image and one query 3 m from it
        if city not in CITIES:
            write_city(root, city, {"database": [(0, 0, False, False, {})], "query": [(3, 0, False, False, {})]})
    (root / "test" / "miami").mkdir(parents=True)  # the test cities have no GPS
    return root


def official(root: Path, cities, *, subtask: str | None, keep_radius: float):
    """mapillary_sls MSLS(task='im2im') written out plainly: per city, frames filtered by the subtask column
    (positions in subtask_index.csv), then raw.pano == False; queries kept with a database frame within
    ``keep_radius`` of the same city; positives by brute-force distances at 25 m and 10 m."""
    queries, database, positives, train_positives = [], [], [], []
    for city in cities:
        kept = {}
        for folder in ("query", "database"):
            d = root / "train_val" / city / folder
            post = pd.read_csv(d / "postprocessed.csv", index_col=0)
            raw = pd.read_csv(d / "raw.csv", index_col=0)
            seq = pd.read_csv(d / "seq_info.csv", index_col=0)
            frames = list(post.index)
            if subtask is not None:
                allowed = np.where(pd.read_csv(d / "subtask_index.csv", index_col=0)[subtask])[0]
                frames = [i for i in frames if i in allowed]
            not_pano = np.where((raw["pano"] == False).values)[0]  # noqa: E712 (the original's test)
            frames = [i for i in frames if i in not_pano]
            paths = [f"train_val/{city}/{folder}/images/{seq['key'].iloc[i]}.jpg" for i in frames]
            kept[folder] = (paths, post.loc[frames, ["easting", "northing"]].to_numpy())
        (q_paths, q_utm), (db_paths, db_utm) = kept["query"], kept["database"]
        dist = np.sqrt(((q_utm[:, None, :] - db_utm[None]) ** 2).sum(-1)).reshape(len(q_paths), len(db_paths))
        for i, path in enumerate(q_paths):
            if (dist[i] <= keep_radius).any():
                queries.append(path)
                positives.append({db_paths[j] for j in np.flatnonzero(dist[i] <= 25.0)})
                train_positives.append({db_paths[j] for j in np.flatnonzero(dist[i] <= 10.0)})
        database += db_paths
    return queries, database, positives, train_positives


def run_download(root: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "stages.download", "--dataset", "msls", "--image-root", str(root),
                           "--out", str(out), "--no-progress", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def read_back(split_dir: Path):
    split = load_split(split_dir)
    gt = load_ground_truth(split_dir)
    as_paths = [[{split.db_paths[j] for j in p} for p in lists] for lists in (gt.positives, gt.train_positives)]
    return split, as_paths[0], as_paths[1], json.loads((split_dir / "split.json").read_text())


def test_val_is_cph_and_sf_with_the_official_rules(msls_root, tmp_path):
    res = run_download(msls_root, tmp_path / "out", "--split", "val")
    assert res.returncode == 0, res.stderr
    split, positives, train_positives, meta = read_back(tmp_path / "out" / "val")
    queries, database, expected, expected_train = official(msls_root, ("cph", "sf"), subtask="all", keep_radius=25)
    assert split.q_paths == queries and split.db_paths == database
    assert positives == expected and train_positives == expected_train
    # hand-checked: q0 → d0 d1 d2; q1 → d3 (d4 is a panorama); q6 → d7 d8; sf: r0 → e1, r1 → e0 (not cph's d0)
    name = "train_val/{}/{}/images/{}.jpg".format
    assert queries == [name("cph", "query", f"cphq{i:03d}xk") for i in (0, 1, 6)] + \
        [name("sf", "query", f"sfq{i:03d}xk") for i in (0, 1)]
    assert positives[1] == {name("cph", "database", "cphd003xk")}
    assert positives[4] == {name("sf", "database", "sfd000xk")}
    assert len(database) == 7 + 2  # cph without the panorama d4 and d6 (outside the subtask)
    assert meta["extra"]["dropped_queries"] == 3  # cph q2 (its only neighbour is outside the subtask), q3; sf r2
    assert meta["extra"]["protocol"]["subtask"] == "all" and meta["extra"]["protocol"]["panoramas"] == "excluded"
    assert [c["city"] for c in meta["extra"]["cities"]] == ["cph", "sf"]
    assert meta["num_queries"] == 5 and meta["pos_dist_thr"] == 25.0
    # a partial copy is not the published val set (18,871 / 740): one warning line says so
    assert "warning: " in res.stderr and "18871 and 740" in res.stderr


def test_a_subtask_filters_queries_and_database(msls_root, tmp_path):
    res = run_download(msls_root, tmp_path / "out", "--split", "val", "--msls-subtask", "n2d")
    assert res.returncode == 0, res.stderr
    split, positives, _, meta = read_back(tmp_path / "out" / "val")
    queries, database, expected, _ = official(msls_root, ("cph", "sf"), subtask="n2d", keep_radius=25)
    assert split.q_paths == queries and split.db_paths == database and positives == expected
    assert queries == ["train_val/cph/query/images/cphq006xk.jpg"]  # the night query alone
    assert positives == [{"train_val/cph/database/images/cphd007xk.jpg"}]  # the night database image d8 is out
    assert meta["extra"]["protocol"]["subtask"] == "n2d"


def test_train_uses_the_22_cities_without_subtask_and_keeps_queries_with_a_positive_within_10m(msls_root, tmp_path):
    res = run_download(msls_root, tmp_path / "out", "--split", "train")
    assert res.returncode == 0, res.stderr
    split, positives, train_positives, meta = read_back(tmp_path / "out" / "train")
    queries, database, expected, expected_train = official(msls_root, TRAIN_CITIES, subtask=None, keep_radius=10)
    assert split.q_paths == queries and split.db_paths == database
    assert positives == expected and train_positives == expected_train
    zurich = [q for q in queries if "/zurich/" in q]
    assert zurich == ["train_val/zurich/query/images/zurichq000xk.jpg"]  # y1 (12 m) and y2 (21 m) dropped
    assert meta["non_triv_pos_dist_sq_thr"] == 100.0 and meta["extra"]["dropped_queries"] == 2


def test_a_single_city_is_evaluated_with_the_val_rules(msls_root, tmp_path):
    res = run_download(msls_root, tmp_path / "out", "--split", "zurich")
    assert res.returncode == 0, res.stderr
    split, positives, _, _ = read_back(tmp_path / "out" / "zurich")
    queries, database, expected, _ = official(msls_root, ("zurich",), subtask="all", keep_radius=25)
    assert split.q_paths == queries and split.db_paths == database and positives == expected
    assert len(queries) == 2  # y1 is kept at 25 m; y2 is outside the subtask


def test_bad_msls_input_is_one_line(msls_root, tmp_path):
    for args, message in ((("--split", "miami"), "unknown split 'miami'"),
                          (("--split", "val", "--msls-subtask", "x2y"), "unknown subtask 'x2y'")):
        res = run_download(msls_root, tmp_path / "out", *args)
        assert res.returncode == 2 and not (tmp_path / "out").exists()
        assert res.stderr.strip().splitlines()[-1].startswith("error: ") and message in res.stderr, res.stderr
    (msls_root / "train_val" / "sf" / "query" / "raw.csv").rename(msls_root / "raw.csv.bak")
    try:
        res = run_download(msls_root, tmp_path / "out", "--split", "val")
        assert res.returncode == 2 and "sf/query/raw.csv: file not found" in res.stderr
    finally:
        (msls_root / "raw.csv.bak").rename(msls_root / "train_val" / "sf" / "query" / "raw.csv")
