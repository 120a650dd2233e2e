"""Descriptor sampling and k-means."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from netvlad_core.clustering import KMeansConfig, SampleConfig, kmeans, read_descriptors, sample_descriptors
from netvlad_core.datasets.manifest import load_split
from netvlad_core.errors import NetVLADError
from tests.conftest import TINY_MODEL_CONFIG, TinyModel


def test_sample_descriptors_counts_normalisation_and_seed(tiny_split, tmp_path):
    torch.manual_seed(0)
    model = TinyModel()
    split = load_split(tiny_split)
    cfg = SampleConfig(num_descriptors=50, per_image=10, seed=3, batch_size=4, num_workers=0)
    a = sample_descriptors(model, TINY_MODEL_CONFIG, split, tmp_path / "a.h5", device=torch.device("cpu"), cfg=cfg,
                           progress=False)
    b = sample_descriptors(model, TINY_MODEL_CONFIG, split, tmp_path / "b.h5", device=torch.device("cpu"), cfg=cfg,
                           progress=False)
    desc, model_cfg = read_descriptors(a)
    assert desc.shape == (50, 8) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["descriptors"][()], fb["descriptors"][()])
        counts = np.bincount(fa["image_indices"][()])
    assert counts.max() == 10 and (counts > 0).sum() == 5  # 5 distinct images, 10 each
    # every sampled descriptor is one of its image's feature-map locations
    from netvlad_core.datasets.images import load_image

    with h5py.File(a) as fa:
        idx = fa["image_indices"][()]
    c = TINY_MODEL_CONFIG
    for i in np.unique(idx):
        img = load_image(split.db_files()[i], c.input_height, c.input_width, c.mean, c.std)[None]
        with torch.no_grad():
            local = model.local_descriptors(img)[0].flatten(1).T.numpy()
        d = np.abs(desc[idx == i][:, None, :] - local[None]).max(-1)
        assert (d.min(1) < 1e-5).all()


def test_per_image_capped_by_feature_map(tiny_split, tmp_path):
    split = load_split(tiny_split)
    cfg = SampleConfig(num_descriptors=60, per_image=1000, seed=0, batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="locations"):
        out = sample_descriptors(TinyModel(), TINY_MODEL_CONFIG, split, tmp_path / "a.h5", device=torch.device("cpu"),
                                 cfg=cfg, progress=False)
    desc, _ = read_descriptors(out)
    assert len(desc) == 60  # 12×16 = 192 locations at 64×48 / stride 4 → one image suffices


def test_kmeans_uses_every_sample():
    # Lloyd's fixed point over ALL samples: each centroid is the mean of the samples assigned to it
    # (up to float32 ties at cluster borders).
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (5, 4))
    x = (centres[rng.integers(0, 5, 20_000)] + rng.normal(0, 1, (20_000, 4))).astype(np.float32)
    c = kmeans(x, 5, KMeansConfig(iterations=50, seed=1), progress=False)
    assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    for k in range(5):
        # a 256-per-centroid subsample would be off by ~0.2
        np.testing.assert_allclose(c[k], x[assign == k].mean(0), atol=2e-2)


@pytest.mark.parametrize("k", [1, 101])
def test_kmeans_rejects_bad_cluster_counts(k):
    with pytest.raises(NetVLADError, match="num-clusters"):
        kmeans(np.zeros((100, 4), np.float32), k, KMeansConfig(), progress=False)
