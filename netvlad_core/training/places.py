"""Today's recipe (GSV-Cities, MixVPR, SALAD, SuperPlace): batches of P places × K images, pytorch-metric-learning's
multi-similarity loss on the pairs its multi-similarity miner keeps, no descriptor cache to refresh.

The places are GSV-Cities' or the places view of any split with UTM (:mod:`netvlad_core.datasets.places`). An epoch
visits the places in an order drawn from ``(seed, epoch)``, cut to whole batches of P (``max_batches_per_epoch``
caps them); a batch holds exactly K images of each of its P distinct places, drawn without replacement from the
place's images by a generator seeded with ``(seed, epoch, place)``, labelled by place. The loss is
``MultiSimilarityLoss(alpha, beta, base)(descriptors, labels, MultiSimilarityMiner(epsilon)(descriptors, labels))``
(cosine similarity of the L2-normalised descriptors; GSV-Cities' defaults α = 1, β = 50, base = 0, ε = 0.1).
Optional augmentation (``augment: randaugment``, torchvision's RandAugment with 3 ops) applies to the decoded
images, each with its own seed from ``(seed, epoch, batch, image)``. Everything a batch needs is a function of the
seed, the epoch and the batch's position, so a checkpoint (every ``checkpoint_every`` batches and at each epoch's
end) resumes bit for bit on CPU.

With the trunk cache the train images are the cache's train rows (the split's database images, then its queries)
and a step runs only the trainable part on their cached activations; the cache holds no augmentation, so
``augment`` other than none turns the cache off (``trunk-cache auto``, with a notice) or is an error (``on``).

Under torchrun P is the global batch: each rank encodes a contiguous slice of the batch's P × K images, then the
descriptors of all ranks are gathered (``all_gather``) and every rank runs the miner and the loss on the whole
batch, its own slice carrying the gradient and the others' as constants. The miner sees the single-process batch
and mines the same pairs; with gradients summed over the ranks (:mod:`.ddp`) a step equals the single-process step
up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..datasets.images import load_image
from ..datasets.manifest import Split
from ..device import autocast, to_device
from ..distributed import DistContext, shard_indices
from ..errors import NetVLADError
from ..models.build import ModelConfig
from .config import TrainConfig
from .ddp import backward_and_step, wrap_ddp
from .loop import epoch_permutation
from .recipe import Recipe
from .state import TrainState


def multi_similarity(cfg) -> tuple:
    """pytorch-metric-learning's ``MultiSimilarityMiner(epsilon)`` and ``MultiSimilarityLoss(alpha, beta, base)``
    (``cfg``: a :class:`~.config.PlacesConfig`)."""
    from pytorch_metric_learning import losses, miners

    return (miners.MultiSimilarityMiner(epsilon=cfg.miner_epsilon),
            losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base))


def ms_loss(miner, loss_fn, desc: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The multi-similarity loss of ``desc`` on the pairs the miner keeps, and the numbers of positive and negative
    pairs it kept."""
    pairs = miner(desc, labels)
    return loss_fn(desc, labels, pairs), int(len(pairs[0])), int(len(pairs[2]))


def place_batch(members: list[np.ndarray], places: np.ndarray, k: int, seed: int, epoch: int) -> np.ndarray:
    """The image indices of a batch: ``k`` images of each place of ``places`` (in that order), drawn without
    replacement by a generator seeded with ``(seed, epoch, place)``."""
    return np.concatenate([np.random.default_rng([seed, epoch, int(p)]).choice(members[p], size=k, replace=False)
                           for p in places])


