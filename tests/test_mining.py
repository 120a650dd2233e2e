"""Triplet mining against a brute-force numpy search, and the two losses against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netvlad_core.errors import NetVLADError
from netvlad_core.mining import (
    MiningConfig,
    batch_loss,
    empty_negative_cache,
    mine_triplets,
    sample_complement,
    squared_distances,
    triplet_loss,
)


def _case(seed: int = 0, num_db: int = 60, num_q: int = 15, dim: int = 8):
    """Random unit descriptors; database every 4 m on a line, queries scattered along it."""
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(num_db, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.normal(size=(num_q, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db_xy = np.stack([np.arange(num_db) * 4.0, np.zeros(num_db)], 1)
    q_xy = np.stack([rng.uniform(0, num_db * 4.0, num_q), rng.uniform(-3, 3, num_q)], 1)
    geo = np.linalg.norm(q_xy[:, None, :] - db_xy[None, :, :], axis=2)  # independent of the KD-tree code

    def within(r):
        return [np.argsort(g, kind="stable")[: np.count_nonzero(g <= r)] for g in geo]

    return db, q, geo, within(25.0), within(10.0)


def _brute_force(db, q, geo, train_pos, cfg: MiningConfig):
    """Per query (positive, negatives) from all database images, by explicit numpy distances."""
    out = []
    for i in range(len(q)):
        d2 = ((db - q[i]) ** 2).sum(1).astype(np.float64)
        if len(train_pos[i]) == 0:
            out.append(None)
            continue
        p = train_pos[i][np.argmin(d2[train_pos[i]])]
        negs = np.flatnonzero(geo[i] > 25.0)
        negs = negs[np.argsort(d2[negs], kind="stable")][: cfg.num_negatives]
        if cfg.loss == "squared":
            keep = d2[negs] < d2[p] + cfg.margin
        else:
            keep = np.sqrt(d2[negs]) < np.sqrt(d2[p]) + math.sqrt(cfg.margin)
        out.append((int(p), negs[keep]) if keep.any() else None)
    return out


@pytest.mark.parametrize("loss,margin", [("squared", 0.2), ("sqrt", 0.02)])
def test_mining_with_every_negative_sampled_equals_brute_force(loss, margin):
    db, q, geo, pos, train_pos = _case()
    cfg = MiningConfig(margin=margin, loss=loss, num_negatives=10, num_negatives_sampled=10_000)
    cache = empty_negative_cache(len(q), cfg.num_negatives)
    mined, stats = mine_triplets(np.arange(len(q)), q, db, train_positives=train_pos, positives=pos,
                                 negative_cache=cache, rng=np.random.default_rng(0), cfg=cfg)
    expected = _brute_force(db, q, geo, train_pos, cfg)
    assert stats.queries == len(q) and stats.skipped == sum(e is None for e in expected)
    assert any(e is not None for e in expected) and any(len(e[1]) < 10 for e in expected if e), "degenerate case"
    for i, (got, exp) in enumerate(zip(mined, expected)):
        if exp is None:
            assert got is None
            continue
        assert got.query == i and got.positive == exp[0]
        np.testing.assert_array_equal(got.negatives, exp[1])
        assert (geo[i, got.negatives] > 25.0).all() and geo[i, got.positive] <= 10.0


def test_sampled_negatives_are_far_violating_hardest_and_cached():
    db, q, geo, pos, train_pos = _case(seed=1)
    cfg = MiningConfig(margin=1.0, num_negatives=5, num_negatives_sampled=12)
    cache = empty_negative_cache(len(q), cfg.num_negatives)
    mined, _ = mine_triplets(np.arange(len(q)), q, db, train_positives=train_pos, positives=pos,
                             negative_cache=cache, rng=np.random.default_rng(3), cfg=cfg)
    for i, t in enumerate(mined):
        if t is None:
            continue
        d2 = ((db - q[i]) ** 2).sum(1)
        assert (geo[i, t.negatives] > 25.0).all()
        assert (d2[t.negatives] < d2[t.positive] + cfg.margin + 1e-5).all()
        assert (np.diff(d2[t.negatives]) >= -1e-6).all(), "hardest first"
        # the negatives are the violating prefix of the new cache (the hardest candidates)
        np.testing.assert_array_equal(t.negatives, cache[i, : len(t.negatives)])
        assert (geo[i, cache[i][cache[i] >= 0]] > 25.0).all()

    # a cache holding the global hardest negatives makes a tiny random sample give the brute-force answer
    full = MiningConfig(margin=1.0, num_negatives=5, num_negatives_sampled=10_000)
    cache = empty_negative_cache(len(q), cfg.num_negatives)
    mine_triplets(np.arange(len(q)), q, db, train_positives=train_pos, positives=pos, negative_cache=cache,
                  rng=np.random.default_rng(0), cfg=full)
    mined, _ = mine_triplets(np.arange(len(q)), q, db, train_positives=train_pos, positives=pos,
                             negative_cache=cache, rng=np.random.default_rng(1),
                             cfg=MiningConfig(margin=1.0, num_negatives=5, num_negatives_sampled=1))
    for got, exp in zip(mined, _brute_force(db, q, geo, train_pos, full)):
        assert (got is None) == (exp is None)
        if exp is not None:
            np.testing.assert_array_equal(got.negatives, exp[1])


def test_queries_without_positive_or_violation_are_skipped():
    db, q, geo, pos, train_pos = _case(seed=2)
    train_pos = [np.zeros(0, np.int64)] + list(train_pos[1:])
    cfg = MiningConfig(margin=1e-6, num_negatives=3, num_negatives_sampled=10_000)
    # query 1: its own descriptor is a database image within 10 m -> distance 0 to the positive, nothing violates
    j = int(train_pos[1][0])
    q = q.copy()
    q[1] = db[j]
    cache = empty_negative_cache(len(q), cfg.num_negatives)
    mined, stats = mine_triplets([0, 1], q[:2], db, train_positives=train_pos, positives=pos, negative_cache=cache,
                                 rng=np.random.default_rng(0), cfg=cfg)
    assert mined == [None, None]
    assert stats.no_positive == 1 and stats.no_violation == 1 and stats.violating == 0
    assert (cache[0] == -1).all() and (cache[1] >= 0).all(), "a mined query caches its hardest even without violation"


def test_sample_complement_draws_distinct_non_excluded():
    rng = np.random.default_rng(0)
    excluded = np.array([0, 1, 5, 6, 7, 19])
    allowed = np.setdiff1d(np.arange(20), excluded)
    np.testing.assert_array_equal(sample_complement(rng, 20, excluded, 100), allowed)
    seen = set()
    for _ in range(200):
        s = sample_complement(rng, 20, excluded, 4)
        assert len(s) == 4 and len(set(s)) == 4 and set(s) <= set(allowed)
        seen |= set(s.tolist())
    assert seen == set(allowed.tolist()), "every allowed index can be drawn"
    assert len(sample_complement(rng, 3, np.array([0, 1, 2]), 5)) == 0


def test_squared_distances_match_numpy_for_float16_inputs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 16)).astype(np.float16), rng.normal(size=(30, 16)).astype(np.float16)
    expected = ((a.astype(np.float64)[:, None] - b.astype(np.float64)[None]) ** 2).sum(2)
    np.testing.assert_allclose(squared_distances(a, b, db_chunk=8), expected, rtol=1e-5, atol=1e-4)


def test_losses_match_hand_computation():
    q, p = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])  # |q-p| = 1
    negs = torch.tensor([[0.6, 0.8], [2.0, 0.0], [0.3, 0.4]])  # |q-n| = 1, 2, 0.5
    # squared, m = 0.1: (1 + 0.1 - 1) + 0 + (1 + 0.1 - 0.25) = 0.95
    assert triplet_loss(q, p, negs, margin=0.1, loss="squared").item() == pytest.approx(0.95, abs=1e-6)
    # sqrt, margin sqrt(0.1): (1 + 0.31623 - 1) + 0 + (1 + 0.31623 - 0.5) = 1.13246
    assert triplet_loss(q, p, negs, margin=0.1, loss="sqrt").item() == pytest.approx(2 * math.sqrt(0.1) + 0.5, abs=1e-6)
    # batch of two queries [q, p, n1..n3] + [q, p, n1, n2]: (0.95 + 0 + 0.29) / 5 triplets
    rows = torch.cat([q[None], p[None], negs, torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 1.2], [0.9, 0.0]])])
    value, n = batch_loss(rows, [3, 2], margin=0.1, loss="squared")
    assert n == 5 and value.item() == pytest.approx((0.95 + 0.29) / 5, abs=1e-6)
    with pytest.raises(NetVLADError):
        triplet_loss(q, p, negs, margin=0.1, loss="cosine")


def test_sqrt_loss_equals_torch_triplet_margin_loss():
    g = torch.Generator().manual_seed(0)
    q, p, n = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(4, 8, generator=g)
    ref = torch.nn.TripletMarginLoss(margin=math.sqrt(0.1), p=2, eps=0.0, reduction="sum")(
        q.expand(4, 8), p.expand(4, 8), n)
    assert triplet_loss(q, p, n, margin=0.1, loss="sqrt").item() == pytest.approx(ref.item(), rel=1e-5)
