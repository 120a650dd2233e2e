"""The trunk cache file: reused only with the same identity, rebuilt otherwise; the auto/on/off decision."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from netvlad_core.datasets.manifest import load_split
from netvlad_core.errors import NetVLADError
from netvlad_core.models import ModelConfig, build_model
from netvlad_core.training import checkpoint_bytes
from netvlad_core.trunk_cache import (
    CACHE_NAME,
    SIDECAR_NAME,
    build_trunk_cache,
    cache_identity,
    encode_cached,
    plan_trunk_cache,
)
from tests.conftest import make_split
from tests.test_reliability import small_tmpfs  # noqa: F401  (fixture)

CPU = torch.device("cpu")
CFG = ModelConfig(backbone="resnet18_layer3", weights="none", trainable_blocks=1, num_clusters=4, input_height=48,
                  input_width=64)


@pytest.fixture
def setup(tmp_path):
    train = load_split(make_split(tmp_path / "t", num_db=6, num_q=3, name="train", seed=0))
    val = load_split(make_split(tmp_path / "v", num_db=4, num_q=2, name="val", seed=1))
    return build_model(CFG).eval(), train, val


def _plan(model, train, val, folder, **kw):
    kw = {"mode": "on", "dtype": "float32", **kw}
    return plan_trunk_cache(model, CFG, train, val, folder=folder, device=CPU, log=lambda m: None, **kw)


def _build(plan, key):
    return build_trunk_cache(plan, key, model_cfg=CFG, device=CPU, batch_size=4, num_workers=0, amp="bf16",
                             log=lambda m: None)


def test_cache_rows_are_the_trunks_output_and_a_stale_file_is_rebuilt(setup, tmp_path):
    from netvlad_core.datasets.images import load_image

    model, train, val = setup
    plan = _plan(model, train, val, tmp_path / "ckpt")
    key = cache_identity(plan, CFG, train, val, device=CPU, amp="bf16")
    cache = _build(plan, key)
    files = train.db_files() + train.query_files() + val.db_files() + val.query_files()
    with torch.no_grad():
        want = plan.trunk(torch.stack([load_image(f, 48, 64, CFG.mean, CFG.std) for f in files])).numpy()
    np.testing.assert_allclose(cache.array, want, rtol=1e-5, atol=1e-5)
    # the trainable part on the rows gives the model's descriptors of the images
    with torch.no_grad():
        desc = model(torch.stack([load_image(f, 48, 64, CFG.mean, CFG.std) for f in val.query_files()])).numpy()
    got = encode_cached(plan.part, cache, cache.rows("val_q"), np.empty((2, model.out_dim), np.float32), device=CPU,
                        batch_size=4, amp="bf16")
    np.testing.assert_allclose(got, desc, rtol=1e-5, atol=1e-6)

    marked = np.lib.format.open_memmap(plan.path, mode="r+")
    marked[0] = 0  # a mark: a reused file keeps it, a rebuilt one does not
    marked.flush()
    del marked
    assert (np.asarray(_build(plan, key).array[0]) == 0).all(), "the same identity reuses the finished file"
    os.utime(files[0], ns=(1, 1))  # an image file changed (its mtime): the split fingerprint, hence the identity
    stale = cache_identity(plan, CFG, train, val, device=CPU, amp="bf16")
    assert stale != key
    np.testing.assert_allclose(_build(plan, stale).array, want, rtol=1e-5, atol=1e-5)
    assert cache_identity(_plan(model, train, val, tmp_path / "ckpt", dtype="float16"), CFG, train, val, device=CPU,
                          amp="bf16") != stale, "the dtype is part of the identity"


def test_auto_turns_the_cache_off_when_it_does_not_fit_and_on_refuses(setup, small_tmpfs):  # noqa: F811
    import dataclasses

    model, train, val = setup
    messages = []
    # 15 images × 128×6×8 float32 = 360 KiB: fits the 2 MiB disk, but not with auto's margin
    assert plan_trunk_cache(model, CFG, train, val, mode="auto", dtype="float32", folder=small_tmpfs, device=CPU,
                            log=messages.append) is None
    assert len(messages) == 1 and messages[0].startswith("train: trunk cache off: needs 360.0 KiB") \
        and "free" in messages[0], messages
    big = dataclasses.replace(CFG, input_height=240, input_width=320)  # 15 × 128×30×40 float32 = 8.8 MiB
    with pytest.raises(NetVLADError, match=r"trunk-cache on: needs 8\.8 MiB"):
        plan_trunk_cache(model, big, train, val, mode="on", dtype="float32", folder=small_tmpfs, device=CPU,
                         log=messages.append)
    room = checkpoint_bytes(model, train.num_queries, num_negatives=10)  # > 2 MiB: the model's weights twice
    with pytest.raises(NetVLADError, match=r"trunk-cache on: needs 360\.0 KiB \+ [0-9.]+ MiB for the checkpoint"):
        plan_trunk_cache(model, CFG, train, val, mode="on", dtype="float32", folder=small_tmpfs, device=CPU,
                         keep_free=room, log=messages.append)  # the cache alone fits: the checkpoint would not
    assert plan_trunk_cache(model, CFG, train, val, mode="off", dtype="float16", folder=small_tmpfs, device=CPU,
                            log=messages.append) is None
    assert len(messages) == 1, "off says nothing"
    assert not any(p.name in (CACHE_NAME, SIDECAR_NAME) for p in small_tmpfs.iterdir())


def test_checkpoint_room_covers_a_real_checkpoint_written_beside_the_previous_one(setup):
    """The estimate the disk check leaves free is at least two checkpoints (old + new during the atomic write) of a
    model whose optimiser has momentum buffers."""
    import io as _io

    model, train, _ = setup
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 48, 64)).sum().backward()
    optimizer.step()
    buffer = _io.BytesIO()
    best = {k: v.clone() for k, v in model.state_dict().items()}  # a copy, as training keeps it
    torch.save({"model": model.state_dict(), "best_model": best, "optimizer": optimizer.state_dict(),
                "negative_cache": torch.full((train.num_queries, 10), -1, dtype=torch.int64)}, buffer)
    assert checkpoint_bytes(model, train.num_queries, 10) >= 2 * buffer.tell()
