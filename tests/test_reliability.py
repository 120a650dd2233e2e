"""User mistakes and environment failures: one line `error: …`, exit status 2, nothing left behind.

Each test runs the real command in a subprocess and compares the output folder's listing (hidden files included)
before and after. The disk-full tests mount a small tmpfs and are skipped where the machine does not allow it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from netvlad_core.errors import NetVLADError
from netvlad_core.io import atomic_path, distinct_paths, remove_stale_temporaries
from netvlad_core.models import ModelConfig
from tests.conftest import REPO, make_split

SMALL = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def write_sample(path: Path, descriptors: np.ndarray, model: ModelConfig = SMALL) -> Path:
    """A descriptor sample in the layout `sample` writes (dataset `descriptors`, attribute `model`)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("descriptors", data=descriptors.astype(np.float32))
        f.create_dataset("image_indices", data=np.zeros(len(descriptors), dtype=np.int64))
        f.attrs["model"] = json.dumps(model.to_dict(), sort_keys=True)
    return path


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/full (root and a kernel that allows it), unmounted afterwards."""
    mount = tmp_path / "full"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------------------- option validation

def test_sample_refuses_negative_workers_before_any_work(tmp_path):
    split_dir = make_split(tmp_path, num_db=4, num_q=2)
    out = tmp_path / "out"
    proc = cli("sample", "--split-dir", split_dir, "--out", out / "d.h5", "--backbone", "resnet18_layer3",
               "--weights", "none", "--input-height", 48, "--input-width", 64, "--workers", -1, "--device", "cpu")
    assert_one_line_error(proc, "workers must be >= 0, got -1")
    assert listing(out) == set()


def test_kmeans_refuses_nan_descriptors_and_writes_nothing(tmp_path):
    rows = unit_rows(40, 256)
    rows[7, 3] = np.nan
    rows[9, 0] = np.inf
    sample = write_sample(tmp_path / "descriptors.h5", rows)
    out = tmp_path / "out"
    proc = cli("kmeans", "--descriptors", sample, "--centroids-out", out / "c.h5", "--model-out", out / "m.pt",
               "--num-clusters", 4, "--no-progress")
    assert_one_line_error(proc, str(sample), "2 descriptor rows contain NaN or inf", "row 7")
    assert listing(out) == set()


def test_kmeans_refuses_the_same_path_for_both_outputs(tmp_path):
    sample = write_sample(tmp_path / "descriptors.h5", unit_rows(40, 256))
    out = tmp_path / "out"
    proc = cli("kmeans", "--descriptors", sample, "--centroids-out", out / "same", "--model-out",
               out / "." / "same", "--num-clusters", 4, "--no-progress")
    assert_one_line_error(proc, "--model-out", "--centroids-out")
    assert listing(out) == set()


def test_distinct_paths_names_both_options(tmp_path):
    distinct_paths({"--model": tmp_path / "m.pt"}, {"--out": tmp_path / "f.h5", "--plot": None})
    with pytest.raises(NetVLADError, match="given as --out and as the input --model"):
        distinct_paths({"--model": tmp_path / "m.pt"}, {"--out": tmp_path / "x" / ".." / "m.pt"})


def test_synthetic_download_onto_an_existing_file_fails_before_rendering(tmp_path):
    target = tmp_path / "dataset"
    target.write_text("not a folder\n")
    proc = cli("download", "--dataset", "synthetic", "--out", target, "--no-progress")
    assert_one_line_error(proc, f"{target}: exists and is not a folder")
    assert target.read_text() == "not a folder\n"
    assert listing(tmp_path) == {"dataset"}, "nothing rendered, no temporary folder left"


def test_synthetic_download_refuses_to_replace_an_unrelated_folder(tmp_path):
    target = tmp_path / "dataset"
    (target / "mine").mkdir(parents=True)
    (target / "mine" / "notes.txt").write_text("keep me\n")
    proc = cli("download", "--dataset", "synthetic", "--out", target, "--no-progress")
    assert_one_line_error(proc, "holds no synthetic dataset")
    assert listing(tmp_path) == {"dataset", "dataset/mine", "dataset/mine/notes.txt"}


# ------------------------------------------------------------------------------------- what a killed run leaves

TINY_CITY = ("--train-blocks", 1, "--val-blocks", 1, "--test-blocks", 1, "--train-queries", 40, "--val-queries", 40,
             "--test-queries", 40, "--width", 64, "--height", 48, "--workers", 0, "--no-progress")


def test_a_killed_download_leaves_a_temporary_folder_that_the_next_run_removes(tmp_path):
    target = tmp_path / "dataset"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "download", "--dataset", "synthetic", "--out",
                             str(target), *map(str, TINY_CITY)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any((p / "raw" / "images").is_dir()
                                                  for p in tmp_path.glob(".dataset.*.tmp")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.glob(".dataset.*.tmp"))
    assert leftovers and not target.exists(), "the kill must come while the city is being rendered"
    done = cli("download", "--dataset", "synthetic", "--out", target, *TINY_CITY)
    assert done.returncode == 0, done.stderr
    assert not any(p.exists() for p in leftovers), "the killed run's temporary folder must be gone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    assert (target / "test" / "split.json").is_file()


def test_atomic_path_keeps_the_temporaries_of_live_writers(tmp_path):
    final = tmp_path / "a.h5"
    dead = tmp_path / f".a.h5.{2**22 + 12345}.x.tmp"  # above any pid_max: no such process
    live = tmp_path / f".a.h5.{os.getppid()}.y.tmp"
    other = tmp_path / f".b.h5.{2**22 + 12345}.z.tmp"
    for p in (dead, live, other):
        p.write_text("partial")
    assert remove_stale_temporaries(final) == [dead]
    assert live.exists() and other.exists() and not dead.exists()
    with atomic_path(final) as tmp:
        assert tmp.name.startswith(f".a.h5.{os.getpid()}.")
        tmp.write_text("done")
    assert final.read_text() == "done"


# ------------------------------------------------------------------------------------------------- a full disk

def test_kmeans_on_a_full_disk_writes_neither_output(tmp_path, small_tmpfs):
    sample = write_sample(tmp_path / "descriptors.h5", unit_rows(40, 256))
    # centroids (4 × 256 floats) fit in 2 MiB, the resnet18_layer3 model file (about 11 MB) does not
    proc = cli("kmeans", "--descriptors", sample, "--centroids-out", small_tmpfs / "c.h5",
               "--model-out", small_tmpfs / "m.pt", "--num-clusters", 4, "--no-progress")
    assert_one_line_error(proc, str(small_tmpfs / "m.pt"), "no space left on device")
    assert listing(small_tmpfs) == set(), "neither the centroids nor a temporary file may be left"


def test_atomic_write_on_a_full_disk_is_one_error_naming_the_file(small_tmpfs):
    target = small_tmpfs / "big.bin"
    with pytest.raises(NetVLADError, match=r"big\.bin: cannot write, no space left on device \(.* free\)"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(os.urandom(3 * 2**20))
    assert listing(small_tmpfs) == set()


def test_write_json_names_the_final_file_not_its_temporary(small_tmpfs):
    from netvlad_core.io import write_json

    name = f"m-{uuid.uuid4().hex[:6]}.json"
    with pytest.raises(NetVLADError) as info:
        write_json(small_tmpfs / name, {"x": "y" * 3 * 2**20})
    assert str(info.value).startswith(f"{small_tmpfs / name}: cannot write, no space left on device")
    assert listing(small_tmpfs) == set()


def _fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` bytes free."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb", buffering=0) as f:
        f.write(b"\0" * max(free - leave, 0))


def test_features_refuse_to_start_without_room_for_the_file(tmp_path, small_tmpfs):
    from netvlad_core.models import build_model, save_model

    split_dir = make_split(tmp_path, num_db=12, num_q=5)
    save_model(tmp_path / "model.pt", build_model(SMALL), SMALL)  # 1024-D: 17 rows, 68 KiB + 256 KiB slack
    _fill(small_tmpfs, 16 * 1024)
    before = listing(small_tmpfs)
    proc = cli("features", "--model", tmp_path / "model.pt", "--split-dir", split_dir, "--out", small_tmpfs / "f.h5",
               "--device", "cpu", "--workers", 0, "--no-progress")
    assert_one_line_error(proc, str(small_tmpfs / "f.h5"), "no space left on device", "needs about 324.0 KiB")
    assert listing(small_tmpfs) == before


class _DiskFillingModel(torch.nn.Module):
    """A 4096-D model whose first forward pass fills the disk (another process taking the space meanwhile)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4096, 1)
        self.out_dim, self.stride, self.folder, self.filled = 4096, 1, folder, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.filled:
            _fill(self.folder, 0)
            self.filled = True
        return torch.nn.functional.normalize(self.conv(x).mean((2, 3)), dim=1)


