"""The NetVLAD layer against its plain definition, its initialisation against brute force, and the pooling ablations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netvlad_core.errors import NetVLADError
from netvlad_core.models import NetVLAD, build_pooling
from netvlad_core.models.netvlad import nearest_two_squared_distances, vladv1_alpha, vladv2_alpha
from netvlad_core.models.pooling import AvgPool, GeM, MaxPool


def plain_netvlad(x, weight, bias, centroids, normalize_input=True):
    """NetVLAD written from the paper, one image and one cluster at a time (float64 in, float64 out)."""
    n, d = x.shape[:2]
    k = centroids.shape[0]
    outputs = []
    for i in range(n):
        feats = x[i].reshape(d, -1).T  # (HW, D), one local descriptor per row
        if normalize_input:
            feats = feats / feats.norm(dim=1, keepdim=True)
        logits = feats @ weight.T
        if bias is not None:
            logits = logits + bias
        assign = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        assign = assign / assign.sum(dim=1, keepdim=True)  # softmax over clusters
        rows = []
        for j in range(k):
            residual_sum = (assign[:, j:j + 1] * (feats - centroids[j])).sum(0)
            rows.append(residual_sum / residual_sum.norm())  # intra-normalisation
        vec = torch.cat(rows)  # cluster-major
        outputs.append(vec / vec.norm())
    return torch.stack(outputs)


def initialised_layer(k, d, vladv2, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    desc = rng.normal(size=(40 * k, d))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    layer = NetVLAD(num_clusters=k, dim=d, vladv2=vladv2)
    layer.init_params(desc[rng.choice(len(desc), k, replace=False)] + 0.05 * rng.normal(size=(k, d)), desc)
    return layer.to(dtype)


@pytest.mark.parametrize("vladv2", [False, True])
def test_layer_equals_plain_definition_outputs_and_gradients(vladv2):
    k, d = 5, 8
    layer = initialised_layer(k, d, vladv2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, d, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, k * d, generator=gen, dtype=torch.float64)

    out = layer(x)
    (out * upstream).sum().backward()
    ours = {"x": x.grad.clone(), "weight": layer.conv.weight.grad.clone(), "centroids": layer.centroids.grad.clone()}
    if vladv2:
        ours["bias"] = layer.conv.bias.grad.clone()

    x_ref = x.detach().clone().requires_grad_(True)
    weight = layer.conv.weight.detach()[:, :, 0, 0].clone().requires_grad_(True)
    bias = layer.conv.bias.detach().clone().requires_grad_(True) if vladv2 else None
    centroids = layer.centroids.detach().clone().requires_grad_(True)
    ref = plain_netvlad(x_ref, weight, bias, centroids)
    (ref * upstream).sum().backward()
    theirs = {"x": x_ref.grad, "weight": weight.grad[:, :, None, None], "centroids": centroids.grad}
    if vladv2:
        theirs["bias"] = bias.grad

    assert out.shape == (2, k * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for name in ours:
        assert ours[name].abs().max() > 0, name
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0, msg=f"gradient w.r.t. {name}")

    # float32 (the precision the pipeline runs in) stays within the same output tolerance
    out32 = layer.float()(x.detach().float())
    torch.testing.assert_close(out32.double(), ref.detach(), atol=1e-5, rtol=0)


def test_flatten_order_is_cluster_major():
    # One location, uniform assignment (zero conv weight), no input normalisation: V_k = (x - c_k) / 2.
    layer = NetVLAD(num_clusters=2, dim=3, normalize_input=False)
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.centroids.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 4.0]]))
    x = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    # cluster 0: (1,2,3)/√14; cluster 1: (0,0,-1); both rows unit length, so the whole vector is divided by √2
    s14, s2 = math.sqrt(14), math.sqrt(2)
    expected = torch.tensor([[1 / s14, 2 / s14, 3 / s14, 0.0, 0.0, -1.0]]) / s2
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_no_residual_tensor_is_kept_for_backward():
    n, k, d, h, w = 2, 16, 32, 5, 6
    layer = initialised_layer(k, d, False, dtype=torch.float32)
    x = torch.randn(n, d, h, w, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    # the largest saved tensors are the (normalised) input N·D·HW and the assignment N·K·HW, never N·K·D·HW
    assert max(sizes) <= n * max(d, k) * h * w
    assert max(sizes) < n * k * d * h * w / 8


def test_vladv1_init_by_hand():
    centroids = np.array([[1.0, 0.0], [0.0, 2.0]])
    descriptors = np.array([[1.0, 0.0], [0.6, 0.8]])
    # dots with the normalised centroids: (1, 0) → gap 1; (0.6, 0.8) → gap 0.2; mean gap 0.6
    alpha = math.log(100) / 0.6
    layer = NetVLAD(num_clusters=2, dim=2)
    layer.init_params(centroids, descriptors)
    assert isinstance(layer.alpha, float)
    assert layer.alpha == pytest.approx(alpha, rel=1e-12)
    assert layer.conv.bias is None
    torch.testing.assert_close(layer.conv.weight[:, :, 0, 0], torch.tensor([[alpha, 0.0], [0.0, alpha]]))
    torch.testing.assert_close(layer.centroids.data, torch.tensor(centroids, dtype=torch.float32))


def test_vladv1_alpha_matches_brute_force():
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(7, 5))
    descriptors = rng.normal(size=(123, 5))
    c_hat = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    dots = np.sort(descriptors @ c_hat.T, axis=1)[:, ::-1]
    expected = -np.log(0.01) / np.mean(dots[:, 0] - dots[:, 1])
    assert vladv1_alpha(centroids, descriptors, chunk_size=10) == pytest.approx(expected, rel=1e-10)
    layer = NetVLAD(7, 5)
    layer.init_params(centroids, descriptors)
    assert layer.alpha == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(layer.conv.weight[:, :, 0, 0], torch.tensor(expected * c_hat, dtype=torch.float32))


def test_vladv2_alpha_uses_squared_distances_not_indices():
    rng = np.random.default_rng(4)
    centroids = rng.normal(size=(6, 4))
    descriptors = rng.normal(size=(57, 4))
    d2 = ((centroids[:, None, :] - descriptors[None, :, :]) ** 2).sum(-1)  # brute force, (K, M)
    nearest = np.sort(d2, axis=1)[:, :2]
    expected = -np.log(0.01) / np.mean(nearest[:, 1] - nearest[:, 0])
    np.testing.assert_allclose(nearest_two_squared_distances(centroids, descriptors, chunk_size=5).numpy(), nearest,
                               rtol=1e-10, atol=1e-12)
    assert vladv2_alpha(centroids, descriptors, chunk_size=5) == pytest.approx(expected, rel=1e-10)

    # what the widely copied port computes: the squared neighbour INDICES
    indices = np.argsort(d2, axis=1)[:, :2].astype(float)
    buggy = -np.log(0.01) / np.mean(indices[:, 1] ** 2 - indices[:, 0] ** 2)
    assert abs(buggy - expected) > 0.1 * abs(expected)

    layer = NetVLAD(6, 4, vladv2=True)
    layer.init_params(centroids, descriptors)
    assert layer.alpha == pytest.approx(expected, rel=1e-10)
    c = torch.tensor(centroids)
    torch.testing.assert_close(layer.conv.weight[:, :, 0, 0].double(), 2 * expected * c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.conv.bias.double(), -expected * (c * c).sum(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.centroids.data.double(), c, rtol=1e-6, atol=1e-7)


def test_vladv2_by_hand():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0]])
    descriptors = np.array([[1.0, 0.0], [0.0, 2.0], [10.0, 3.0], [7.0, 0.0]])
    # centroid 0: d² 1 and 4 → gap 3; centroid 1: d² 9 (both (10,3) and (7,0)) → gap 0; mean gap 1.5
    assert vladv2_alpha(centroids, descriptors) == pytest.approx(math.log(100) / 1.5, rel=1e-12)


def test_init_params_rejects_bad_inputs():
    layer = NetVLAD(num_clusters=4, dim=3)
    good = np.eye(4, 3)
    with pytest.raises(NetVLADError, match="dimension 5"):
        layer.init_params(np.ones((4, 5)), np.ones((10, 5)))
    with pytest.raises(NetVLADError, match="got 3 centroids"):
        layer.init_params(np.eye(3), np.ones((10, 3)))
    with pytest.raises(NetVLADError, match="descriptors have dimension 2"):
        layer.init_params(good, np.ones((10, 2)))
    with pytest.raises(NetVLADError, match="NaN"):
        layer.init_params(good, np.full((10, 3), np.nan))
    with pytest.raises(NetVLADError, match="duplicate"):
        NetVLAD(2, 3).init_params(np.ones((2, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        layer(torch.zeros(1, 5, 2, 2))


def test_layer_attributes():
    layer = NetVLAD(num_clusters=8, dim=16, vladv2=True)
    assert layer.out_dim == 128
    assert tuple(layer.centroids.shape) == (8, 16) and isinstance(layer.centroids, torch.nn.Parameter)
    assert tuple(layer.conv.weight.shape) == (8, 16, 1, 1) and layer.conv.bias is not None
    assert NetVLAD(8, 16).conv.bias is None


# --------------------------------------------------------------------------------------------- pooling ablations


def test_max_avg_gem_pooling_against_numpy():
    rng = np.random.default_rng(5)
    x_np = rng.uniform(0.1, 2.0, size=(3, 6, 4, 5))
    x = torch.tensor(x_np, dtype=torch.float32)
    flat = x_np.reshape(3, 6, -1)

    def l2(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    np.testing.assert_allclose(MaxPool(6)(x).numpy(), l2(flat.max(-1)), rtol=1e-5)
    np.testing.assert_allclose(AvgPool(6)(x).numpy(), l2(flat.mean(-1)), rtol=1e-5)
    np.testing.assert_allclose(GeM(6, p=3.0)(x).detach().numpy(), l2(np.mean(flat ** 3, -1) ** (1 / 3)), rtol=1e-5)
    np.testing.assert_allclose(GeM(6, p=1.0)(x).detach().numpy(), l2(flat.mean(-1)), rtol=1e-5)
    for pool in (MaxPool(6), AvgPool(6), GeM(6)):
        out = pool(x)
        assert out.shape == (3, 6) and pool.out_dim == 6
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_gem_p_learnable_or_fixed():
    x = torch.rand(2, 4, 3, 3) + 0.1
    learnable = GeM(4, p=3.0, learnable=True)
    learnable(x).sum().backward()
    assert isinstance(learnable.p, torch.nn.Parameter) and learnable.p.grad is not None
    fixed = GeM(4, p=2.0, learnable=False)
    assert not isinstance(fixed.p, torch.nn.Parameter) and "p" in fixed.state_dict()
    with pytest.raises(NetVLADError, match="gem_p"):
        GeM(4, p=0.0)


def test_build_pooling():
    x = torch.randn(2, 16, 3, 4)
    for name, out_dim, cls in [("netvlad", 8 * 16, NetVLAD), ("max", 16, MaxPool), ("avg", 16, AvgPool),
                               ("gem", 16, GeM), ("NetVLAD", 8 * 16, NetVLAD)]:
        pool = build_pooling(name, 16, num_clusters=8)
        assert isinstance(pool, cls) and pool.out_dim == out_dim
        out = pool(x.abs() if name == "gem" else x)
        assert out.shape == (2, out_dim)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert build_pooling("netvlad", 16, 8, vladv2=True).conv.bias is not None
    nvl = build_pooling("netvlad-linear", 16, num_clusters=8, projection_dim=5, cls_dim=3)
    assert nvl.out_dim == 3 + 8 * 5 and nvl.uses_cls
    torch.testing.assert_close(nvl(x, torch.randn(2, 16)).norm(dim=1), torch.ones(2))
    with pytest.raises(NetVLADError, match=r"'sum'.*netvlad, netvlad-linear, max, avg, gem"):
        build_pooling("sum", 16)
    with pytest.raises(NetVLADError, match="num_clusters"):
        build_pooling("netvlad", 16, num_clusters=1)
