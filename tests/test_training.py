"""Triplet training: a real SIGKILL mid-run (also during the trunk-cache build) resumes to bitwise the same model;
foreign checkpoints are not resumed; the trunk cache trains the model that images train."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.manifest import Split, load_split, write_split
from netvlad_core.errors import NetVLADError
from netvlad_core.io import load_state
from netvlad_core.mining import MiningConfig
from netvlad_core.training import CHECKPOINT_NAME, TrainConfig

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64


def _place_split(root: Path, name: str, num_db: int, num_q: int, seed: int) -> Path:
    """Database every 5 m on a line; each place has its own smooth pattern; a query is its nearest place's
    pattern plus noise, so nearby images look alike."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(num_db, 6, 8, 3)).astype(np.float32)
    db_xy = np.stack([np.arange(num_db) * 5.0, np.zeros(num_db)], 1) + [500000.0, 4000000.0]
    q_place = rng.choice(np.arange(2, num_db - 2), size=num_q, replace=False)
    q_xy = db_xy[q_place] + rng.normal(0, 1.5, (num_q, 2))
    images = root / "images" / name

    def save(rel: str, small: np.ndarray) -> None:
        p = images / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((W, H), Image.BILINEAR).save(p, quality=90)

    db = [f"db/{i:03d}.jpg" for i in range(num_db)]
    q = [f"q/{i:03d}.jpg" for i in range(num_q)]
    for i, rel in enumerate(db):
        save(rel, patterns[i] + rng.normal(0, 20, patterns[i].shape))
    for i, rel in enumerate(q):
        save(rel, patterns[q_place[i]] + rng.normal(0, 30, patterns[0].shape))
    split = Split(dataset="tiny", name=name, image_root=images, db_paths=db, db_utm=db_xy, q_paths=q, q_utm=q_xy)
    return write_split(split, root / "splits" / name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Train/val splits and a tiny k-means-initialised model (ResNet-18 to layer3, random weights, K = 4)."""
    from netvlad_core.clustering import KMeansConfig, kmeans
    from netvlad_core.datasets.images import load_image
    from netvlad_core.models import ModelConfig, build_model, save_model

    root = tmp_path_factory.mktemp("train")
    train_dir = _place_split(root, "train", num_db=24, num_q=8, seed=0)
    val_dir = _place_split(root, "val", num_db=12, num_q=4, seed=1)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", trainable_blocks=1, num_clusters=4,
                      input_height=H, input_width=W)
    model = build_model(cfg).eval()
    split = load_split(train_dir)
    with torch.no_grad():
        imgs = torch.stack([load_image(f, H, W, cfg.mean, cfg.std) for f in split.db_files()[:8]])
        local = model.local_descriptors(imgs).flatten(2).transpose(1, 2).reshape(-1, model.feature_dim).numpy()
    model.pool.init_params(kmeans(local, 4, KMeansConfig(iterations=5), progress=False), local)
    save_model(root / "init.pt", model, cfg)
    return {"root": root, "train": train_dir, "val": val_dir, "init": root / "init.pt"}


def _args(tiny: dict, run: str, **overrides) -> list[str]:
    opts = {"epochs": 2, "batch-size": 2, "num-negatives": 3, "num-negatives-sampled": 8, "cache-refresh-rate": 2,
            "margin": 3.0, "lr": 0.01, "lr-step": 1, "patience": 2, "encode-batch-size": 8, "workers": 0,
            "seed": 7, "device": "cpu", "trainable-blocks": 1, "trunk-cache": "off", **overrides}
    init = opts.pop("init", tiny["init"])
    run_dir = tiny["root"] / run
    args = ["--init-model", str(init), "--train-split", str(tiny["train"]), "--val-split", str(tiny["val"]),
            "--out", str(run_dir / "model.pt"), "--live-dir", str(run_dir / "live"),
            "--checkpoint-dir", str(run_dir / "ckpt"), "--no-progress"]
    for k, v in opts.items():
        args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return err


def _kill_after_checkpoint(proc: subprocess.Popen, checkpoint: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert proc.poll() is None, f"finished before its first checkpoint: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _weights(path: Path) -> dict:
    return load_state(path)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def _loss_rows(live: Path) -> list[tuple[str, str]]:
    with open(live / "plots" / "metrics" / "train" / "loss.tsv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f, delimiter="\t")]


def _kill_after_epoch_end(proc: subprocess.Popen, checkpoint: Path, epoch: int, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` once its checkpoint says epoch ``epoch`` is done (validated, epoch-end checkpoint written)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no epoch-end checkpoint appeared"
        if checkpoint.exists():
            try:
                if int(load_state(checkpoint)["epoch"]) >= epoch:
                    break
            except (NetVLADError, FileNotFoundError):  # replaced or removed while being read
                pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.fixture(scope="module")
def runs(tiny) -> dict:
    """An uninterrupted run and, side by side, the same run SIGKILLed right after its first checkpoint and rerun,
    its DVCLive folder deleted in between (as `dvc repro` does); and the same run SIGKILLed after the first epoch's
    validation and epoch-end checkpoint, then rerun (live folder deleted too)."""
    root = tiny["root"]
    reference = _start(_args(tiny, "reference"))
    killed = _start(_args(tiny, "killed"))
    checkpoint = root / "killed" / "ckpt" / CHECKPOINT_NAME
    _kill_after_checkpoint(killed, checkpoint)
    shutil.copy(checkpoint, root / "checkpoint_at_kill.pt")
    shutil.rmtree(root / "killed" / "live")
    resumed_stderr = _finish(_start(_args(tiny, "killed")))
    late = _start(_args(tiny, "late"))
    _kill_after_epoch_end(late, root / "late" / "ckpt" / CHECKPOINT_NAME, epoch=1)
    late_out_at_kill = (root / "late" / "model.pt").exists()
    late_state = load_state(root / "late" / "ckpt" / CHECKPOINT_NAME)
    shutil.rmtree(root / "late" / "live")
    late_stderr = _finish(_start(_args(tiny, "late")))
    _finish(reference)
    return {"reference": root / "reference", "resumed": root / "killed", "resumed_stderr": resumed_stderr,
            "checkpoint_at_kill": root / "checkpoint_at_kill.pt", "late": root / "late",
            "late_out_at_kill": late_out_at_kill, "late_state": late_state, "late_stderr": late_stderr}


def test_sigkill_then_rerun_gives_bitwise_the_same_model(tiny, runs):
    state = load_state(runs["checkpoint_at_kill"])
    assert state["position"] > 0 and state["epoch"] == 0, "killed inside the first epoch"
    assert "resuming from" in runs["resumed_stderr"]
    reference, resumed = runs["reference"], runs["resumed"]
    _assert_same_weights(resumed / "model.pt", reference / "model.pt")
    init = _weights(tiny["init"])
    trained = _weights(reference / "model.pt")
    assert any(not torch.equal(v, init[k]) for k, v in trained.items()), "nothing trained"
    frozen = [k for k in init if k.startswith("backbone.body.layer1.")]
    assert frozen and all(torch.equal(trained[k], init[k]) for k in frozen), "frozen blocks moved"
    rows = _loss_rows(reference / "live")
    assert len(rows) == 8 and _loss_rows(resumed / "live") == rows, "DVCLive history continues without repeats"
    assert not (resumed / "ckpt" / CHECKPOINT_NAME).exists(), "the checkpoint is removed after a successful finish"


def _live_files(live: Path) -> dict[str, str]:
    """Every DVCLive file (relative path → text); the .tsv columns, checked below, hold no timestamps."""
    files = {p.relative_to(live).as_posix(): p.read_text() for p in sorted(live.rglob("*")) if p.is_file()}
    for name, text in files.items():
        if name.endswith(".tsv"):
            assert "timestamp" not in text.splitlines()[0], name
    return files


def test_resumed_curves_equal_an_uninterrupted_runs_after_the_live_dir_was_deleted(runs):
    reference = _live_files(runs["reference"] / "live")
    tsvs = [n for n in reference if n.endswith(".tsv")]
    assert {"plots/metrics/train/loss.tsv", "plots/metrics/val/recall@5.tsv", "plots/metrics/epoch.tsv"} <= set(tsvs)
    assert "metrics.json" in reference
    for run in ("resumed", "late"):
        resumed = _live_files(runs[run] / "live")
        assert sorted(resumed) == sorted(reference), run
        for name in reference:
            assert resumed[name] == reference[name], f"{run}: {name} differs from the uninterrupted run's"


def test_out_is_written_only_when_training_ends(runs):
    state = runs["late_state"]
    assert int(state["epoch"]) >= 1 and int(state["best_epoch"]) == 1, "killed after the first (best) epoch"
    assert state["best_model"] is not None, "the best weights travel with the checkpoint"
    assert not runs["late_out_at_kill"], "an interrupted run must not leave a final-looking model"
    assert "resuming from" in runs["late_stderr"]
    _assert_same_weights(runs["late"] / "model.pt", runs["reference"] / "model.pt")


def test_checkpoint_from_other_params_is_not_resumed(tiny, runs, tmp_path):
    from netvlad_core.datasets.manifest import load_ground_truth
    from netvlad_core.models import load_model
    from netvlad_core.training import train

    cfg = TrainConfig(epochs=1, batch_size=2, mining=MiningConfig(num_negatives=3, num_negatives_sampled=8, margin=3.0),
                      cache_refresh_rate=2, lr=0.02, seed=7, max_queries_per_epoch=4, encode_batch_size=8, workers=0)
    splits = [load_split(tiny["train"]), load_ground_truth(tiny["train"]), load_split(tiny["val"]),
              load_ground_truth(tiny["val"])]

    def run(name: str, stale: bool) -> tuple[Path, list[str]]:
        d, messages = tmp_path / name, []
        if stale:
            (d / "ckpt").mkdir(parents=True)
            shutil.copy(runs["checkpoint_at_kill"], d / "ckpt" / CHECKPOINT_NAME)
        model, model_cfg = load_model(tiny["init"])
        train(model, model_cfg, *splits, out=d / "model.pt", live_dir=d / "live", checkpoint_dir=d / "ckpt", cfg=cfg,
              device=torch.device("cpu"), progress=False, log=messages.append)
        return d / "model.pt", messages

    stale_model, messages = run("stale", stale=True)
    fresh_model, fresh_messages = run("fresh", stale=False)
    notices = [m for m in messages if "ignoring checkpoint" in m]
    assert len(notices) == 1 and "other parameters" in notices[0] and "\n" not in notices[0]
    assert not any("resuming" in m for m in messages)
    assert not any("ignoring" in m for m in fresh_messages)
    _assert_same_weights(stale_model, fresh_model)


def test_config_validation():
    with pytest.raises(NetVLADError):
        TrainConfig(mining=MiningConfig(loss="cosine")).validate()
    with pytest.raises(NetVLADError):
        TrainConfig(cache_refresh_rate=0).validate()


def test_train_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """TrainState → to_checkpoint → file (weights-only) → from_checkpoint into other objects gives back every field,
    the weights, the optimiser's momentum, the schedule, the DVCLive files and the RNG streams (the next draws
    equal those drawn after the checkpoint was taken)."""
    import random

    from netvlad_core.io import save_state
    from netvlad_core.mining import MiningStats
    from netvlad_core.training import CHECKPOINT_FORMAT, TrainState
    from netvlad_core.training.state import seed_everything
    from netvlad_core.training.triplet import TripletState

    def objects(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    model, optimizer, scheduler = objects(0)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, rng=seed_everything(3), epoch=0,
                       position=0, order=np.array([3, 0, 4]), best_recall={}, best_epoch=0,
                       epochs_without_improvement=0, best_model=None, live_step=0, stopped=False,
                       recipe_state=TripletState(negative_cache=np.full((5, 2), -1, dtype=np.int64)))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state.rng.random(4)
    state.recipe_state.negative_cache[1] = [4, 0]
    state.epoch, state.position, state.best_recall, state.best_epoch = 2, 1, {1: 0.5, 5: 0.75, 10: 1.0}, 2
    state.epochs_without_improvement, state.live_step, state.stopped = 1, 7, True
    state.recipe_state.skipped_queries = 3
    state.best_model = {k: v + 1 for k, v in model.state_dict().items()}
    state.recipe_state.epoch_stats = MiningStats(queries=4, no_positive=1, no_violation=1, violating=5, candidates=6)
    live = tmp_path / "live"
    (live / "plots" / "metrics" / "train").mkdir(parents=True)
    (live / "metrics.json").write_text('{"step": 7}')
    (live / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n0\t1.5\n")
    save_state(tmp_path / "ckpt.pt", state.to_checkpoint("the-identity", live))
    after = (torch.rand(3), np.random.rand(3), random.random(), state.rng.random(3))

    model2, optimizer2, scheduler2 = objects(1)  # other weights, no momentum yet: the checkpoint must replace them
    checkpoint = load_state(tmp_path / "ckpt.pt")  # weights_only=True
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["identity"] == "the-identity"
    back = TrainState.from_checkpoint(checkpoint, model=model2, optimizer=optimizer2, scheduler=scheduler2,
                                      recipe_state=TripletState.from_checkpoint, live_dir=tmp_path / "live2")
    drawn = (torch.rand(3), np.random.rand(3), random.random(), back.rng.random(3))
    assert torch.equal(drawn[0], after[0]) and np.array_equal(drawn[1], after[1]) and drawn[2] == after[2]
    assert np.array_equal(drawn[3], after[3])
    assert back.model is model2 and all(torch.equal(v, model.state_dict()[k]) for k, v in model2.state_dict().items())
    assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert scheduler2.last_epoch == 1 and optimizer2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert np.array_equal(back.recipe_state.negative_cache, state.recipe_state.negative_cache)
    assert np.array_equal(back.order, state.order)
    assert (back.epoch, back.position, back.best_recall, back.best_epoch, back.epochs_without_improvement,
            back.live_step, back.stopped, back.recipe_state.skipped_queries, back.recipe_state.epoch_stats) == \
        (2, 1, {1: 0.5, 5: 0.75, 10: 1.0}, 2, 1, 7, True, 3, state.recipe_state.epoch_stats)
    assert back.best_model.keys() == state.best_model.keys()
    assert all(torch.equal(back.best_model[k], v) for k, v in state.best_model.items())
    assert {p.relative_to(tmp_path / "live2").as_posix(): p.read_text()
            for p in (tmp_path / "live2").rglob("*") if p.is_file()} == \
        {"metrics.json": '{"step": 7}', "plots/metrics/train/loss.tsv": "step\tloss\n0\t1.5\n"}


# ------------------------------------------------------------------------------------------------- trunk cache

def _cut_models():
    from netvlad_core.models import ModelConfig, build_model

    for backbone, blocks in (("resnet18_layer3", 1), ("resnet18_layer3", 0), ("vgg16", 3), ("efficientnet_lite0", 1)):
        cfg = ModelConfig(backbone=backbone, weights="none", trainable_blocks=blocks, num_clusters=4,
                          input_height=H, input_width=W)
        yield f"{backbone}:{blocks}", build_model(cfg).eval()


def descriptors_and_grads(fn, x, trainable, counts):
    """``fn(x)`` and the gradients of ``trainable`` under the squared triplet loss of ``counts`` tuples."""
    from netvlad_core.mining import batch_loss

    for p in trainable:
        p.grad = None
    desc = fn(x)
    batch_loss(desc, counts, margin=10.0, loss="squared")[0].backward()
    return desc.detach(), [p.grad.clone() for p in trainable]


@pytest.mark.parametrize("name", [n for n, _ in _cut_models()])
@pytest.mark.parametrize("whiten", [False, True])
def test_trainable_part_on_cached_activations_equals_the_full_models_forward_and_gradients(name, whiten):
    """Descriptors and the loss's gradients of every trainable parameter, computed by the whole model on images and
    by the trainable part on the trunk's activations stored as float32 (and float16: close, not equal)."""
    model = dict(_cut_models())[name]
    if whiten:
        g = torch.Generator().manual_seed(1)
        model.set_whitening(torch.randn(6, model.pool.out_dim, generator=g), torch.randn(6, generator=g))
    images = torch.randn(7, 3, H, W, generator=torch.Generator().manual_seed(0))
    counts = [2, 3]  # [q, p, n, n] + [q, p, n, n, n]
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(fn, x):
        return descriptors_and_grads(fn, x, trainable, counts)

    want_desc, want_grads = grads(model, images)
    trunk, part = model.split_trunk()
    assert not any(p.requires_grad for p in trunk.parameters()), "the trunk is frozen"
    assert {id(p) for p in part.parameters() if p.requires_grad} == {id(p) for p in trainable}
    with torch.no_grad():
        activations = trunk(images).numpy()
    got_desc, got_grads = grads(part, torch.from_numpy(activations.astype(np.float32)))
    torch.testing.assert_close(got_desc, want_desc, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    half_desc, _ = grads(part, torch.from_numpy(activations.astype(np.float16).astype(np.float32)))
    assert float((half_desc - want_desc).abs().max()) < 2e-2


def test_frozen_trunk_is_deterministic_in_train_mode():
    """Frozen BatchNorm layers stay in eval mode when the model is put in training mode, so the trunk's output (what
    the cache stores) does not depend on the mode or on the batch it is computed in."""
    model = dict(_cut_models())["resnet18_layer3:1"]
    trunk, _ = model.split_trunk()
    bns = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    images = torch.randn(4, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trunk(images)
        model.train()
        assert bns and not any(m.training for m in bns)
        got = torch.cat([trunk(images[:1]), trunk(images[1:])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_frozen_trunk_and_trunk_cache_on_is_one_line_error(tiny, tmp_path):
    proc = _start(_args(tiny, "all_trainable", **{"trainable-blocks": -1, "trunk-cache": "on"}))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "trunk-cache on" in err, err


def _trunk_sidecar(run_dir: Path) -> dict | None:
    import json

    try:
        return json.loads((run_dir / "ckpt" / "trunk_cache.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def cached_runs(tiny, runs) -> dict:
    """With the trunk cache: the small model's run in float32 (against the image run of ``runs``); and the same
    model at 240×320 (a build slow enough to be killed in the middle) uninterrupted, SIGKILLed during the cache
    build and rerun, and SIGKILLed after its first checkpoint and rerun (keeping its cache)."""
    from netvlad_core.models import load_model, save_model

    root = tiny["root"]
    _finish(_start(_args(tiny, "cached_f32", **{"trunk-cache": "on", "trunk-cache-dtype": "float32"})))
    model, cfg = load_model(tiny["init"])
    big = root / "init_big.pt"
    save_model(big, model, dataclasses.replace(cfg, input_height=240, input_width=320))
    opts = {"init": big, "trunk-cache": "on", "encode-batch-size": 4}
    reference = _start(_args(tiny, "big_ref", **opts))
    killed = _start(_args(tiny, "big_build_killed", **opts))
    deadline = time.monotonic() + 120
    while not ((side := _trunk_sidecar(root / "big_build_killed")) and side["done"] > 0):
        assert killed.poll() is None and time.monotonic() < deadline, "no trunk-cache progress appeared"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    side_at_kill = _trunk_sidecar(root / "big_build_killed")
    ckpt_at_kill = (root / "big_build_killed" / "ckpt" / CHECKPOINT_NAME).exists()
    build_resumed = _finish(_start(_args(tiny, "big_build_killed", **opts)))
    late = _start(_args(tiny, "big_train_killed", **opts, **{"keep-trunk-cache": True}))
    _kill_after_checkpoint(late, root / "big_train_killed" / "ckpt" / CHECKPOINT_NAME)
    late_state = load_state(root / "big_train_killed" / "ckpt" / CHECKPOINT_NAME)
    train_resumed = _finish(_start(_args(tiny, "big_train_killed", **opts, **{"keep-trunk-cache": True})))
    _finish(reference)
    return {"f32": root / "cached_f32", "ref": root / "big_ref", "build_killed": root / "big_build_killed",
            "side_at_kill": side_at_kill, "ckpt_at_kill": ckpt_at_kill, "build_resumed": build_resumed,
            "train_killed": root / "big_train_killed", "late_state": late_state, "train_resumed": train_resumed}


def test_trunk_cache_in_float32_trains_the_model_images_train(runs, cached_runs):
    """Same triplets (violating fractions, skipped queries) and the same final model up to float rounding."""
    for name in ("violating_fraction", "loss"):
        with open(runs["reference"] / "live" / "plots" / "metrics" / "train" / f"{name}.tsv") as f:
            want = [float(r[name]) for r in csv.DictReader(f, delimiter="\t")]
        with open(cached_runs["f32"] / "live" / "plots" / "metrics" / "train" / f"{name}.tsv") as f:
            got = [float(r[name]) for r in csv.DictReader(f, delimiter="\t")]
        assert len(got) == len(want) == 8
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    want, got = _weights(runs["reference"] / "model.pt"), _weights(cached_runs["f32"] / "model.pt")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert not (cached_runs["f32"] / "ckpt" / "trunk_cache.npy").exists(), "the cache goes with the checkpoint"


def test_sigkill_during_the_trunk_cache_build_resumes_it_to_the_same_model(cached_runs):
    side = cached_runs["side_at_kill"]
    assert 0 < side["done"] < side["rows"], "killed in the middle of the build"
    assert not cached_runs["ckpt_at_kill"], "no training had started"
    assert f"at image {side['done']} of {side['rows']}" in cached_runs["build_resumed"], "the build resumed"
    _assert_same_weights(cached_runs["build_killed"] / "model.pt", cached_runs["ref"] / "model.pt")
    assert not (cached_runs["build_killed"] / "ckpt" / "trunk_cache.npy").exists()


def test_sigkill_during_cached_training_resumes_to_the_same_model(cached_runs):
    state = cached_runs["late_state"]
    assert state["position"] > 0 and state["epoch"] == 0, "killed inside the first epoch"
    assert "resuming from" in cached_runs["train_resumed"]
    assert "resuming the trunk cache" not in cached_runs["train_resumed"], "the finished cache is reused as it is"
    _assert_same_weights(cached_runs["train_killed"] / "model.pt", cached_runs["ref"] / "model.pt")
    assert (cached_runs["train_killed"] / "ckpt" / "trunk_cache.npy").exists(), "kept on request"
    assert _loss_rows(cached_runs["train_killed"] / "live") == _loss_rows(cached_runs["ref"] / "live")