def test_features_finish_when_the_disk_fills_up_meanwhile(tmp_path, small_tmpfs):
    """The rows' space is reserved before the first image is read: another process filling the disk during the run
    cannot make the HDF5 writes fail (HDF5 meeting a full disk while closing a file crashes the process)."""
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.features import FeatureConfig, extract_split_features, read_features
    from tests.conftest import TINY_MODEL_CONFIG

    split = load_split(make_split(tmp_path, num_db=40, num_q=8))
    model = _DiskFillingModel(small_tmpfs)
    out = extract_split_features(model, TINY_MODEL_CONFIG, split, small_tmpfs / "f.h5", device=torch.device("cpu"),
                                 cfg=FeatureConfig(batch_size=4, num_workers=0, flush_every=1), progress=False)
    assert model.filled and __import__("shutil").disk_usage(small_tmpfs).free <= 4096  # the sidecar's page
    db, q, attrs = read_features(out)
    assert db.shape == (40, 4096) and q.shape == (8, 4096) and attrs["complete"]
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    assert listing(small_tmpfs) == {"filler", "f.h5"}


def test_memory_mapped_cache_on_a_full_disk_is_one_error_not_sigbus(small_tmpfs):
    from netvlad_core.training.triplet import allocate_cache

    with pytest.raises(NetVLADError, match=r"db_cache\.npy: cannot write, no space left on device"):
        allocate_cache(2000, 4096, np.float32, small_tmpfs / "db_cache.npy")  # 32 MB on a 2 MiB disk
    assert listing(small_tmpfs) == set()
