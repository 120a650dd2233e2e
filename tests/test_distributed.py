"""Distributed runs on CPU with 2 gloo processes started by a real torchrun (or, for the dead-peer test, by hand):
sharded features, descriptor sampling and the PCA descriptor pass equal a single process; one DDP training step
(and a whole DDP run) gives the single-process weights for the same global batch; the DDP train stage resumed
from a mid-run checkpoint ends bit for bit where the uninterrupted DDP run does; a rank that dies makes its peer
fail with a clear message instead of hanging. This file is also the workers' script:
``torchrun --nproc-per-node 2 tests/test_distributed.py <scenario> <dir>``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as the workers' script
    sys.path.insert(0, str(REPO))

from netvlad_core.distributed import (  # noqa: E402
    gather_batch,
    gather_rows,
    init_distributed,
    num_rounds,
    pad_rounds,
    shard_indices,
)
from netvlad_core.errors import NetVLADError  # noqa: E402

SMALL = dict(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)
SAMPLE = dict(num_descriptors=61, per_image=4, seed=3, batch_size=3, num_workers=0)
# 6 train queries, refresh blocks of 4 (a checkpoint before the second): global batches of 3 and 1 (rank 1 has
# nothing: zero-weighted step), then 2
TRAIN = dict(epochs=1, batch_size=3, num_negatives=3, num_negatives_sampled=8, cache_refresh_rate=4, margin=3.0,
             lr=0.01, encode_batch_size=4, workers=0, seed=7)
ONE_STEP = {**TRAIN, "epochs": 1, "max_queries_per_epoch": 3,  # one global batch of 3 queries: 2 + 1 per rank
            "trunk_cache": "off"}  # on images (TRAIN, the whole run, trains on the trunk cache: auto)
MINING_KEYS = ("margin", "loss", "num_negatives", "num_negatives_sampled")


CPU = torch.device("cpu")


def _train_config(params: dict):
    """TrainConfig from a flat dict whose mining keys go to its MiningConfig (as params.yaml's `mining` group)."""
    from netvlad_core.mining import MiningConfig
    from netvlad_core.training import TrainConfig

    mining = MiningConfig(**{k: v for k, v in params.items() if k in MINING_KEYS})
    return TrainConfig(**{k: v for k, v in params.items() if k not in MINING_KEYS}, mining=mining)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **extra}


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 <args>``; fails the test with the workers' stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# ------------------------------------------------------------------------------------------ in-process units

