"""Localise new photos: encode them with the final model, search a split's database features, estimate a position.

The database is a features file written by the ``features`` stage for a split folder (``manifest.load_split``);
it must have been made by the same model (its ``model_fingerprint`` attribute, or at least its dimension, is
checked) and have one row per database image of the split. The position estimate is
:func:`netvlad_core.retrieval.estimate_positions` over the top matches (UTM metres).

A photo that cannot be read is reported as an :class:`ImageFailure` and skipped; the others are answered.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import option
from .datasets.images import load_image
from .datasets.manifest import Split, load_split
from .device import prepare_model
from .errors import NetVLADError, NetVLADWarning
from .models.build import ModelConfig
from .retrieval import WEIGHTINGS, NonFiniteDistances, estimate_positions, exact_search


@dataclass
class LocalizeConfig:
    """How to answer: ``top_k`` matches listed per photo, the ``localisation_k`` best of them averaged with
    ``weighting`` (``uniform``, ``inverse_distance`` or ``softmax`` at ``temperature``), ``batch_size`` photos
    per forward pass."""

    top_k: int = option(5, "Database matches listed per photo.")
    localisation_k: int = option(1, "Top matches averaged into the position estimate.")
    weighting: str = option("uniform", "Weights of those matches: uniform, inverse_distance or softmax.")
    temperature: float = option(0.1, "Temperature of the softmax weighting (squared descriptor distance).")
    batch_size: int = option(16, "Photos per forward pass.")

    def validate(self) -> None:
        """Raise :class:`NetVLADError` for values that cannot work."""
        if self.top_k < 1:
            raise NetVLADError(f"top-k must be at least 1, got {self.top_k}")
        if self.localisation_k < 1:
            raise NetVLADError(f"localisation-k must be at least 1, got {self.localisation_k}")
        if self.weighting not in WEIGHTINGS:
            raise NetVLADError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not self.temperature > 0:
            raise NetVLADError(f"temperature must be positive, got {self.temperature}")
        if self.batch_size < 1:
            raise NetVLADError(f"batch-size must be at least 1, got {self.batch_size}")


@dataclass
class Match:
    """One database image retrieved for a photo (rank 1 = nearest)."""

    rank: int
    db_index: int
    path: str
    squared_distance: float
    utm_east: float
    utm_north: float


@dataclass
class Localization:
    """The answer for one photo: its matches, best first, and the estimated position (UTM metres)."""

    image: str
    utm_east: float
    utm_north: float
    matches: list[Match] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return {
            "image": self.image,
            "position": {"utm_east": self.utm_east, "utm_north": self.utm_north},
            "matches": [vars(m).copy() for m in self.matches],
        }


@dataclass
class ImageFailure:
    """A photo that was not answered, with the one-line reason (``<path>: cannot decode image (...)``)."""

    image: str
    message: str


def load_database(features_h5: str | os.PathLike, split: Split, model: torch.nn.Module) -> np.ndarray:
    """The split's database descriptors (``(num_db, D)``) from a features file, in the file's dtype (a float16 file
    stays float16: :func:`netvlad_core.retrieval.exact_search` upcasts it block by block), after checking that the
    file belongs to ``split`` (row counts, names, finite values) and was made by ``model`` (the weights'
    fingerprint when the file records one, and the descriptor dimension)."""
    from .evaluation import open_features
    from .features import model_fingerprint

    path = Path(features_h5)
    with open_features(path, split) as (db, _query):
        dim = int(db.shape[1])
        attrs = dict(db.file.attrs)
        rows = np.asarray(db[()])
    out_dim = int(getattr(model, "out_dim", dim))
    if dim != out_dim:
        raise NetVLADError(f"{path}: database descriptors are {dim}-D but the model gives {out_dim}-D descriptors "
                           f"(features made by another model?)")
    recorded = attrs.get("model_fingerprint")
    if isinstance(recorded, bytes):
        recorded = recorded.decode()
    if recorded is None:
        warnings.warn(f"{path}: no model fingerprint recorded; only the descriptor dimension was checked",
                      NetVLADWarning)
    elif recorded != model_fingerprint(model):
        raise NetVLADError(f"{path}: features were made by another model (fingerprint {str(recorded)[:12]}… does not "
                           f"match the model's); rerun the features stage with this model")
    return rows


def _read_images(files: Sequence[Path], height: int, width: int, mean, std, *, min_side: int = 1
                 ) -> tuple[list[tuple[int, torch.Tensor]], list[ImageFailure]]:
    good, failures = [], []
    for i, f in enumerate(files):
        try:
            good.append((i, load_image(Path(f), height, width, mean, std, min_side=min_side)))
        except NetVLADError as e:
            failures.append(ImageFailure(str(f), str(e)))
    return good, failures


@torch.inference_mode()
def localize(model: torch.nn.Module, model_cfg: ModelConfig, images: Sequence[str | os.PathLike],
             database_h5: str | os.PathLike, split_dir: str | os.PathLike, *, device: torch.device,
             cfg: LocalizeConfig | None = None) -> tuple[list[Localization], list[ImageFailure]]:
    """Answer every readable photo in ``images``: its ``cfg.top_k`` nearest database images of the split in
    ``split_dir`` (searched in ``database_h5``) and a position estimate; unreadable photos come back as failures.

    ``model_cfg`` gives the input size and normalisation (``input_height``, ``input_width``, ``mean``, ``std``).
    The model runs in float32. Errors in the model, the features file or the split raise :class:`NetVLADError`.
    """
    cfg = cfg or LocalizeConfig()
    cfg.validate()
    if not images:
        raise NetVLADError("no images given to localize")
    split = load_split(split_dir)
    if split.num_db == 0:
        raise NetVLADError(f"{split_dir}: split has no database images")
    model = prepare_model(model, device).eval()
    db = load_database(database_h5, split, model)

    height, width = int(model_cfg.input_height), int(model_cfg.input_width)
    good, failures = _read_images([Path(p) for p in images], height, width, model_cfg.mean,
                                  model_cfg.std, min_side=int(getattr(model, "stride", None) or 1))
    if not good:
        return [], failures
    descriptors = []
    for start in range(0, len(good), cfg.batch_size):
        batch = torch.stack([t for _, t in good[start:start + cfg.batch_size]]).to(device)
        descriptors.append(model(batch).float().cpu().numpy())
    queries = np.concatenate(descriptors)
    if not np.isfinite(queries).all():
        raise NetVLADError("the model produced NaN/inf descriptors for the photos")

    k = max(cfg.top_k, cfg.localisation_k)
    try:
        distances, indices = exact_search(db, queries, k, device=device)
    except NonFiniteDistances as e:
        raise e.located(str(database_h5 if e.role == "database" else images[good[e.row][0]])) from None
    estimates = estimate_positions(indices, distances, split.db_utm, min(cfg.localisation_k, indices.shape[1]),
                                   cfg.weighting, temperature=cfg.temperature)
    results = []
    for row, (i, _) in enumerate(good):
        matches = [
            Match(rank=r + 1, db_index=int(j), path=split.db_paths[j], squared_distance=float(distances[row, r]),
                  utm_east=float(split.db_utm[j, 0]), utm_north=float(split.db_utm[j, 1]))
            for r, j in enumerate(indices[row, :cfg.top_k]) if j >= 0
        ]
        results.append(Localization(image=str(images[i]), utm_east=float(estimates[row, 0]),
                                    utm_north=float(estimates[row, 1]), matches=matches))
    return results, failures


def format_localization(result: Localization) -> str:
    """Human-readable lines: the estimate, then one line per match; positions rounded to 0.1 m and squared
    distances to 4 decimals (:func:`results_json` keeps full precision)."""
    lines = [f"{result.image}: position E {result.utm_east:.1f} N {result.utm_north:.1f}"]
    for m in result.matches:
        lines.append(f"  {m.rank:>3}. {m.path}  d²={m.squared_distance:.4f}  E {m.utm_east:.1f} N {m.utm_north:.1f}")
    return "\n".join(lines)


def results_json(results: Sequence[Localization]) -> str:
    """One strict JSON document: a list with one object per answered photo, numbers at full precision (``repr``)."""
    return json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False)


def localize_files(model_file: str | os.PathLike, images: Sequence[str | os.PathLike], database_h5: str | os.PathLike,
                   split_dir: str | os.PathLike, *, cfg: LocalizeConfig, device: str = "auto", as_json: bool = False
                   ) -> tuple[str, list[str], int]:
    """The ``localize`` command: :func:`localize` with the model in ``model_file``; returns what to print on stdout
    (the answers, as text or one JSON document), the ``error:`` lines for stderr (one per unreadable photo) and
    the exit status: 0 every photo answered, 1 some could not be read, 2 none could be."""
    from .device import select_device
    from .models import load_model

    net, model_cfg = load_model(model_file)
    results, failures = localize(net, model_cfg, images, database_h5, split_dir,
                                 device=select_device(device), cfg=cfg)
    errors = [f"error: {failure.message}" for failure in failures]
    text = results_json(results) if as_json else "\n".join(format_localization(r) for r in results)
    if not results:
        errors.append(f"error: none of the {len(failures)} photo(s) could be read")
    return text, errors, 2 if not results else (1 if failures else 0)
