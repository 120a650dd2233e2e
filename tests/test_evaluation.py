"""`evaluate`'s output files: full-precision numbers, numbers-only metrics with a separate settings file, panorama
collapsing decided by the split, recall N capped at the database, one file per output."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from netvlad_core.datasets.manifest import Split, load_ground_truth, load_split, write_split
from netvlad_core.errors import NetVLADError, NetVLADWarning
from netvlad_core.evaluation import EvalConfig, evaluate, panorama_grouping
from netvlad_core.retrieval import panorama_ids_from_paths, search
from stages.cli import app
from tests.conftest import REPO

# Pittsburgh-like UTM (zone 17T): a 6-significant-digit writer loses metres of the northing.
ORIGIN = np.array([585000.123456789, 4477000.987654321])


def utm_split(tmp_path: Path, *, views: int = 1, record_views: bool = False, num_places: int = 12,
              num_queries: int = 9, seed: int = 0) -> tuple[Path, Split]:
    """Places 30 m apart near ORIGIN (sub-millimetre digits), ``views`` database rows per place (consecutive, file
    names that do not tell the panorama), queries a few cm to a few m off a place."""
    rng = np.random.default_rng(seed)
    place_utm = ORIGIN + np.stack([np.arange(num_places) * 30.000137, np.arange(num_places) * 3.000071], axis=1)
    db_utm = np.repeat(place_utm, views, axis=0)
    q_utm = place_utm[np.arange(num_queries) % num_places] + rng.uniform(-3, 3, size=(num_queries, 2))
    q_utm[0] = place_utm[0] + [0.03, -0.02]  # a few cm off
    split = Split(dataset="fake", name="test", image_root=tmp_path / "images",
                  db_paths=[f"db/{i:05d}.jpg" for i in range(len(db_utm))], db_utm=db_utm,
                  q_paths=[f"queries/q{i:03d}.jpg" for i in range(num_queries)], q_utm=q_utm,
                  extra={"views_per_panorama": views} if record_views else {})
    return write_split(split, tmp_path / "split"), split


def place_features(split: Split, path: Path, *, seed: int = 0, noise: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors that encode the position: views of one place nearly equal, queries noisy (some wrong)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(2, 32))
    db = ((split.db_utm - ORIGIN) / 100 @ basis + rng.normal(scale=0.01, size=(split.num_db, 32))).astype(np.float32)
    q = ((split.q_utm - ORIGIN) / 100 @ basis + rng.normal(scale=noise, size=(split.num_queries, 32)))
    q[0] = (split.q_utm[0] - ORIGIN) / 100 @ basis  # query 0 without noise: recognised
    q = q.astype(np.float32)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("db", data=db)
        h5.create_dataset("query", data=q)
        h5.attrs["complete"] = True
        h5.attrs["split"] = "test"
        h5.attrs["dataset"] = "fake"
        h5.attrs["dim"] = 32
    return db, q


def outputs(folder: Path) -> dict:
    return dict(metrics_json=folder / "metrics.json", plot_csv=folder / "recall.csv",
                per_query_csv=folder / "per_query.csv")


def read_strings(path: Path) -> pd.DataFrame:
    """The CSV as text, so each number is parsed by Python's correctly rounded float(), not pandas' parser."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ------------------------------------------------------------------------------------------ full precision


