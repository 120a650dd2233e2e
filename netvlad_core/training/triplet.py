"""The paper's recipe: weakly supervised triplets mined from the train split, resumable bit for bit.

One epoch visits the train queries that have a database image within the training radius, in an order drawn
from ``(seed, epoch)``, in *refresh blocks* of ``cache_refresh_rate`` queries. Each block:

1. writes a checkpoint (except the first block of an epoch, whose state the previous epoch-end checkpoint holds);
2. refreshes the descriptor cache: every database image and the block's queries are encoded with the current
   weights by :func:`netvlad_core.features.encode_batches` (float16 on GPU, float32 on CPU; in memory or a
   ``np.memmap`` file), or, with the trunk cache, by the model's trainable part on the cached activations;
3. mines every query of the block at once (:func:`netvlad_core.mining.mine_triplets`: one batched distance
   computation, best positive in feature space, hard negatives violating the margin, negative cache);
4. trains on batches of ``batch_size`` consecutive queries of the block (skipped queries drop out of their
   batch; a batch with none left is no step). Each query contributes ``[q, p, n_1..n_k]`` images to one forward
   pass; the loss is the sum over the batch's triplets divided by their number.

Its checkpointed state (:class:`TripletState`) is the negative cache, the epoch's mining counts and the skipped
queries so far; the mining generator is the loop's (``TrainState.rng``).

Under torchrun ``batch_size`` is the global batch. Cache refreshes are sharded over the ranks
(:func:`netvlad_core.features.encode_rounds`); rank 0 holds the cache, mines and sends the triplets to every rank,
so all ranks train on the single-process triplets. Each global batch's queries are split into contiguous slices,
one per rank; each rank's loss is its triplets' sum divided by the global batch's triplet count and the gradients
are summed (:mod:`.ddp`): a step equals the single-process step up to float rounding. A rank with no query in a
batch (fewer queries than ranks) runs one blank image with weight 0 to join the all-reduce.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..datasets.images import load_image
from ..datasets.manifest import GroundTruth, Split
from ..device import autocast, to_device
from ..distributed import DistContext, all_reduce_sum, broadcast_object, shard_indices
from ..errors import NetVLADError
from ..mining import MiningStats, Triplets, batch_loss, batch_loss_sum, empty_negative_cache, mine_triplets
from ..models.build import ModelConfig
from ..retrieval import NonFiniteDistances
from .config import TrainConfig
from .ddp import backward_and_step, wrap_ddp
from .loop import epoch_permutation
from .recipe import Recipe
from .state import TrainState, checkpoint_bytes
from .validation import descriptor_error, encode_into


def allocate_cache(rows: int, dim: int, dtype, memmap_path: Path | None) -> np.ndarray:
    """An uninitialised ``(rows, dim)`` cache: in memory, or a ``np.memmap`` at ``memmap_path``.

    The memory-mapped file's blocks are reserved up front (``posix_fallocate``): a sparse file on a full disk would
    kill the process with SIGBUS at the first write into a page that cannot be stored; this way a full disk is one
    error here, and the file is removed."""
    from ..io import reserve_space

    if memmap_path is None:
        return np.empty((rows, dim), dtype=dtype)
    memmap_path.parent.mkdir(parents=True, exist_ok=True)
    cache = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=dtype, shape=(rows, dim))
    try:
        reserve_space(memmap_path, memmap_path.stat().st_size)
    except BaseException:
        del cache
        memmap_path.unlink(missing_ok=True)
        raise
    return cache


def cache_dtype(device: torch.device):
    """float16 on GPU (half the memory; mining distances are computed in float32), float32 on CPU."""
    return np.float16 if device.type == "cuda" else np.float32


class TripletBatches(Dataset):
    """Item ``i`` = ``(images, counts)`` of the ``i``-th batch: per query ``[q, p, n_1..n_k]`` images stacked, and
    the number of negatives of each query. Images with a side under ``min_side`` pixels (the model's stride) are
    refused."""

    def __init__(self, batches: list[list[Triplets]], split: Split, model_cfg: ModelConfig, *, min_side: int = 1):
        self.batches = batches
        self.db_files, self.q_files = split.db_files(), split.query_files()
        self.model_cfg = model_cfg
        self.min_side = int(min_side)

    def __len__(self) -> int:
        return len(self.batches)

    def loader(self, *, num_workers: int, pin_memory: bool = False):
        """The items in order, decoded by ``num_workers`` processes; an unreadable image raises its one-line
        :class:`NetVLADError` from the iteration, as without workers
        (:func:`netvlad_core.datasets.images.checked_loader`)."""
        from ..datasets.images import checked_loader

        return checked_loader(self, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)

    def _load(self, path: Path) -> torch.Tensor:
        m = self.model_cfg
        return load_image(path, m.input_height, m.input_width, m.mean, m.std, min_side=self.min_side)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, counts = [], []
        for t in self.batches[i]:
            images.append(self._load(self.q_files[t.query]))
            images.append(self._load(self.db_files[t.positive]))
            images.extend(self._load(self.db_files[n]) for n in t.negatives)
            counts.append(len(t.negatives))
        return torch.stack(images), torch.tensor(counts, dtype=torch.int64)


class CachedTripletBatches:
    """:class:`TripletBatches` from the trunk cache: item ``i`` = ``(activations, counts)`` of the ``i``-th batch,
    the frozen trunk's cached output for ``[q, p, n_1..n_k]`` of each query instead of the decoded images."""

    def __init__(self, batches: list[list[Triplets]], cache):
        self.batches = batches
        self.cache = cache

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, counts = [], []
        for t in self.batches[i]:
            rows.append(self.cache.rows("train_q", [t.query]))
            rows.append(self.cache.rows("train_db", [t.positive, *t.negatives]))
            counts.append(len(t.negatives))
        return self.cache.activations(np.concatenate(rows)), torch.tensor(counts, dtype=torch.int64)

    def loader(self, **_):
        return (self[i] for i in range(len(self)))


def train_step(model, optimizer, scaler, images: torch.Tensor, counts: torch.Tensor, device: torch.device,
                cfg: TrainConfig) -> tuple[float, int]:
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        desc = model(to_device(images, device))
    loss, num_triplets = batch_loss(desc.float(), counts.tolist(), margin=cfg.mining.margin, loss=cfg.mining.loss)
    backward_and_step(loss, optimizer, scaler)
    return float(loss.detach()), num_triplets


def distributed_train_step(ddp_model, optimizer, scaler, images: torch.Tensor | None, counts: torch.Tensor | None,
                            device: torch.device, cfg: TrainConfig, *, model_cfg: ModelConfig, dist: DistContext,
                            num_triplets: int, blank_shape: tuple[int, ...] | None = None) -> float:
    """One optimisation step of a global batch under DistributedDataParallel: this rank's queries (``images``,
    ``counts``; ``None`` when the batch has fewer queries than there are ranks) give the loss
    ``Σ its triplet losses / num_triplets`` (the global batch's triplet count); the summed gradients are then the
    single-process gradient of the batch's mean loss. Returns the global batch's loss (all ranks)."""
    optimizer.zero_grad(set_to_none=True)
    if images is None:
        # Nothing to train on here, but every rank must join the gradient all-reduce: one blank image whose
        # output is multiplied by 0 gives every trainable parameter a zero gradient.
        with autocast(device, cfg.amp):
            shape = blank_shape or (1, 3, model_cfg.input_height, model_cfg.input_width)
            desc = ddp_model(to_device(torch.zeros(*shape), device))
        local = desc.float().sum() * 0.0
    else:
        with autocast(device, cfg.amp):
            desc = ddp_model(to_device(images, device))
        local = batch_loss_sum(desc.float(), counts.tolist(), margin=cfg.mining.margin, loss=cfg.mining.loss)
    loss = local / max(num_triplets, 1)
    backward_and_step(loss, optimizer, scaler)
    return float(all_reduce_sum(float(loss.detach()), dist, what="summing the loss")[0])


def _refresh_and_mine(recipe: TripletRecipe, run, state: TrainState, block: np.ndarray) -> list[Triplets | None]:
    """Cache refresh (every database image and the block's queries, current weights; sharded under torchrun) and
    mining of the whole block at once (rank 0, which sends the triplets to every rank): one entry per query of
    the block, ``None`` for a skipped one. The mining counts go to the recipe state's ``epoch_stats``."""
    cfg, split, model = run.cfg, run.train_split, state.model
    out_dim, dtype = int(model.out_dim), cache_dtype(run.device)
    if recipe.db_cache is None and run.is_main:  # under torchrun only rank 0 keeps the cache and mines
        recipe.db_cache = allocate_cache(split.num_db, out_dim, dtype, recipe.memmap_path(run))
    q_out = np.empty((len(block), out_dim), dtype) if run.is_main else None
    if run.trunk_cache is not None:  # the trainable part on the cached trunk activations
        from ..trunk_cache import encode_cached

        cache = run.trunk_cache
        encode = functools.partial(encode_cached, run.part, cache, device=run.device, batch_size=cfg.encode_batch_size,
                                   amp=cfg.amp, progress=run.show, dist=run.dist)
        encode(cache.rows("train_db"), recipe.db_cache, desc="cache db")
        q_cache = encode(cache.rows("train_q", block), q_out, desc="cache queries")
    else:
        query_files = split.query_files()
        encode = functools.partial(encode_into, model, model_cfg=run.model_cfg, device=run.device,
                                   batch_size=cfg.encode_batch_size, num_workers=cfg.workers, amp=cfg.amp,
                                   progress=run.show, dist=run.dist)
        encode(split.db_files(), recipe.db_cache, desc="cache db")
        q_cache = encode([query_files[i] for i in block], q_out, desc="cache queries")
    mined = stats = None
    if run.is_main:
        try:
            mined, stats = mine_triplets(block, q_cache, recipe.db_cache, train_positives=recipe.gt.train_positives,
                                         positives=recipe.gt.positives,
                                         negative_cache=state.recipe_state.negative_cache, rng=state.rng,
                                         cfg=cfg.mining, device=run.device)
        except NonFiniteDistances as e:
            raise descriptor_error(e, split, query_ids=block) from None
    if run.distributed:
        mined, stats = broadcast_object((mined, stats), run.dist, what="sending the mined triplets")
    state.recipe_state.epoch_stats.add(stats)
    return mined


def _train_block(run, state: TrainState, mined: list[Triplets | None], bar) -> None:
    """The optimisation steps of a block: batches of ``batch_size`` consecutive queries (skipped ones drop out; a
    batch with none left is no step), each rank training on its contiguous slice of every batch."""
    cfg = run.cfg
    groups = [mined[i:i + cfg.batch_size] for i in range(0, len(mined), cfg.batch_size)]
    batches = [[t for t in g if t is not None] for g in groups]
    # this rank's slice of each global batch (all of it in a single process)
    parts = [[b[i] for i in shard_indices(len(b), run.dist.rank, run.dist.world_size)] for b in batches] \
        if run.distributed else batches
    nonempty = [p for p in parts if p]
    if run.trunk_cache is not None:  # cached trunk activations instead of decoded images
        batches_of = CachedTripletBatches(nonempty, run.trunk_cache)
    else:
        batches_of = TripletBatches(nonempty, run.train_split, run.model_cfg,
                                    min_side=int(getattr(state.model, "stride", None) or 1))
    loaded = iter(batches_of.loader(num_workers=min(cfg.workers, len(nonempty)), pin_memory=run.device.type == "cuda"))
    for group, triplets, part in zip(groups, batches, parts):
        if triplets:
            images, counts = next(loaded) if part else (None, None)
            lr = state.optimizer.param_groups[0]["lr"]
            loss = run.step(images, counts, triplets)
            run.after_step(state)
            violating = sum(len(t.negatives) for t in triplets)
            run.log_row(state, {"train/loss": loss,
                                "train/violating_fraction": violating / (len(triplets) * cfg.mining.num_negatives),
                                "train/lr": lr})
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(len(group))


@dataclass(eq=False)
class TripletState:
    """The triplet recipe's checkpointed state."""

    negative_cache: np.ndarray  # (train queries, num_negatives) int64, -1 = empty
    skipped_queries: int = 0  # over the finished epochs
    epoch_stats: MiningStats = field(default_factory=MiningStats)  # the epoch in progress, so far

    def to_checkpoint(self) -> dict:
        return {"negative_cache": torch.from_numpy(self.negative_cache.copy()), "skipped_queries": self.skipped_queries,
                "epoch_stats": asdict(self.epoch_stats)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TripletState:
        return cls(negative_cache=saved["negative_cache"].numpy().copy(),
                   skipped_queries=int(saved["skipped_queries"]),
                   epoch_stats=MiningStats(**{k: int(v) for k, v in saved["epoch_stats"].items()}))


def usable_queries(split: Split, gt: GroundTruth) -> np.ndarray:
    """The train queries with a database image within the training radius; splits that cannot be trained on with
    triplets are refused."""
    if gt is None or len(gt.train_positives) != split.num_queries:
        have = "no" if gt is None else len(gt.train_positives)
        raise NetVLADError(f"train split {split.name!r}: ground truth has {have} queries but the "
                           f"manifest {split.num_queries}")
    usable = np.array([i for i, p in enumerate(gt.train_positives) if len(p)], dtype=np.int64)
    if len(usable) == 0:
        raise NetVLADError(f"train split {split.name!r}: no query has a database image within "
                           f"{split.train_pos_dist_thr:g} m, nothing to train on")
    if split.num_db < 2:
        raise NetVLADError(f"train split {split.name!r}: needs at least 2 database images")
    return usable


class TripletRecipe(Recipe):
    """The paper's recipe (see the module docstring)."""

    name = "triplet"
    unit = "query"

    def __init__(self, cfg: TrainConfig, split: Split, gt: GroundTruth):
        super().__init__(cfg, split)
        self.gt = gt
        self.usable = usable_queries(split, gt)
        self.db_cache: np.ndarray | None = None  # allocated at the first refresh, on rank 0

    def memmap_path(self, run) -> Path | None:
        return run.checkpoint_path.parent / "db_cache.npy" if self.cfg.cache_memmap else None

    def checkpoint_bytes(self, model: torch.nn.Module) -> int:
        return checkpoint_bytes(model, self.split.num_queries, self.cfg.mining.num_negatives,
                                moments=2 if self.cfg.optimizer == "adamw" else 1)

    def steps_per_epoch(self) -> int:
        queries = len(self.epoch_order(0))
        return -(-queries // self.cfg.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.usable, self.cfg.seed, epoch, self.cfg.max_queries_per_epoch)

    def fresh_state(self) -> TripletState:
        return TripletState(negative_cache=empty_negative_cache(self.split.num_queries, self.cfg.mining.num_negatives))

    def state_from_checkpoint(self, saved: dict) -> TripletState:
        return TripletState.from_checkpoint(saved)

    def step_function(self, run, net: torch.nn.Module, optimizer, scaler, blank_shape: tuple[int, ...]):
        return step_function(net, optimizer, scaler, self.cfg, run.device, run.model_cfg, run.dist, blank_shape)

    def train_epoch(self, run, state: TrainState) -> None:
        """The rest of the epoch from ``state.position``, one refresh block after the other: a checkpoint (except
        before the epoch's first block, whose state the previous epoch-end checkpoint holds), refresh and mine,
        train."""
        from tqdm import tqdm

        cfg = self.cfg
        with tqdm(total=len(state.order), initial=state.position, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                  unit="query", disable=not run.show) as bar:
            while state.position < len(state.order):
                if state.position > 0:
                    run.save_checkpoint(state)
                block = state.order[state.position:state.position + cfg.cache_refresh_rate]
                mined = _refresh_and_mine(self, run, state, block)
                _train_block(run, state, mined, bar)
                state.position += len(block)
                if isinstance(self.db_cache, np.memmap):
                    self.db_cache.flush()

    def end_epoch(self, state: TrainState) -> tuple[dict[str, float], str]:
        own: TripletState = state.recipe_state
        stats = own.epoch_stats
        own.skipped_queries += stats.skipped
        own.epoch_stats = MiningStats()
        return ({"train/skipped_queries": stats.skipped, "train/epoch_violating_fraction": stats.violating_fraction},
                f"{stats.skipped} of {stats.queries} queries skipped")

    def skipped(self, state: TrainState) -> int:
        return state.recipe_state.skipped_queries

    def cleanup(self, run) -> None:
        path = self.memmap_path(run)
        if path is not None:
            self.db_cache = None
            path.unlink(missing_ok=True)


def step_function(model: torch.nn.Module, optimizer, scaler, cfg: TrainConfig, device: torch.device,
                  model_cfg: ModelConfig, dist: DistContext | None, blank_shape: tuple[int, ...] | None = None):
    """The step of a run, chosen once: :func:`train_step` in a single process; under torchrun
    :func:`distributed_train_step` on the model wrapped (here, once) by :func:`.ddp.wrap_ddp`. ``model`` is the
    whole model on images, or its trainable part on trunk activations; ``blank_shape`` is the shape of the blank
    input a rank without a query runs (one image by default). The step: (this rank's images, counts; ``None`` when
    it has no query of the batch, the batch's triplets) -> the batch's loss."""
    if dist is None or not dist.enabled:
        def step(images, counts, triplets):
            return train_step(model, optimizer, scaler, images, counts, device, cfg)[0]

        return step
    ddp_model = wrap_ddp(model, device)

    def distributed_step(images, counts, triplets):
        return distributed_train_step(ddp_model, optimizer, scaler, images, counts, device, cfg, model_cfg=model_cfg,
                                      dist=dist, num_triplets=sum(len(t.negatives) for t in triplets),
                                      blank_shape=blank_shape)

    return distributed_step