def augment_image(image: torch.Tensor, model_cfg: ModelConfig, seed: int) -> torch.Tensor:
    """RandAugment (3 ops) of a normalised image, seeded with ``seed`` (the global RNG is left as it was)."""
    from torchvision.transforms import v2

    mean = torch.tensor(model_cfg.mean).view(3, 1, 1)
    std = torch.tensor(model_cfg.std).view(3, 1, 1)
    raw = ((image * std + mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        raw = v2.RandAugment(num_ops=3)(raw)
    return (raw.float() / 255.0 - mean) / std


class PlaceBatches(Dataset):
    """Item ``i`` = the decoded (and, with ``augment``, augmented) images of batch ``i`` of ``batches`` (image
    indices into ``files``)."""

    def __init__(self, batches: list[np.ndarray], files, model_cfg: ModelConfig, *, augment: bool, seeds: list[int],
                 min_side: int = 1):
        self.batches, self.files, self.model_cfg = batches, files, model_cfg
        self.augment, self.seeds, self.min_side = augment, seeds, int(min_side)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        m = self.model_cfg
        images = [load_image(self.files[j], m.input_height, m.input_width, m.mean, m.std, min_side=self.min_side)
                  for j in self.batches[i]]
        if self.augment:
            rng = np.random.default_rng([self.seeds[i], len(images)])
            images = [augment_image(x, m, int(s)) for x, s in zip(images, rng.integers(0, 2**62, len(images)))]
        return torch.stack(images)

    def loader(self, *, num_workers: int, pin_memory: bool = False):
        from ..datasets.images import checked_loader

        return checked_loader(self, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)


class CachedPlaceBatches:
    """:class:`PlaceBatches` from the trunk cache: image ``j`` is the cache's train row ``j`` (database rows, then
    the queries, which follow them)."""

    def __init__(self, batches: list[np.ndarray], cache):
        self.batches, self.cache = batches, cache

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache.activations(self.cache.rows("train_db", self.batches[i]))

    def loader(self, **_):
        return (self[i] for i in range(len(self)))


@dataclass(eq=False)
class PlacesState:
    """The places recipe's checkpointed state: the epoch's loss so far."""

    loss_sum: float = 0.0
    steps: int = 0

    def to_checkpoint(self) -> dict:
        return {"loss_sum": self.loss_sum, "steps": self.steps}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> PlacesState:
        return cls(loss_sum=float(saved["loss_sum"]), steps=int(saved["steps"]))


class PlacesRecipe(Recipe):
    """P × K place batches and the multi-similarity loss (see the module docstring)."""

    name = "places"
    unit = "place"

    def __init__(self, cfg: TrainConfig, split: Split, places=None):
        super().__init__(cfg, split)
        if places is None:
            from ..datasets.places import load_places

            places = load_places(None, split, cell_size_m=cfg.places.cell_size_m,
                                 heading_sectors=cfg.places.heading_sectors, min_images=cfg.places.images_per_place)
        self.places = places
        self.members = places.members()
        if min(len(m) for m in self.members) < cfg.places.images_per_place:
            raise NetVLADError(f"{places.describe()}: a place has fewer than {cfg.places.images_per_place} images")
        self.augments = cfg.places.augment != "none"
        if self.num_batches() < 1:
            raise NetVLADError(f"{places.describe()}: fewer places than places-per-batch "
                               f"{cfg.places.places_per_batch}: lower it")

    def num_batches(self) -> int:
        n = len(self.members) // self.cfg.places.places_per_batch
        return min(n, self.cfg.places.max_batches_per_epoch) if self.cfg.places.max_batches_per_epoch else n

    def data_fingerprint(self) -> str:
        return self.places.fingerprint()

    def steps_per_epoch(self) -> int:
        return self.num_batches()

    def epoch_order(self, epoch: int) -> np.ndarray:
        return epoch_permutation(np.arange(len(self.members)), self.cfg.seed, epoch,
                                 self.num_batches() * self.cfg.places.places_per_batch)

    def fresh_state(self) -> PlacesState:
        return PlacesState()

    def state_from_checkpoint(self, saved: dict) -> PlacesState:
        return PlacesState.from_checkpoint(saved)

    def step_function(self, run, net: torch.nn.Module, optimizer, scaler, blank_shape: tuple[int, ...]):
        return places_step_function(net, optimizer, scaler, self.cfg, run.device, run.dist, blank_shape)

    def batch(self, state: TrainState, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``b`` of the epoch: its image indices and their place labels."""
        p, k = self.cfg.places.places_per_batch, self.cfg.places.images_per_place
        places = state.order[b * p:(b + 1) * p]
        return place_batch(self.members, places, k, self.cfg.seed, state.epoch), np.repeat(places, k)

    def train_epoch(self, run, state: TrainState) -> None:
        """The rest of the epoch from ``state.position``: a checkpoint every ``checkpoint_every`` batches, a step
        per batch (this rank's slice of it under torchrun)."""
        from tqdm import tqdm

        p = self.cfg.places.places_per_batch
        first, total = state.position // p, len(state.order) // p
        batches = [self.batch(state, b) for b in range(first, total)]
        data = self._loader(run, state, [self._slice(run, images) for images, _ in batches], first)
        with tqdm(total=total, initial=first, desc=f"epoch {state.epoch + 1}/{self.cfg.epochs}", unit="batch",
                  disable=not run.show) as bar:
            for b, (_, labels) in enumerate(batches, first):
                if b > first and (b - first) % self.cfg.places.checkpoint_every == 0:
                    run.save_checkpoint(state)
                self._train_batch(run, state, next(data), torch.from_numpy(labels))
                state.position += p
                bar.update(1)

    def _slice(self, run, images: np.ndarray) -> np.ndarray:
        if not run.distributed:
            return images
        return images[shard_indices(len(images), run.dist.rank, run.dist.world_size)]

    def _loader(self, run, state: TrainState, parts: list[np.ndarray], first: int):
        if run.trunk_cache is not None:
            return iter(CachedPlaceBatches(parts, run.trunk_cache).loader())
        seeds = [int(np.random.default_rng([self.cfg.seed, state.epoch, b]).integers(0, 2**62))
                 for b in range(first, first + len(parts))]
        data = PlaceBatches(parts, self.places.files(), run.model_cfg, augment=self.augments, seeds=seeds,
                            min_side=int(getattr(state.model, "stride", None) or 1))
        return iter(data.loader(num_workers=min(self.cfg.workers, len(parts)), pin_memory=run.device.type == "cuda"))

    def _train_batch(self, run, state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> None:
        lr = state.optimizer.param_groups[0]["lr"]
        loss, positives, negatives = run.step(images, labels)
        run.after_step(state)
        state.recipe_state.loss_sum += loss
        state.recipe_state.steps += 1
        run.log_row(state, {"train/loss": loss, "train/positive_pairs": positives,
                            "train/negative_pairs": negatives, "train/lr": lr})

    def end_epoch(self, state: TrainState) -> tuple[dict[str, float], str]:
        own: PlacesState = state.recipe_state
        mean = own.loss_sum / max(own.steps, 1)
        summary = f"{own.steps} batches of {self.cfg.places.places_per_batch} places, mean loss {mean:.4f}"
        state.recipe_state = PlacesState()
        return {"train/epoch_loss": mean}, summary


def places_step_function(model: torch.nn.Module, optimizer, scaler, cfg: TrainConfig, device: torch.device,
                         dist: DistContext | None, blank_shape: tuple[int, ...]):
    """The step of a run, chosen once: (this rank's images of the batch, the whole batch's labels) -> (the batch's
    loss, positive pairs, negative pairs). Under torchrun the model is wrapped (here, once) in DDP with summed
    gradients and the descriptors of every rank gathered before the miner."""
    miner, loss_fn = multi_similarity(cfg.places)
    if dist is None or not dist.enabled:
        def step(images, labels):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, cfg.amp):
                desc = model(to_device(images, device))
            loss, positives, negatives = ms_loss(miner, loss_fn, desc.float(), labels.to(device))
            backward_and_step(loss, optimizer, scaler)
            return float(loss.detach()), positives, negatives

        return step
    ddp_model = wrap_ddp(model, device)

    def distributed_step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, cfg.amp):
            blank = images.shape[0] == 0  # fewer images than ranks: a blank one joins the all-reduce, weight 0
            desc = ddp_model(to_device(torch.zeros(*blank_shape) if blank else images, device)).float()
        full = gather_descriptors(desc[:0] if blank else desc, dist)
        loss, positives, negatives = ms_loss(miner, loss_fn, full, labels.to(device))
        backward_and_step(loss + (desc.sum() * 0.0 if blank else 0.0), optimizer, scaler)
        return float(loss.detach()), positives, negatives

    return distributed_step


def gather_descriptors(local: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """Every rank's descriptors of the batch, in rank order (contiguous slices), with this rank's own rows being
    ``local`` itself (they carry its gradient) and the others' constants."""
    import torch.distributed as torch_dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(dist.world_size)]
    torch_dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros(most, local.shape[1], dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local.detach()
    gathered = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch_dist.all_gather(gathered, padded)
    parts = [local if r == dist.rank else g[:int(s.item())] for r, (g, s) in enumerate(zip(gathered, sizes))]
    return torch.cat(parts)