def test_per_query_csv_keeps_utm_coordinates_and_errors_at_full_precision(tmp_path):
    split_dir, split = utm_split(tmp_path)
    db, q = place_features(split, tmp_path / "feats.h5")
    out = outputs(tmp_path / "out")
    evaluate(tmp_path / "feats.h5", split_dir, model_name="m", cfg=EvalConfig(recall_ns=(1, 5), per_query_top=4),
             **out)

    manifest = load_split(split_dir)
    np.testing.assert_array_equal(manifest.q_utm, split.q_utm)  # the manifest itself is exact (%.17g)
    rows = read_strings(out["per_query_csv"])
    utm = np.array([[float(e), float(n)] for e, n in zip(rows["utm_east"], rows["utm_north"])])
    np.testing.assert_array_equal(utm, manifest.q_utm)
    top1 = np.array([int(s.split()[0]) for s in rows["top_indices"]])
    estimates = np.array([[float(e), float(n)] for e, n in zip(rows["estimate_east"], rows["estimate_north"])])
    np.testing.assert_array_equal(estimates, manifest.db_utm[top1])  # k = 1, uniform: the top match's position
    errors = np.array([float(x) for x in rows["localisation_error_m"]])
    recomputed = [math.hypot(e[0] - u[0], e[1] - u[1]) for e, u in zip(estimates, utm)]
    np.testing.assert_allclose(errors, recomputed, rtol=0, atol=1e-9)  # the CSV agrees with itself
    assert errors[0] < 0.1  # a query a few cm off its (retrieved) place keeps its cm

    distances, indices = search(db, q, 4)
    np.testing.assert_array_equal([[int(i) for i in s.split()] for s in rows["top_indices"]], indices)
    written = np.array([[np.float32(float(d)) for d in s.split()] for s in rows["top_distances"]])
    np.testing.assert_array_equal(written, distances)  # every float32 distance reads back bit for bit

    metrics = json.loads(out["metrics_json"].read_text())
    plot = read_strings(out["plot_csv"])
    assert [float(r) for r in plot["recall"]] == [metrics["recall@1"], metrics["recall@5"]]


# ------------------------------------------------------------------------------------------ panoramas


def brute_force_collapsed(db: np.ndarray, q: np.ndarray, panoramas: np.ndarray, k: int) -> np.ndarray:
    d2 = ((q[:, None, :].astype(np.float64) - db[None]) ** 2).sum(-1)
    out = []
    for row in np.argsort(d2, axis=1, kind="stable"):
        seen, keep = set(), []
        for i in row:
            if panoramas[i] not in seen:
                seen.add(panoramas[i])
                keep.append(int(i))
        out.append(keep[:k])
    return np.array(out)


def test_split_with_views_per_panorama_is_collapsed_by_default(tmp_path):
    split_dir, split = utm_split(tmp_path, views=3, record_views=True)
    assert load_split(split_dir).extra["views_per_panorama"] == 3
    assert len(set(panorama_ids_from_paths(split.db_paths))) == split.num_db  # the names do not tell the panorama
    db, q = place_features(split, tmp_path / "feats.h5")
    runs = {}
    for name, collapse in (("default", None), ("collapsed", True), ("uncollapsed", False)):
        out = outputs(tmp_path / name)
        evaluate(tmp_path / "feats.h5", split_dir, model_name="m",
                 cfg=EvalConfig(recall_ns=(1, 2, 3), per_query_top=3, collapse_panoramas=collapse), **out)
        runs[name] = (json.loads(out["metrics_json"].read_text()), out["per_query_csv"].read_text())

    assert runs["default"] == runs["collapsed"]
    assert runs["default"][0]["recall@3"] > runs["uncollapsed"][0]["recall@3"]  # 3 places in the top 3, not 1
    panoramas = np.arange(split.num_db) // 3  # 3 consecutive rows per panorama, as the split records
    rows = pd.read_csv(tmp_path / "default" / "per_query.csv")
    top = np.array([[int(i) for i in s.split()] for s in rows["top_indices"]])
    np.testing.assert_array_equal(top, brute_force_collapsed(db, q, panoramas, 3))
    positives = load_ground_truth(split_dir).positives
    for n in (1, 2, 3):
        hits = [bool(set(t[:n]) & set(p.tolist())) for t, p in zip(top, positives)]
        assert runs["default"][0][f"recall@{n}"] == pytest.approx(np.mean(hits))
    flat = pd.read_csv(tmp_path / "uncollapsed" / "per_query.csv")
    assert any(len(set(panoramas[[int(i) for i in s.split()]])) < 3 for s in flat["top_indices"])


