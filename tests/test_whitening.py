"""PCA whitening: whitened training descriptors have identity covariance, the layer equals the matrix formula
(computed independently with numpy), dual == primal, too-small samples keep the largest valid dimension, and the
`pca` stage writes a final model that `load_model` + `extract_split_features` use."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from netvlad_core.datasets.images import load_image
from netvlad_core.datasets.manifest import load_split
from netvlad_core.errors import NetVLADError
from netvlad_core.features import FeatureConfig, extract_split_features, read_features
from netvlad_core.models import ModelConfig, build_model, load_model, save_model
from netvlad_core.models.whitening import PCAConfig, fit_model_whitening, fit_pca_whitening, valid_whitening_dim
from stages.cli import app
from tests.conftest import make_split

EPS = 1e-9
SMALL = dict(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)


def _descriptors(n: int, dim: int, seed: int) -> np.ndarray:
    """Correlated, anisotropic float32 rows (a random linear map of normal noise, plus an offset)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(3.0, 0.05, dim)[:, None]
    return (rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)).astype(np.float32)


def _numpy_whitening(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent reference: eigh of the float64 covariance (n − 1 normalisation) → (W, μ, U top-d columns)."""
    x = x.astype(np.float64)
    mu = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(values)[::-1][:d]
    u = vectors[:, order]
    return np.diag(1.0 / np.sqrt(values[order] + EPS)) @ u.T, mu, u


@pytest.mark.parametrize("n, dim, d, method", [(400, 48, 32, "primal"), (40, 300, 30, "dual")])
def test_whitened_training_descriptors_have_identity_covariance(n, dim, d, method):
    x = _descriptors(n, dim, seed=1)
    pca = fit_pca_whitening(x, d, chunk_size=7)  # chunks smaller than both sides exercise the accumulation
    assert pca.method == method and pca.dim == d and pca.num_samples == n
    y = pca.transform(x, normalize=False)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(d), atol=1e-3)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-6)
    assert np.all(np.diff(pca.eigenvalues) <= 0), "eigenvalues must be sorted, largest first"


@pytest.mark.parametrize("n, dim", [(300, 40), (30, 200)])
def test_dual_equals_primal_up_to_sign(n, dim):
    x = _descriptors(n, dim, seed=2)
    d = min(n - 1, dim) - 5
    primal = fit_pca_whitening(x, d, method="primal")
    dual = fit_pca_whitening(x, d, method="dual")
    np.testing.assert_allclose(dual.eigenvalues, primal.eigenvalues, rtol=1e-9, atol=1e-12)
    signs = np.sign(np.sum(dual.components * primal.components, axis=1))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(dual.components * signs[:, None], primal.components, atol=1e-8)
    np.testing.assert_allclose(dual.mean, primal.mean, atol=1e-12)


def test_fit_matches_numpy_eigh_of_the_covariance():
    x = _descriptors(200, 24, seed=3)
    w_ref, mu_ref, _ = _numpy_whitening(x, 10)
    pca = fit_pca_whitening(x, 10)
    signs = np.sign(np.sum(pca.weight() * w_ref, axis=1))
    np.testing.assert_allclose(pca.weight() * signs[:, None], w_ref, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(pca.bias() * signs, -w_ref @ mu_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n, dim, requested, kept", [(10, 50, 20, 9), (100, 20, 30, 20), (3, 5, 2, 2)])
def test_too_small_sample_warns_and_keeps_the_largest_valid_dim(n, dim, requested, kept):
    x = _descriptors(n, dim, seed=4)
    if kept < requested:
        with pytest.warns(UserWarning, match=f"keeping {kept} components"):
            pca = fit_pca_whitening(x, requested)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pca = fit_pca_whitening(x, requested)
    assert pca.dim == kept and pca.weight().shape == (kept, dim)
    y = pca.transform(x, normalize=False)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(kept), atol=1e-3)


def test_invalid_inputs_raise_user_errors():
    with pytest.raises(NetVLADError, match="at least 2"):
        valid_whitening_dim(1, 10, 4)
    with pytest.raises(NetVLADError, match="NaN"):
        fit_pca_whitening(np.full((5, 3), np.nan, dtype=np.float32), 2)
    with pytest.raises(NetVLADError, match="dim"):
        PCAConfig(dim=0).validate()


def _images(files, cfg: ModelConfig) -> torch.Tensor:
    return torch.stack([load_image(f, cfg.input_height, cfg.input_width, cfg.mean, cfg.std) for f in files])


def test_layer_equals_the_matrix_formula(tmp_path):
    torch.manual_seed(0)
    split = load_split(make_split(tmp_path, num_db=16, num_q=3))
    cfg = ModelConfig(**{**SMALL, "num_clusters": 2})
    model = build_model(cfg).eval()
    images = _images(split.db_files() + split.query_files(), cfg)
    with torch.no_grad():
        pooled = model.pool(model.backbone(images)).double().numpy()  # un-whitened, (19, 512): the dual case
    fit_model_whitening(model, cfg, split, device=torch.device("cpu"), cfg=PCAConfig(dim=10, max_images=16),
                        feature_cfg=FeatureConfig(batch_size=5, num_workers=0), progress=False)
    assert model.out_dim == 10

    w_ref, mu_ref, _ = _numpy_whitening(pooled[:16], 10)
    layer_weight = model.whitening.weight.detach().double().numpy()
    signs = np.sign(np.sum(layer_weight * w_ref, axis=1))
    expected = (pooled - mu_ref) @ w_ref.T * signs
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    with torch.no_grad():
        got = model(images).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # before the L2-normalisation the whitened training descriptors are white
    with torch.no_grad():
        raw = model.whitening(torch.from_numpy(pooled[:16]).float()).double().numpy()
    np.testing.assert_allclose(np.cov(raw, rowvar=False), np.eye(10), atol=1e-3)


def test_pca_stage_writes_a_final_model_that_features_can_use(tmp_path):
    torch.manual_seed(0)
    split_dir = make_split(tmp_path, num_db=12, num_q=4)
    cfg = ModelConfig(**SMALL)
    save_model(tmp_path / "trained.pt", build_model(cfg), cfg)
    args = ["pca", "--model", str(tmp_path / "trained.pt"), "--split-dir", str(split_dir),
            "--out", str(tmp_path / "final.pt"), "--max-images", "8", "--workers", "0", "--device", "cpu",
            "--no-progress"]
    result = CliRunner().invoke(app, args)  # default dim 4096 > 8 images − 1
    assert result.exit_code == 0, result.output
    # the library's warning reaches the user as one line, without a source path
    assert "warning: PCA whitening: dim 4096 is too large (8 descriptors span at most 7 dimensions once centred); " \
           "keeping 7 components instead\n" in result.stderr
    assert "whitening.py" not in result.stderr
    assert "4096" not in result.stdout and "-> 7-D" in result.stdout

    model, final_cfg = load_model(tmp_path / "final.pt")
    assert final_cfg.whiten_dim == 7 and model.out_dim == 7
    out = extract_split_features(model, final_cfg, load_split(split_dir), tmp_path / "f.h5",
                                 device=torch.device("cpu"), cfg=FeatureConfig(batch_size=4, num_workers=0),
                                 progress=False)
    db, q, attrs = read_features(out)
    assert db.shape == (12, 7) and q.shape == (4, 7) and int(attrs["dim"]) == 7
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)

    # a bad input leaves no output behind
    bad = CliRunner().invoke(app, ["pca", "--model", str(tmp_path / "trained.pt"), "--split-dir", str(split_dir),
                                   "--out", str(tmp_path / "other.pt"), "--dim", "0", "--device", "cpu"])
    assert bad.exit_code == 2 and "dim must be" in bad.output
    assert not (tmp_path / "other.pt").exists()
