"""The training package's triplet recipe trains bit for bit the model that the single-module ``training.py`` it
replaced trained: both run here, on this machine, on the same tiny splits (images, and the float16 trunk cache),
and their output state dicts must have the same sha256. The old module is read from git history (the commit
before the move); without that history (an export, a shallow clone) the test is skipped."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netvlad_core.datasets.manifest import load_ground_truth, load_split
from netvlad_core.io import load_state
from netvlad_core.mining import MiningConfig
from tests.test_training import tiny  # noqa: F401  (the module's tiny splits and model)

REPO = Path(__file__).resolve().parents[1]
BEFORE = "f76a0b75464d969f87fad473e962c67804be89ad"  # the last commit with netvlad_core/training.py


def _old_training():
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:netvlad_core/training.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {BEFORE[:7]} (the module before the refactor)")
    name = "netvlad_core._training_before_refactor"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "netvlad_core"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE[:7]}:netvlad_core/training.py", "exec"), module.__dict__)
    return module


def _sha256(path: Path) -> str:
    state = load_state(path)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(module, tiny, out: Path, trunk_cache: str) -> str:  # noqa: F811
    from netvlad_core.models import load_model

    cfg = module.TrainConfig(epochs=2, batch_size=2, cache_refresh_rate=2, lr=0.01, lr_step=1, patience=2, seed=7,
                             encode_batch_size=8, workers=0, trunk_cache=trunk_cache,
                             mining=MiningConfig(num_negatives=3, num_negatives_sampled=8, margin=3.0))
    model, model_cfg = load_model(tiny["init"])
    model_cfg = module.apply_trainable_blocks(model, model_cfg, 1)
    splits = [load_split(tiny["train"]), load_ground_truth(tiny["train"]), load_split(tiny["val"]),
              load_ground_truth(tiny["val"])]
    module.train(model, model_cfg, *splits, out=out / "model.pt", live_dir=out / "live", checkpoint_dir=out / "ckpt",
                 cfg=cfg, device=torch.device("cpu"), progress=False, log=lambda message: None)
    return _sha256(out / "model.pt")


@pytest.mark.parametrize("trunk_cache", ["off", "on"])
def test_triplet_recipe_trains_bitwise_the_model_the_old_module_trained(tiny, tmp_path, trunk_cache):  # noqa: F811
    import netvlad_core.training as new

    old = _old_training()
    before = _run(old, tiny, tmp_path / "old", trunk_cache)
    after = _run(new, tiny, tmp_path / "new", trunk_cache)
    assert after == before
    init = load_state(tiny["init"])["state_dict"]
    assert any(not torch.equal(v, init[k]) for k, v in load_state(tmp_path / "new" / "model.pt")["state_dict"].items())
