"""A DINOv2 ViT-S/14 with NetVLAD-Linear end to end: `dvc exp run -S model.trunk.backbone=dinov2_vits14 …` in a real
DVC repository (trunk cache on, an input size that is not a multiple of the patch), then export and localize; and
`train` on it SIGKILLed mid-run resuming to bitwise the same model, the trunk cache (float32) training the model
images train."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from netvlad_core.io import load_state
from netvlad_core.models import load_model
from netvlad_core.training import CHECKPOINT_NAME
from tests.test_pipeline import _run, make_tiny_pipeline
from tests.test_training import (
    _args,
    _assert_same_weights,
    _finish,
    _kill_after_checkpoint,
    _loss_rows,
    _place_split,
    _start,
    _weights,
)

pytestmark = pytest.mark.slow

EXPERIMENT = {  # a 90×120 input, resized to 84×126: 6×9 patches of 14 px
    "model.trunk.backbone": "dinov2_vits14", "model.trunk.weights": "none", "model.head.pooling": "netvlad-linear",
    "model.trunk.input-height": 90, "model.trunk.input-width": 120,
    "model.head.projection-dim": 16, "model.head.cls-dim": 32, "train.trunk-cache": "on",
    "train.trunk-cache-dtype": "float32", "train.lr": 0.001,
}


@pytest.fixture(scope="module")
def vit_repo(tmp_path_factory) -> dict:
    repo = make_tiny_pipeline(tmp_path_factory.mktemp("vit_pipeline"), repro=False)
    dvc = str(Path(sys.executable).parent / "dvc")
    sets = [arg for key, value in EXPERIMENT.items() for arg in ("-S", f"{key}={value}")]
    proc = _run([dvc, "exp", "run", "--name", "dinov2-nvl", *sets], repo)
    return {"repo": repo, "out": proc.stdout + proc.stderr, "dvc": dvc}


def test_exp_run_trains_and_evaluates_a_dinov2_netvlad_linear_model(vit_repo):
    repo, out = vit_repo["repo"], vit_repo["out"]
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"download", "sample", "kmeans", "train", "pca", "evaluate@trained_pca"} <= ran, out
    # the trunk cache held the frozen blocks' tokens: 6×9 patches + CLS = 55 tokens × 384 per image
    assert "trunk cache on:" in out and "55 tokens × 384 float32" in out, out
    model, cfg = load_model(repo / "artifacts/model_trained.pt")
    assert (cfg.backbone, cfg.pooling, cfg.trainable_blocks) == ("dinov2_vits14", "netvlad-linear", 4)
    assert model.out_dim == 32 + 8 * 16
    offtheshelf, _ = load_model(repo / "artifacts/model_offtheshelf.pt")
    trained = model.state_dict()
    moved = {k for k, v in offtheshelf.state_dict().items() if not torch.equal(v, trained[k])}
    assert "pool.projection.weight" in moved and "backbone.body.blocks.11.attn.qkv.weight" in moved
    assert not any(k.startswith(("backbone.body.blocks.7.", "backbone.body.patch_embed.")) for k in moved), moved
    with h5py.File(repo / "artifacts/descriptors.h5") as f:  # k-means sampled DINOv2 patch tokens
        assert f["descriptors"].shape[1] == 384
        np.testing.assert_allclose(np.linalg.norm(f["descriptors"][:50], axis=1), 1.0, rtol=1e-5)
    for name in ("offtheshelf", "trained", "trained_pca"):
        metrics = json.loads((repo / f"metrics/test_{name}.json").read_text())
        assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 1.0
    with h5py.File(repo / "artifacts/features/test_trained_pca.h5") as f:
        assert f["db"].shape[1] == 32  # TINY's pca.dim after the 160-D NetVLAD-Linear descriptor


def test_the_trained_transformer_exports_and_localizes(vit_repo):
    repo = vit_repo["repo"]
    netvlad = str(Path(sys.executable).parent / "netvlad")
    out = _run([netvlad, "export", "--model", "artifacts/model_trained_pca.pt", "--out", "model.onnx"], repo).stdout
    assert "120x90 images -> 32-D descriptors" in out and (repo / "model.onnx").stat().st_size > 10**6
    photo = sorted((repo / "data/dataset").rglob("*.jpg"))[0]
    proc = _run([netvlad, "localize", str(photo), "--model", "artifacts/model_trained_pca.pt", "--database",
                 "artifacts/features/test_trained_pca.h5", "--manifest", "data/dataset/test", "--json",
                 "--device", "cpu"], repo)
    answer = json.loads(proc.stdout)
    assert len(answer) == 1 and len(answer[0]["matches"]) > 0


# ------------------------------------------------------------------------------------------------ SIGKILL resume


@pytest.fixture(scope="module")
def vit_runs(tmp_path_factory) -> dict:
    """A ViT-S/14 NetVLAD-Linear model (random weights, k-means initialised, 48×64 → 42×70: 3×5 patches) trained with
    the trunk cache (float32) uninterrupted, the same run SIGKILLed after its first checkpoint and rerun, and the
    same training on images (trunk cache off)."""
    from netvlad_core.clustering import KMeansConfig, kmeans
    from netvlad_core.datasets.images import load_image
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.models import ModelConfig, build_model, save_model

    root = tmp_path_factory.mktemp("vit_train")
    train_dir = _place_split(root, "train", num_db=24, num_q=8, seed=0)
    val_dir = _place_split(root, "val", num_db=12, num_q=4, seed=1)
    cfg = ModelConfig(backbone="dinov2_vits14", weights="none", pooling="netvlad-linear", num_clusters=4,
                      projection_dim=8, cls_dim=8, input_height=48, input_width=64)
    model = build_model(cfg).eval()
    with torch.no_grad():
        imgs = torch.stack([load_image(f, 48, 64, cfg.mean, cfg.std) for f in load_split(train_dir).db_files()[:8]])
        local = model.local_descriptors(imgs).flatten(2).transpose(1, 2).reshape(-1, 384).numpy()
    model.pool.init_params(kmeans(local, 4, KMeansConfig(iterations=5), progress=False), local)
    save_model(root / "init.pt", model, cfg)
    tiny = {"root": root, "train": train_dir, "val": val_dir, "init": root / "init.pt"}
    opts = {"trainable-blocks": 4, "trunk-cache": "on", "trunk-cache-dtype": "float32", "lr": 0.001}
    reference = _start(_args(tiny, "reference", **opts))
    killed = _start(_args(tiny, "killed", **opts))
    checkpoint = root / "killed" / "ckpt" / CHECKPOINT_NAME
    _kill_after_checkpoint(killed, checkpoint)
    state_at_kill = load_state(checkpoint)
    shutil.rmtree(root / "killed" / "live")
    resumed_stderr = _finish(_start(_args(tiny, "killed", **opts)))
    reference_stderr = _finish(reference)
    _finish(_start(_args(tiny, "images", **{**opts, "trunk-cache": "off"})))
    # FT2: only the projections, on the trained model (its whole backbone is the cached trunk)
    ft2_stderr = _finish(_start(_args(tiny, "ft2", init=root / "reference" / "model.pt", epochs=1,
                                      **{**opts, "trainable-blocks": 0, "only-projections": True})))
    return {**tiny, "state_at_kill": state_at_kill, "resumed_stderr": resumed_stderr,
            "reference_stderr": reference_stderr, "ft2_stderr": ft2_stderr}


def test_sigkill_in_training_resumes_to_bitwise_the_same_model(vit_runs):
    root = vit_runs["root"]
    assert vit_runs["state_at_kill"]["position"] > 0 and vit_runs["state_at_kill"]["epoch"] == 0
    assert "resuming from" in vit_runs["resumed_stderr"]
    assert "16 tokens × 384 float32" in vit_runs["reference_stderr"]
    _assert_same_weights(root / "killed" / "model.pt", root / "reference" / "model.pt")
    assert _loss_rows(root / "killed" / "live") == _loss_rows(root / "reference" / "live")
    init, trained = _weights(vit_runs["init"]), _weights(root / "reference" / "model.pt")
    moved = {k for k in init if not torch.equal(init[k], trained[k])}
    assert "backbone.body.blocks.8.mlp.fc1.weight" in moved and "pool.cls_projection.weight" in moved
    assert not any(k.startswith("backbone.body.blocks.7.") for k in moved), "frozen blocks moved"


def test_the_float32_trunk_cache_trains_the_model_that_images_train(vit_runs):
    root = vit_runs["root"]
    want, got = _weights(root / "images" / "model.pt"), _weights(root / "reference" / "model.pt")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([float(v) for _, v in _loss_rows(root / "reference" / "live")],
                               [float(v) for _, v in _loss_rows(root / "images" / "live")], rtol=1e-4, atol=1e-6)


def test_ft2_through_train_moves_only_the_projections(vit_runs):
    root = vit_runs["root"]
    assert "16 tokens × 384 float32" in vit_runs["ft2_stderr"]  # the trunk: every block (norm and head train)
    start, ft2 = _weights(root / "reference" / "model.pt"), _weights(root / "ft2" / "model.pt")
    moved = {k for k in start if not torch.equal(start[k], ft2[k])}
    assert moved and moved <= {"pool.projection.weight", "pool.projection.bias", "pool.cls_projection.weight",
                               "pool.cls_projection.bias"}, moved