def test_shards_cover_every_item_once_in_single_process_batches():
    for n, world, block, start in [(10, 3, None, 0), (23, 2, 4, 0), (23, 4, 3, 5), (2, 4, 2, 0), (0, 2, 3, 0)]:
        shards = [shard_indices(n, r, world, block=block, start=start) for r in range(world)]
        np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(start, max(n, start)))
        if block is None:
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            assert all(np.all(np.diff(s) == 1) for s in shards if len(s))
        else:  # rank r's j-th batch is the single-process batch j·world + r
            for r, s in enumerate(shards):
                for j in range(0, len(s), block):
                    g = j // block * world + r
                    np.testing.assert_array_equal(s[j:j + block], np.arange(start + g * block,
                                                                            min(start + (g + 1) * block, n)))
            assert all(-(-len(s) // block) <= num_rounds(n, block, world, start) for s in shards)
    assert list(pad_rounds(iter("ab"), 4)) == ["a", "b", None, None]


def test_single_process_helpers_are_identities(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled, ctx.device) == (0, 1, True, False, CPU)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(gather_rows(rows[::-1], np.array([3, 2, 1, 0]), 4, ctx=ctx), rows)
    idx, got = gather_batch(None, None, ctx=ctx, capacity=2, dim=3)
    assert idx.shape == (0,) and got.shape == (0, 3)
    with pytest.raises(ValueError):
        gather_rows(rows, np.array([0, 1, 1, 3]), 4, ctx=ctx)


def test_world_without_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(NetVLADError, match="MASTER_ADDR"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(NetVLADError, match="RANK=2 WORLD_SIZE=2"):
        init_distributed("cpu")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A split of 23 database images and 7 queries and a small real model file (ResNet-18 to layer3, K = 4)."""
    from netvlad_core.clustering import KMeansConfig, kmeans
    from netvlad_core.models import ModelConfig, build_model, save_model
    from tests.conftest import make_split

    root = tmp_path_factory.mktemp("dist")
    split_dir = make_split(root, num_db=23, num_q=7)
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    save_model(root / "model.pt", build_model(cfg), cfg)
    # training: 14 database images / 6 queries, validation 6 / 3; the model with its last block trainable
    make_split(root / "train", num_db=14, num_q=6, name="train", seed=0)
    make_split(root / "val", num_db=6, num_q=3, name="val", seed=1)
    train_cfg = ModelConfig(**{**SMALL, "trainable_blocks": 1})
    net = build_model(train_cfg).eval()
    local = torch.nn.functional.normalize(torch.randn(200, net.feature_dim), dim=1).numpy()
    net.pool.init_params(kmeans(local, 4, KMeansConfig(iterations=5), progress=False), local)
    save_model(root / "init.pt", net, train_cfg)
    return {"root": root, "split": split_dir, "model": root / "model.pt", "init": root / "init.pt",
            "train": root / "train" / "splits" / "train", "val": root / "val" / "splits" / "val"}


@pytest.fixture(scope="module")
def library_run(data) -> Path:
    """One torchrun (2 gloo ranks) of the library calls and the `features` stage (see ``_worker_library``), after
    a single process left an interrupted features file for it to resume."""
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.features import FeatureConfig, extract_split_features
    from tests.conftest import TINY_MODEL_CONFIG, TinyModel

    root = data["root"]
    torch.manual_seed(0)
    tiny = TinyModel()
    tiny.fail_after = 3  # 3 batches of 2 committed, then KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        extract_split_features(tiny, TINY_MODEL_CONFIG, load_split(data["split"]), root / "resumed.h5", device=CPU,
                               cfg=FeatureConfig(batch_size=2, num_workers=0, flush_every=1), progress=False)
    assert (root / ".resumed.h5.partial").exists()
    proc = _torchrun(str(Path(__file__)), "library", str(root))
    (root / "library_stdout.txt").write_text(proc.stdout)
    return root


# -------------------------------------------------------------------------------------- real torchrun tests

def test_features_stage_under_torchrun_equals_single_process(data, library_run):
    """The `features` stage run by both ranks: rank 0 alone reports and writes the file a single process writes."""
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.features import FeatureConfig, extract_split_features, read_features
    from netvlad_core.models import load_model

    stdout = (library_run / "library_stdout.txt").read_text()
    assert stdout.count("features:") == 1 and "(2 processes)" in stdout, "only rank 0 reports"
    out = library_run / "features_2.h5"
    assert sorted(p.name for p in library_run.iterdir() if "features_2" in p.name) == ["features_2.h5"]
    net, cfg = load_model(data["model"])
    ref = extract_split_features(net, cfg, load_split(data["split"]), data["root"] / "features_1.h5",
                                 device=CPU, cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)
    db1, q1, _ = read_features(ref)
    db2, q2, attrs = read_features(out)
    assert attrs["complete"]
    np.testing.assert_allclose(db2, db1, atol=1e-5)
    np.testing.assert_allclose(q2, q1, atol=1e-5)


def test_sampling_pca_pass_gather_and_resume_under_torchrun_equal_single_process(data, library_run):
    """One torchrun of the library calls: `sample_descriptors`, the PCA descriptor pass, `encode_images`,
    `gather_rows` with padded duplicates, and resuming a partial features file left by a single process."""
    import h5py

    from netvlad_core.clustering import SampleConfig, sample_descriptors
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.features import FeatureConfig, read_features
    from netvlad_core.models import load_model
    from netvlad_core.models.whitening import PCAConfig, fit_model_whitening
    from tests.conftest import TinyModel

    root, split = library_run, load_split(data["split"])
    torch.manual_seed(0)
    tiny = TinyModel()
    report = json.loads((root / "rank1.json").read_text())
    assert report == {"main_only_result": None, "pca_result": None}, "rank 1 holds no gathered copy, fits nothing"
    np.testing.assert_array_equal(np.load(root / "encoded_all_rank1.npy"), np.load(root / "encoded_2.npy"))

    # descriptor sample: bitwise the single-process file (same images per forward pass, same location draws)
    net, cfg = load_model(data["model"])
    sample_descriptors(net, cfg, split, root / "sample_1.h5", device=CPU, cfg=SampleConfig(**SAMPLE),
                       progress=False)
    with h5py.File(root / "sample_1.h5") as a, h5py.File(root / "sample_2.h5") as b:
        np.testing.assert_array_equal(a["image_indices"][()], b["image_indices"][()])
        np.testing.assert_allclose(a["descriptors"][()], b["descriptors"][()], atol=1e-5)
        assert a["descriptors"].shape == (61, 256)
    # PCA descriptor pass: the same whitening as a single process
    whitening = fit_model_whitening(net, cfg, split, device=CPU, cfg=PCAConfig(dim=6, max_images=15, seed=1),
                                    feature_cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)
    got = np.load(root / "pca_2.npz")
    np.testing.assert_allclose(got["mean"], whitening.mean, atol=1e-6)
    np.testing.assert_allclose(got["eigenvalues"], whitening.eigenvalues, rtol=1e-4)
    np.testing.assert_allclose(np.abs(got["components"] @ whitening.components.T), np.eye(6), atol=1e-3)
    # encode_images and gather_rows on rank 0
    with torch.no_grad():
        np.testing.assert_allclose(np.load(root / "encoded_2.npy"), _one_by_one(tiny, split.db_files()), atol=1e-5)
    np.testing.assert_array_equal(np.load(root / "gathered_2.npy"), np.arange(11 * 3, dtype=np.float32).reshape(11, 3))
    # the partial file was resumed from its 3 committed batches by the two ranks: rows equal the model's
    db, q, _ = read_features(root / "resumed.h5")
    np.testing.assert_allclose(db, _one_by_one(tiny, split.db_files()), atol=1e-5)
    np.testing.assert_allclose(q, _one_by_one(tiny, split.query_files()), atol=1e-5)
    # 17 database images left after 3 committed batches of 2 (9 batches: ranks 0 and 1 take 5 and 4) and 7
    # queries (4 batches: 2 each): the 13 batches a resumed single process would run, none twice
    assert json.loads((root / "resumed_calls.json").read_text()) == {"calls_rank0": 7, "calls_rank1": 6}


def _one_by_one(model, files) -> np.ndarray:
    from netvlad_core.datasets.images import load_image
    from tests.conftest import TINY_MODEL_CONFIG as c

    with torch.no_grad():
        return np.stack([model(load_image(f, c.input_height, c.input_width, c.mean, c.std)[None])[0].numpy()
                         for f in files])


def _train_single(data: dict, run: Path, params: dict) -> Path:
    """The single-process run of ``params`` (in this process); its best model file."""
    from netvlad_core.datasets.manifest import load_ground_truth, load_split
    from netvlad_core.models import load_model
    from netvlad_core.training import train

    model, model_cfg = load_model(data["init"])
    train(model, model_cfg, load_split(data["train"]), load_ground_truth(data["train"]), load_split(data["val"]),
          load_ground_truth(data["val"]), out=run / "model.pt", live_dir=run / "live", checkpoint_dir=run / "ckpt",
          cfg=_train_config(params), device=CPU, progress=False, log=lambda msg: None)
    return run / "model.pt"


def _weights(path: Path) -> dict:
    from netvlad_core.io import load_state

    return load_state(path)["state_dict"]


def _assert_weights_close(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=f"{k} differs")


def test_one_ddp_step_and_a_ddp_run_give_the_single_process_weights(data, library_run):
    """Same seed and global batch: the 2-rank step (2 + 1 queries) and the 2-epoch run (with a batch of 1 query,
    where rank 1 only joins the all-reduce) end within float rounding of one process."""
    init = _weights(data["init"])
    one_step = _train_single(data, data["root"] / "single_step", ONE_STEP)
    assert any(not torch.equal(v, init[k]) for k, v in _weights(one_step).items()), "the step changed nothing"
    _assert_weights_close(library_run / "ddp_step" / "model.pt", one_step, atol=1e-6)
    single_run = _train_single(data, data["root"] / "single_run", TRAIN)
    _assert_weights_close(library_run / "ddp_run" / "model.pt", single_run, atol=1e-5)
    assert not (library_run / "ddp_run" / "ckpt" / "train_state.pt").exists()
    losses = [(library_run / "ddp_run").parent / d / "live" / "plots" / "metrics" / "train" / "loss.tsv"
              for d in ("ddp_run", "single_run")]
    ddp_rows, single_rows = (np.loadtxt(f, delimiter="\t", skiprows=1, ndmin=2) for f in losses)
    assert len(ddp_rows) == len(single_rows) == 3, "3 steps: batches of 3 and 1 queries, then 2"
    np.testing.assert_allclose(ddp_rows[:, 1:], single_rows[:, 1:], rtol=1e-5)  # step, loss of the global batch


def _train_cli(data: dict, run: Path) -> list[str]:
    args = [sys.executable, "-m", "stages.launch", "--nproc-per-node", "2", "train", "--init-model", str(data["init"]),
            "--train-split", str(data["train"]), "--val-split", str(data["val"]), "--out", str(run / "model.pt"),
            "--live-dir", str(run / "live"), "--checkpoint-dir", str(run / "ckpt"), "--device", "cpu",
            "--no-progress", "--dist-timeout", "120"]
    for k, v in TRAIN.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_ddp_train_stage_resumes_a_checkpoint_bitwise_like_an_uninterrupted_ddp_run(data, library_run):
    """`netvlad launch --nproc-per-node 2 train` given the checkpoint the uninterrupted DDP run wrote between its
    two refresh blocks (what a kill there leaves behind: checkpoints are written atomically) ends with bitwise
    the uninterrupted run's model; rank 0 alone reads the checkpoint, logs and writes."""
    from netvlad_core.io import load_state

    run = data["root"] / "cli_run"
    (run / "ckpt").mkdir(parents=True)
    checkpoint = library_run / "ddp_run_checkpoint_at_4.pt"
    assert load_state(checkpoint)["position"] == 4, "the checkpoint between the two refresh blocks"
    (run / "ckpt" / "train_state.pt").write_bytes(checkpoint.read_bytes())
    rerun = subprocess.run(_train_cli(data, run), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert rerun.stderr.count("train: resuming from") == 1, "rank 0 alone logs"
    assert rerun.stdout.count("train: best epoch") == 1 and "2 processes" in rerun.stdout
    ref = library_run / "ddp_run"
    wa, wb = _weights(run / "model.pt"), _weights(ref / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed DDP run differs from the uninterrupted one"
    assert not (run / "ckpt" / "train_state.pt").exists()
    loss_rows = (run / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    ref_rows = (ref / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    assert loss_rows == ref_rows and len(ref_rows) == 3, \
        "the curve before the checkpoint comes back from it (the live dir was absent), the step after it is logged " \
        "with the uninterrupted run's loss"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_fails_its_peer_with_a_clear_message(data):
    """Two processes started by hand (as on two nodes, where no local torchrun agent stops the survivor):
    rank 1 dies after joining; rank 0's next collective fails at once with `error: rank 0: …`, exit 2."""
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(Path(__file__)), "die", str(data["root"])], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, results[0][1][-3000:]
    assert "error: rank 0: sharing the resume position failed: another of the 2 processes died" in results[0][1]
    assert not (data["root"] / "never.h5").exists()


# ------------------------------------------------------------------------------------------------- workers

def _worker_library(root: Path) -> None:
    from netvlad_core.clustering import SampleConfig, sample_descriptors
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.features import FeatureConfig, encode_images, extract_split_features
    from netvlad_core.models import load_model
    from netvlad_core.models.whitening import PCAConfig, fit_model_whitening
    from tests.conftest import TINY_MODEL_CONFIG, TinyModel

    dist = init_distributed("cpu", timeout_s=120)
    assert dist.world_size == 2 and dist.backend == "gloo"
    split = load_split(root / "splits" / "test")
    net, cfg = load_model(root / "model.pt")
    sample_descriptors(net, cfg, split, root / "sample_2.h5", device=dist.device,
                       cfg=SampleConfig(**SAMPLE), progress=False, dist=dist)
    whitening = fit_model_whitening(net, cfg, split, device=dist.device, cfg=PCAConfig(dim=6, max_images=15, seed=1),
                                    feature_cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False, dist=dist)
    torch.manual_seed(0)
    tiny = TinyModel()
    enc_cfg = FeatureConfig(batch_size=3, num_workers=0)
    c = TINY_MODEL_CONFIG
    kwargs = dict(height=c.input_height, width=c.input_width, mean=c.mean, std=c.std, device=dist.device,
                  cfg=enc_cfg, progress=False, dist=dist)
    on_main = encode_images(tiny, split.db_files(), result_on="main", **kwargs)
    on_all = encode_images(tiny, split.db_files(), result_on="all", **kwargs)
    # a DistributedSampler-style shard: 11 items padded to 6 per rank by repeating the first items
    padded = np.arange(12) % 11
    mine = padded[dist.rank::2]
    gathered = gather_rows(np.arange(11 * 3, dtype=np.float32).reshape(11, 3)[mine], mine, 11, ctx=dist, dst=0)
    tiny.calls = 0
    extract_split_features(tiny, TINY_MODEL_CONFIG, split, root / "resumed.h5", device=dist.device,
                           cfg=FeatureConfig(batch_size=2, num_workers=0, flush_every=1), progress=False, dist=dist)
    calls = [None, None]
    torch.distributed.all_gather_object(calls, tiny.calls)
    # training: one step, and an uninterrupted 2-epoch run
    from netvlad_core.datasets.manifest import load_ground_truth
    from netvlad_core.training import train

    for name, params in (("ddp_step", ONE_STEP), ("ddp_run", TRAIN)):
        model, model_cfg = load_model(root / "init.pt")
        run = root / name
        if name == "ddp_run" and dist.is_main:  # keep the checkpoint written between the two refresh blocks
            threading.Thread(target=_copy_when_present, daemon=True,
                             args=(run / "ckpt" / "train_state.pt", root / "ddp_run_checkpoint_at_4.pt")).start()
        train(model, model_cfg, load_split(root / "train" / "splits" / "train"),
              load_ground_truth(root / "train" / "splits" / "train"), load_split(root / "val" / "splits" / "val"),
              load_ground_truth(root / "val" / "splits" / "val"), out=run / "model.pt", live_dir=run / "live",
              checkpoint_dir=run / "ckpt", cfg=_train_config(params), device=dist.device, progress=False,
              log=lambda msg: None, dist=dist)
    if dist.is_main:
        np.savez(root / "pca_2.npz", mean=whitening.mean, eigenvalues=whitening.eigenvalues,
                 components=whitening.components)
        np.save(root / "encoded_2.npy", on_main)
        assert np.array_equal(on_main, on_all)
        np.save(root / "gathered_2.npy", gathered)
        (root / "resumed_calls.json").write_text(json.dumps({"calls_rank0": calls[0], "calls_rank1": calls[1]}))
    else:
        np.save(root / "encoded_all_rank1.npy", on_all)
        (root / "rank1.json").write_text(json.dumps({"main_only_result": on_main, "pca_result": whitening}))
    # last, as its session ends the process group: the `features` stage, as `torchrun … -m stages.cli features`
    from stages.cli import app

    app(args=["features", "--model", str(root / "model.pt"), "--split-dir", str(root / "splits" / "test"),
              "--out", str(root / "features_2.h5"), "--batch-size", "4", "--workers", "0", "--device", "cpu",
              "--no-progress", "--dist-timeout", "120"], standalone_mode=False)


def _copy_when_present(path: Path, copy: Path, timeout: float = 600.0) -> None:
    """Copy the first version of ``path`` to appear (written atomically by a rename) to ``copy``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            time.sleep(0.002)
            continue
        copy.write_bytes(data)
        return


def _worker_die(root: Path) -> None:
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.distributed import distributed_session
    from netvlad_core.features import FeatureConfig, extract_split_features
    from stages._common import user_errors
    from tests.conftest import TINY_MODEL_CONFIG, TinyModel

    @user_errors
    def run() -> None:
        with distributed_session("cpu", timeout_s=60) as dist:
            if dist.rank == 1:
                os._exit(3)
            time.sleep(0.5)
            extract_split_features(TinyModel(), TINY_MODEL_CONFIG, load_split(root / "splits" / "test"),
                                   root / "never.h5", device=dist.device, cfg=FeatureConfig(num_workers=0),
                                   progress=False, dist=dist)

    try:
        run()
    except Exception as e:  # user_errors raises typer.Exit(2) after printing `error: …`
        sys.exit(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    {"library": _worker_library, "die": _worker_die}[scenario](directory)
