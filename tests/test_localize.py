"""`netvlad localize`: top matches equal brute-force nearest neighbours, the position is within 25 m whenever the
top-1 match is a true positive, `--json` parses, unreadable photos get one error line each and are skipped (exit
status 0 when all were answered, 1 when some were not, 2 when none was)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from netvlad_core.datasets.images import load_image
from netvlad_core.datasets.manifest import load_ground_truth, load_split
from netvlad_core.features import FeatureConfig, extract_split_features
from netvlad_core.models import ModelConfig, build_model, load_model, save_model
from stages.cli import app
from tests.conftest import make_split

SMALL = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny split whose queries are re-photographed (noisy, re-encoded) copies of the database image nearest
    to them, a saved model and the split's features file."""
    tmp = tmp_path_factory.mktemp("localize")
    split_dir = make_split(tmp, num_db=12, num_q=5)
    split = load_split(split_dir)
    rng = np.random.default_rng(5)
    for q_file, q_utm in zip(split.query_files(), split.q_utm):
        nearest = int(np.argmin(np.linalg.norm(split.db_utm - q_utm, axis=1)))
        pixels = np.asarray(Image.open(split.db_files()[nearest]).convert("RGB"), dtype=np.float64)
        noisy = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(q_file, quality=85)
    torch.manual_seed(0)
    net = build_model(SMALL).eval()
    with torch.no_grad():  # centroids from the database's own local descriptors: a discriminative NetVLAD
        images = torch.stack([load_image(f, 48, 64, SMALL.mean, SMALL.std) for f in split.db_files()])
        local = net.local_descriptors(images).permute(0, 2, 3, 1).reshape(-1, net.feature_dim).numpy()
    net.pool.init_params(local[rng.choice(len(local), SMALL.num_clusters, replace=False)], local)
    save_model(tmp / "model.pt", net, SMALL)
    model, cfg = load_model(tmp / "model.pt")
    features = extract_split_features(model, cfg, split, tmp / "test_features.h5",
                                      device=torch.device("cpu"), cfg=FeatureConfig(batch_size=6, num_workers=0),
                                      progress=False)
    return {"tmp": tmp, "split_dir": split_dir, "split": split, "model": tmp / "model.pt", "features": features}


def _invoke(world: dict, images: list[Path], *extra: str):
    args = ["localize", *map(str, images), "--model", str(world["model"]), "--database", str(world["features"]),
            "--manifest", str(world["split_dir"]), "--device", "cpu", *extra]
    return CliRunner().invoke(app, args)


def test_localize_json_matches_brute_force_and_positions_are_within_25m(world):
    split = world["split"]
    photos = split.query_files()
    result = _invoke(world, photos, "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["image"] for a in answers] == [str(p) for p in photos]

    model, cfg = load_model(world["model"])
    with torch.no_grad():
        db = np.stack([model(load_image(f, 48, 64, cfg.mean, cfg.std)[None])[0].numpy() for f in split.db_files()])
        q = np.stack([model(load_image(f, 48, 64, cfg.mean, cfg.std)[None])[0].numpy() for f in photos])
    d2 = ((q[:, None, :].astype(np.float64) - db[None]) ** 2).sum(-1)
    positives = load_ground_truth(world["split_dir"]).positives
    true_top1 = 0
    for row, answer in enumerate(answers):
        matches = answer["matches"]
        assert [m["rank"] for m in matches] == [1, 2, 3]
        assert [m["db_index"] for m in matches] == list(np.argsort(d2[row], kind="stable")[:3])
        np.testing.assert_allclose([m["squared_distance"] for m in matches], np.sort(d2[row])[:3], atol=1e-4)
        top = matches[0]
        assert top["path"] == split.db_paths[top["db_index"]]
        assert (top["utm_east"], top["utm_north"]) == tuple(split.db_utm[top["db_index"]])
        position = np.array([answer["position"]["utm_east"], answer["position"]["utm_north"]])
        np.testing.assert_allclose(position, split.db_utm[top["db_index"]])  # localisation-k 1, uniform
        if top["db_index"] in positives[row]:
            true_top1 += 1
            assert np.linalg.norm(position - split.q_utm[row]) <= 25.0
    assert true_top1 == len(photos), "near-copies of database images should retrieve their originals"


def test_corrupt_photo_gets_one_error_line_and_the_others_are_answered(world):
    photos = world["split"].query_files()
    corrupt = world["tmp"] / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated, not really a JPEG")
    missing = world["tmp"] / "missing.jpg"
    result = _invoke(world, [photos[0], corrupt, photos[1], missing], "--top-k", "2", "--localisation-k", "2",
                     "--weighting", "inverse_distance")
    assert result.exit_code == 1, result.output  # answered in part: not a success
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {corrupt}: cannot decode image (")
    assert errors[1].startswith(f"error: {missing}: ")
    out = result.stdout
    assert f"{photos[0]}: position E " in out and f"{photos[1]}: position E " in out
    assert str(corrupt) not in out and out.count("  1. ") == 2 and out.count("  2. ") == 2

    partly = _invoke(world, [missing, photos[2]], "--json")
    assert partly.exit_code == 1
    assert [a["image"] for a in json.loads(partly.stdout)] == [str(photos[2])]

    only_bad = _invoke(world, [corrupt], "--json")
    assert only_bad.exit_code == 2
    assert f"error: {corrupt}: cannot decode image" in only_bad.stderr
    assert json.loads(only_bad.stdout) == []


def test_features_from_another_model_are_refused(world):
    torch.manual_seed(1)
    other = world["tmp"] / "other_model.pt"
    save_model(other, build_model(SMALL), SMALL)
    result = CliRunner().invoke(app, ["localize", str(world["split"].query_files()[0]), "--model", str(other),
                                      "--database", str(world["features"]), "--manifest", str(world["split_dir"]),
                                      "--device", "cpu"])
    assert result.exit_code == 2
    assert "another model" in result.stderr and str(world["features"]) in result.stderr


def test_features_of_another_split_are_refused(world):
    other_split = make_split(world["tmp"] / "other", num_db=7, num_q=2, name="test")
    result = CliRunner().invoke(app, ["localize", str(world["split"].query_files()[0]), "--model",
                                      str(world["model"]), "--database", str(world["features"]),
                                      "--manifest", str(other_split), "--device", "cpu"])
    assert result.exit_code == 2
    assert "database rows" in result.stderr
    shutil.rmtree(world["tmp"] / "other")


def test_a_database_whose_descriptors_overflow_is_refused_not_ranked_by_row_order(world, tmp_path):
    """Finite as stored (float32 1e20), not once squared: one line naming the file and the row."""
    bad = tmp_path / "overflowing.h5"
    bad.write_bytes(world["features"].read_bytes())
    with h5py.File(bad, "r+") as h5:
        data = h5["db"][()].astype(np.float32)
        data[5, 0] = 1e20
        del h5["db"]
        h5.create_dataset("db", data=data)
    result = _invoke({**world, "features": bad}, [world["split"].query_files()[0]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: database row 5: squared norm inf"), lines