def test_tokyo247_names_agree_with_12_consecutive_views():
    """tokyo247 database names ``<folder>/<panorama id>_<pitch>_<yaw>.png`` group into the same panoramas as the
    split's ``views_per_panorama = 12`` consecutive rows (the authors' floor((id-1)/12))."""
    ids = ["Ab3dEfGhIjKlMnOpQrStUv", "zY-x_wVuTsRqPoNmLkJiH1", "0123456789abcdefghij_k"]
    paths = [f"{5000 + p:05d}/{pano}_012_{yaw:03d}.png" for p, pano in enumerate(ids) for yaw in range(0, 360, 30)]
    np.testing.assert_array_equal(panorama_ids_from_paths(paths), np.arange(36) // 12)


@pytest.mark.parametrize("views, match", [(5, "not a multiple of 5"), (0, "positive integer"),
                                          ("12", "positive integer"), (True, "positive integer")])
def test_bad_views_per_panorama_is_refused(tmp_path, views, match):
    split = Split(dataset="fake", name="test", image_root=tmp_path, db_paths=[f"{i}.jpg" for i in range(12)],
                  db_utm=np.zeros((12, 2)), q_paths=["q.jpg"], q_utm=np.zeros((1, 2)),
                  extra={"views_per_panorama": views})
    for collapse in (None, True, False):  # a malformed split.json is refused whatever the option says
        with pytest.raises(NetVLADError, match=rf"^x/split\.json: extra\.views_per_panorama .*{match}"):
            panorama_grouping(split, collapse, where="x/split.json")


# ------------------------------------------------------------------------------------------ metrics vs settings


def test_metrics_file_holds_numbers_only_and_the_settings_file_the_rest(tmp_path):
    split_dir, split = utm_split(tmp_path, views=3, record_views=True)
    place_features(split, tmp_path / "feats.h5")
    out = outputs(tmp_path / "out")
    cfg = EvalConfig(recall_ns=(1, 5), localisation_k=2, localisation_weighting="softmax")
    evaluate(tmp_path / "feats.h5", split_dir, model_name="trained", cfg=cfg, **out)
    metrics = json.loads(out["metrics_json"].read_text())
    assert metrics and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                           for v in metrics.values()), metrics
    assert {"recall@1", "recall@5", "num_queries", "median_error_m", "localised_within_25m"} <= set(metrics)

    evaluate(tmp_path / "feats.h5", split_dir, model_name="trained", settings_json=tmp_path / "out/eval.json",
             cfg=cfg, **out)
    assert json.loads(out["metrics_json"].read_text()) == metrics
    settings = json.loads((tmp_path / "out/eval.json").read_text())
    assert settings["model"] == "trained" and settings["dataset"] == "fake" and settings["split"] == "test"
    assert settings["index"] == "Flat"
    assert settings["collapse_panoramas"] is True and settings["collapse_panoramas_decided_by"] == "split"
    assert settings["views_per_panorama"] == 3 and settings["num_panoramas"] == 12
    assert settings["localisation_k"] == 2 and settings["localisation_weighting"] == "softmax"
    assert settings["recall_n_requested"] == [1, 5] == settings["recall_n"] and settings["recall_n_capped_at"] is None


# ------------------------------------------------------------------------------------------ recall N, outputs


def test_recall_n_above_the_database_is_capped_with_a_warning(tmp_path):
    split_dir, split = utm_split(tmp_path)  # 12 database images
    place_features(split, tmp_path / "feats.h5")
    out = outputs(tmp_path / "out")
    cfg = EvalConfig(recall_ns=(1, 5, 20, 100))
    with pytest.warns(NetVLADWarning, match=r"recall@20, recall@100 asked for, but the database has only 12 images"):
        evaluate(tmp_path / "feats.h5", split_dir, model_name="m", cfg=cfg, **out)
    metrics = json.loads(out["metrics_json"].read_text())
    assert [k for k in metrics if k.startswith("recall@")] == ["recall@1", "recall@5", "recall@12"]
    positives = load_ground_truth(split_dir).positives
    assert metrics["recall@12"] == np.mean([len(p) > 0 for p in positives])  # the whole database is ranked
    assert pd.read_csv(out["plot_csv"])["n"].tolist() == [1, 5, 12]
    with pytest.warns(NetVLADWarning):
        evaluate(tmp_path / "feats.h5", split_dir, model_name="m", settings_json=tmp_path / "out/eval.json",
                 cfg=cfg, **out)
    settings = json.loads((tmp_path / "out/eval.json").read_text())
    assert settings["recall_n_requested"] == [1, 5, 20, 100] and settings["recall_n"] == [1, 5, 12]
    assert settings["recall_n_capped_at"] == 12

    split_dir, split = utm_split(tmp_path / "pano", views=3, record_views=True)  # 12 panoramas of 3 views
    place_features(split, tmp_path / "pano/feats.h5")
    with pytest.warns(NetVLADWarning, match=r"recall@20 asked for, but the database has only 12 panoramas"):
        evaluate(tmp_path / "pano/feats.h5", split_dir, model_name="m", cfg=EvalConfig(recall_ns=(1, 20)),
                 **outputs(tmp_path / "pano/out"))
    assert "recall@12" in json.loads((tmp_path / "pano/out/metrics.json").read_text())


