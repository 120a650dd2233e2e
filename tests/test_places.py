"""The places recipe: the multi-similarity loss and miner wiring against the formulas, P × K place batches, the
GSV-Cities reader on a tree written in the published format, the places view of a UTM split against an independent
cell assignment, and (slow) a SIGKILLed places run resuming to bitwise the same model, the trunk cache and
augmentation, and a 2-process gloo run."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.manifest import Split, load_split
from netvlad_core.datasets.places import Places, load_places
from netvlad_core.errors import NetVLADError
from netvlad_core.training import PlacesConfig, TrainConfig
from tests.test_training import CHECKPOINT_NAME, _assert_same_weights, _finish, _kill_after_checkpoint, _start, tiny

REPO = Path(__file__).resolve().parents[1]
assert tiny  # the module's tiny splits and model (a fixture of tests.test_training)


# --------------------------------------------------------------------------------------------- loss and miner

def test_ms_loss_and_miner_equal_the_formulas_on_a_hand_made_batch():
    """Miner (ε): a positive pair (i, j) is kept when S_ij - ε < max over i's negatives, a negative pair (i, k) when
    S_ik + ε > min over i's positives. Loss per anchor: 1/α log(1 + Σ_kept pos exp(-α (S_ij - base))) +
    1/β log(1 + Σ_kept neg exp(β (S_ik - base))), averaged over all anchors. S is the cosine similarity."""
    from netvlad_core.training.places import ms_loss, multi_similarity

    cfg = PlacesConfig(ms_alpha=2.0, ms_beta=10.0, ms_base=0.3, miner_epsilon=0.1)
    angles = np.radians([0, 50, 30, 80, 150, 175])  # places 0, 0, 1, 1, 2, 2 on the unit circle (+ a third axis)
    x = np.stack([np.cos(angles), np.sin(angles), [0.2, -0.1, 0.3, 0.0, 0.1, -0.2]], 1)
    labels = [0, 0, 1, 1, 2, 2]
    miner, loss_fn = multi_similarity(cfg)
    loss, positives, negatives = ms_loss(miner, loss_fn, torch.tensor(x, dtype=torch.float32), torch.tensor(labels))

    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = unit @ unit.T
    total, kept_pos, kept_neg = 0.0, 0, 0
    for i in range(6):
        pos = [j for j in range(6) if j != i and labels[j] == labels[i]]
        neg = [k for k in range(6) if labels[k] != labels[i]]
        pos_kept = [j for j in pos if s[i, j] - cfg.miner_epsilon < max(s[i, k] for k in neg)]
        neg_kept = [k for k in neg if s[i, k] + cfg.miner_epsilon > min(s[i, j] for j in pos)]
        kept_pos, kept_neg = kept_pos + len(pos_kept), kept_neg + len(neg_kept)
        if pos_kept and neg_kept:  # an anchor whose kept pairs lack one kind contributes no loss
            total += 1 / cfg.ms_alpha * math.log(1 + sum(math.exp(-cfg.ms_alpha * (s[i, j] - cfg.ms_base))
                                                         for j in pos_kept))
            total += 1 / cfg.ms_beta * math.log(1 + sum(math.exp(cfg.ms_beta * (s[i, k] - cfg.ms_base))
                                                        for k in neg_kept))
    assert (positives, negatives) == (kept_pos, kept_neg)
    assert 0 < kept_pos < 6 and 0 < kept_neg < 24, "the batch must make the miner choose"
    assert float(loss) == pytest.approx(total / 6, rel=1e-5)


def test_config_defaults_are_gsv_cities_and_bad_values_are_one_line_errors():
    cfg = PlacesConfig()
    assert (cfg.places_per_batch, cfg.images_per_place, cfg.ms_alpha, cfg.ms_beta, cfg.ms_base, cfg.miner_epsilon) \
        == (120, 4, 1.0, 50.0, 0.0, 0.1)
    assert TrainConfig().recipe == "triplet"
    for bad in (TrainConfig(recipe="pairs"), TrainConfig(optimizer="adam"), TrainConfig(best_by=3),
                TrainConfig(places=PlacesConfig(images_per_place=1)), TrainConfig(places=PlacesConfig(augment="x"))):
        with pytest.raises(NetVLADError):
            bad.validate()


def test_schedule_warms_up_then_decays_to_the_final_factor():
    from netvlad_core.training.optim import build_optimiser

    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(optimizer="adamw", lr=1.0, schedule="linear", warmup_steps=2, final_lr_factor=0.2, epochs=2)
    optimizer, scheduler = build_optimiser(model, cfg, steps_per_epoch=3)  # 6 steps: 2 warm-up, then 4 decaying
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert isinstance(optimizer, torch.optim.AdamW)
    np.testing.assert_allclose(lrs, [0.5, 1.0, 1.0, 1.0 - 0.8 / 3, 1.0 - 1.6 / 3, 0.2])


# ------------------------------------------------------------------------------------------------ place batches

def _split(n_db: int, n_q: int, rng, *, yaw: bool = False, name: str = "train") -> Split:
    db = [f"{i // 100:03d}/{i:06d}_pitch1_yaw{i % 12 + 1}.jpg" if yaw else f"db/{i}.jpg" for i in range(n_db)]
    return Split(dataset="pitts30k" if yaw else "tiny", name=name, image_root=Path("/nonexistent"), db_paths=db,
                 db_utm=rng.uniform(0, 40, (n_db, 2)) + [585000, 4477000], q_paths=[f"q/{i}.jpg" for i in range(n_q)],
                 q_utm=rng.uniform(0, 40, (n_q, 2)) + [585000, 4477000])


def test_place_batches_hold_exactly_k_images_of_p_distinct_places():
    from netvlad_core.training.places import PlacesRecipe
    from netvlad_core.training.state import TrainState

    rng = np.random.default_rng(0)
    split = _split(60, 20, rng)
    labels = np.repeat(np.arange(16), 5)[:80]  # 16 places of 5 images
    labels[rng.choice(80, 6, replace=False)] = -1  # some images in no place
    places = Places(split, labels, "test")
    cfg = TrainConfig(recipe="places", seed=3, places=PlacesConfig(places_per_batch=5, images_per_place=3))
    recipe = PlacesRecipe(cfg, split, places)
    assert recipe.steps_per_epoch() == 16 // 5
    for epoch in (0, 1):
        state = TrainState(None, None, None, None, epoch, 0, recipe.epoch_order(epoch), {}, 0, 0, None, 0, False, None)
        seen = []
        for b in range(recipe.steps_per_epoch()):
            images, batch_labels = recipe.batch(state, b)
            assert len(images) == 15 and len(set(images.tolist())) == 15
            assert np.array_equal(labels[images], batch_labels), "every image belongs to its label's place"
            assert sorted(np.bincount(batch_labels)[np.unique(batch_labels)].tolist()) == [3] * 5, "P places x K"
            seen += np.unique(batch_labels).tolist()
            again, _ = recipe.batch(state, b)
            assert np.array_equal(images, again), "a batch is a function of (seed, epoch, position)"
        assert len(seen) == len(set(seen)) == 15, "each place at most once per epoch"


# ------------------------------------------------------------------------------------------------- GSV-Cities

def _gsv_tree(root: Path, cities: dict[str, list[int]]) -> None:
    """A GSV-Cities tree in the published format: per city, places with the given image counts."""
    rng = np.random.default_rng(0)
    for city, counts in cities.items():
        rows = []
        (root / "Images" / city).mkdir(parents=True)
        for place, count in enumerate(counts):
            lat, lon = 51.5 + place * 0.002, -0.12 + place * 0.001
            for j in range(count):
                row = dict(place_id=place, year=2015 + j, month=j % 12 + 1, northdeg=int(rng.integers(0, 360)),
                           city_id=city, lat=lat, lon=lon, panoid=f"p_{city}{place}x{j}-Q")
                rows.append(row)
                name = (f"{city}_{place:07d}_{row['year']}_{row['month']:02d}_{row['northdeg']:03d}_{lat}_{lon}_"
                        f"{row['panoid']}.jpg")
                Image.new("RGB", (8, 6), (place * 40 % 255, j * 30, 90)).save(root / "Images" / city / name)
        (root / "Dataframes").mkdir(exist_ok=True)
        pd.DataFrame(rows).to_csv(root / "Dataframes" / f"{city}.csv", index=False)


def test_gsv_cities_tree_reads_back_with_its_places_cities_and_drop_counts(tmp_path):
    root = tmp_path / "gsv"
    _gsv_tree(root, {"London": [4, 2, 5, 3], "Osaka": [6, 4], "Rome": [4, 4]})
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "stages.download", "--dataset", "gsv-cities", "--image-root",
                           str(root), "--cities", "London", "--cities", "Osaka", "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 places with fewer than 4 images dropped (5 images)" in proc.stdout
    table = pd.read_csv(out / "train" / "places.csv")
    assert sorted(set(table["city"])) == ["London", "Osaka"], "Rome was not asked for"
    per_place = table.groupby("place").agg(city=("city", "first"), n=("path", "size"))
    place_ids = table.assign(pid=table["path"].str.split("/").str[1].str.split("_").str[1]).groupby("place")["pid"]
    assert (place_ids.nunique() == 1).all(), "a place holds the images of one GSV place id"
    assert sorted(zip(per_place["city"], per_place["n"])) == [("London", 4), ("London", 5), ("Osaka", 4),
                                                              ("Osaka", 6)]
    split = load_split(out / "train")
    assert split.num_db == 19 and split.num_queries == 0 and all((root / "Images" / p).is_file()
                                                                 for p in split.db_paths)
    places = load_places(out / "train", split, cell_size_m=5, heading_sectors=4, min_images=5)
    assert places.num_places == 2 and places.dropped_places == 2, "places.csv groups, K = 5 drops two more"


def test_gsv_cities_missing_image_and_unknown_city_are_one_line_errors(tmp_path):
    from netvlad_core.datasets.gsv_cities import read_gsv_cities

    root = tmp_path / "gsv"
    _gsv_tree(root, {"London": [4, 4]})
    with pytest.raises(NetVLADError, match="no city 'Paris'"):
        read_gsv_cities(root, cities=["Paris"])
    next((root / "Images" / "London").iterdir()).unlink()
    with pytest.raises(NetVLADError, match="1 of 8 images of London.csv missing"):
        read_gsv_cities(root)


def test_utm_conversion_against_the_zone_definition_and_great_circle_distances():
    from netvlad_core.datasets.gsv_cities import latlon_to_utm

    east, north = latlon_to_utm(np.array([0.0, -1e-9]), np.array([3.0, 3.0])).T
    np.testing.assert_allclose(east, 500000.0, atol=1e-6)
    np.testing.assert_allclose(north, [0.0, 10_000_000.0], atol=1e-3)
    lat, lon = np.array([40.44, 40.4409]), np.array([-81.0, -81.0])  # ~100 m apart on zone 17's central meridian
    a, b = latlon_to_utm(lat, lon)
    phi = np.radians(lat.mean())  # meridian arc length on the WGS84 ellipsoid
    m = 6378137.0 * (1 - 0.00669437999014) / (1 - 0.00669437999014 * np.sin(phi) ** 2) ** 1.5
    assert np.linalg.norm(b - a) == pytest.approx(0.9996 * m * np.radians(0.0009), rel=1e-6)


# ------------------------------------------------------------------------------------------- UTM places view

def test_utm_split_place_ids_equal_an_independent_cell_and_heading_assignment():
    rng = np.random.default_rng(1)
    split = _split(400, 50, rng, yaw=True)
    places = load_places(None, split, cell_size_m=10.0, heading_sectors=4, min_images=3)
    groups: dict[tuple, list[int]] = {}
    for i, path in enumerate(split.db_paths + split.q_paths):
        e, n = (split.db_utm if i < 400 else split.q_utm)[i if i < 400 else i - 400]
        if "_yaw" in path:
            heading = 30 * (int(path.split("_yaw")[1].split(".")[0]) - 1)
            sector = int(heading // 90)
        else:
            sector = None  # queries: Pittsburgh names them without a yaw
        groups.setdefault((math.floor(e / 10.0), math.floor(n / 10.0), sector), []).append(i)
    expected = sorted(sorted(g) for g in groups.values() if len(g) >= 3)
    got = sorted(m.tolist() for m in places.members())
    assert got == expected
    assert places.dropped_places == sum(len(g) < 3 for g in groups.values())
    assert places.dropped_images == sum(len(g) for g in groups.values() if len(g) < 3)


def test_the_built_in_citys_headings_split_a_cell_into_sectors(tmp_path):
    from netvlad_core.datasets.places import view_headings

    rng = np.random.default_rng(2)
    split = _split(8, 2, rng, name="train")
    split.dataset, split.image_root = "synthetic", tmp_path / "raw" / "images"
    yaws = [45.0, 135.0, 225.0, 315.0, 50.0, 130.0, 230.0, 300.0, 20.0, 359.0]
    rows = [("database", p) for p in split.db_paths] + [("query", p) for p in split.q_paths]
    split.q_paths = [f"queries_real/{p}" for p in split.q_paths]
    (tmp_path / "raw").mkdir()
    pd.DataFrame({"path": [p for _, p in rows], "role": [r for r, _ in rows], "yaw_deg": yaws}).to_csv(
        tmp_path / "raw" / "poses_train.csv", index=False)
    np.testing.assert_array_equal(view_headings(split), yaws)
    split.db_utm[:] = split.q_utm[:] = [585001.0, 4477001.0]  # one cell
    places = load_places(None, split, cell_size_m=50, heading_sectors=4, min_images=2)
    assert sorted(m.tolist() for m in places.members()) == [[0, 4, 8], [1, 5], [2, 6], [3, 7, 9]]


# --------------------------------------------------------------------------------------- training end to end

def _places_args(tiny, run: str, **overrides) -> list[str]:
    opts = {"recipe": "places", "epochs": 2, "places-per-batch": 3, "images-per-place": 2, "cell-size-m": 10.0,
            "checkpoint-every": 1, "optimizer": "adamw", "lr": 0.001, "schedule": "cosine", "warmup-steps": 1,
            "encode-batch-size": 8, "workers": 0, "seed": 5, "device": "cpu", "trainable-blocks": 1,
            "trunk-cache": "off", **overrides}
    run_dir = tiny["root"] / run
    args = ["--init-model", str(tiny["init"]), "--train-split", str(tiny["train"]), "--val-split", str(tiny["val"]),
            "--out", str(run_dir / "model.pt"), "--live-dir", str(run_dir / "live"),
            "--checkpoint-dir", str(run_dir / "ckpt"), "--no-progress"]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("trunk_cache", ["off", "on"])
def test_places_run_sigkilled_mid_epoch_resumes_to_bitwise_the_same_model(tiny, trunk_cache):  # noqa: F811
    name = f"places_{trunk_cache}"
    reference = _start(_places_args(tiny, f"{name}_ref", **{"trunk-cache": trunk_cache}))
    killed = _start(_places_args(tiny, f"{name}_killed", **{"trunk-cache": trunk_cache}))
    _kill_after_checkpoint(killed, tiny["root"] / f"{name}_killed" / "ckpt" / CHECKPOINT_NAME)
    shutil.rmtree(tiny["root"] / f"{name}_killed" / "live", ignore_errors=True)
    resumed = _finish(_start(_places_args(tiny, f"{name}_killed", **{"trunk-cache": trunk_cache})))
    _finish(reference)
    assert "resuming from" in resumed and "places of tiny train (UTM cells of 10 m)" in resumed
    _assert_same_weights(tiny["root"] / f"{name}_killed" / "model.pt", tiny["root"] / f"{name}_ref" / "model.pt")
    loss = (tiny["root"] / f"{name}_ref" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert loss == (tiny["root"] / f"{name}_killed" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert len(loss.splitlines()) > 3


@pytest.mark.slow
def test_augmentation_trains_on_images_with_a_one_line_notice_and_trunk_cache_on_refuses_it(tiny):  # noqa: F811
    err = _finish(_start(_places_args(tiny, "places_aug", epochs=1, augment="randaugment", **{"trunk-cache": "auto"})))
    assert "train: trunk cache off: augment randaugment needs the whole model on augmented images" in err
    proc = _start(_places_args(tiny, "places_aug_on", epochs=1, augment="randaugment", **{"trunk-cache": "on"}))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: trunk-cache on contradicts augment randaugment" in err


@pytest.mark.slow
def test_a_two_process_gloo_places_run_completes(tiny):  # noqa: F811
    from tests.test_distributed import _env

    run = tiny["root"] / "places_ddp"
    args = [sys.executable, "-m", "stages.launch", "--nproc-per-node", "2", "train", *_places_args(tiny, "places_ddp"),
            "--dist-timeout", "120"]
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "places recipe" in proc.stdout and "2 processes" in proc.stdout
    assert (run / "model.pt").is_file()