def evaluate_cli(tmp_path: Path, split_dir: Path, *extra: str):
    out = tmp_path / "cli"
    args = ["evaluate", "--features", str(tmp_path / "feats.h5"), "--split-dir", str(split_dir),
            "--model-name", "m", "--metrics", str(out / "m.json"), "--plot", str(out / "r.csv"),
            "--per-query", str(out / "pq.csv"), "--settings", str(out / "eval.json"), "--no-progress", *extra]
    return CliRunner().invoke(app, args), out


def test_cli_warns_in_one_line_and_refuses_one_file_for_two_outputs(tmp_path):
    split_dir, split = utm_split(tmp_path)
    place_features(split, tmp_path / "feats.h5")
    result, out = evaluate_cli(tmp_path, split_dir, "--recall-n", "1", "--recall-n", "50")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"warning: {split_dir}: recall@50 asked for, but the database has only 12 images; reporting recall@12 instead"]

    for option in ("--plot", "--per-query", "--settings", "--retrievals"):
        clash = tmp_path / "clash" / "same.json"
        result, _ = evaluate_cli(tmp_path, split_dir, "--metrics", str(clash), option, str(clash))
        assert result.exit_code == 2, (option, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {clash}: given as "), lines
        assert not (tmp_path / "clash").exists() or not any((tmp_path / "clash").iterdir())
    result, _ = evaluate_cli(tmp_path, split_dir, "--per-query", str(tmp_path / "feats.h5"))
    assert result.exit_code == 2 and "the input --features" in result.stderr


def test_cli_collapse_option_forms_and_the_params_yaml_expansion(tmp_path):
    from dvc.parsing.interpolate import to_str

    split_dir, split = utm_split(tmp_path, views=3, record_views=True)
    place_features(split, tmp_path / "feats.h5")
    decided = {}
    for form in (["--collapse-panoramas", "auto"], ["--collapse-panoramas", "yes"], ["--collapse-panoramas=no"],
                 ["--no-collapse-panoramas"], []):
        result, out = evaluate_cli(tmp_path, split_dir, "--recall-n", "1", *form)
        assert result.exit_code == 0, (form, result.output)
        settings = json.loads((out / "eval.json").read_text())
        decided[" ".join(form)] = (settings["collapse_panoramas"], settings["collapse_panoramas_decided_by"])
    assert decided == {"--collapse-panoramas auto": (True, "split"), "--collapse-panoramas yes": (True, "option"),
                       "--collapse-panoramas=no": (False, "option"), "--no-collapse-panoramas": (False, "option"),
                       "": (True, "split")}
    result, _ = evaluate_cli(tmp_path, split_dir, "--collapse-panoramas", "maybe")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --collapse-panoramas: expected auto, yes or no, got 'maybe'"

    # dvc.yaml passes `${evaluate}` expanded as DVC does with this repository's .dvc/config (boolean_optional,
    # append): the shipped `auto` and a YAML `false` must both come through.
    group = yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]
    assert group["collapse-panoramas"] == "auto"
    for value, expected in (("auto", True), (False, False), ("no", False)):
        args = shlex.split(to_str({**group, "collapse-panoramas": value}, {"bool": "boolean_optional",
                                                                           "list": "append"}))
        result, out = evaluate_cli(tmp_path, split_dir, *args)
        assert result.exit_code == 0, (value, args, result.output)
        assert json.loads((out / "eval.json").read_text())["collapse_panoramas"] is expected
