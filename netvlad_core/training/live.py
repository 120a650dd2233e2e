"""DVCLive files travel with the checkpoint, so a resumed run's curves equal an uninterrupted run's."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NetVLADError

#: What each key of the training summary (``<live-dir>/metrics.json``, DVCLive; the per-step and per-epoch curves
#: under ``plots/metrics/`` carry the same names) means; ``N`` stands for a recall N. The documentation's metrics
#: reference is generated from it.
METRIC_KEYS = {
    "step": "optimisation steps taken",
    "epoch": "epochs completed",
    "train/loss": "the last step's loss (triplet: summed margin violations; places: multi-similarity loss)",
    "train/lr": "the learning rate of the last step",
    "train/violating_fraction": "triplet recipe: fraction of the step's mined negatives that violate the margin",
    "train/epoch_violating_fraction": "triplet recipe: the same over the last epoch",
    "train/skipped_queries": "triplet recipe: queries of the last epoch skipped for want of a positive or of a "
                             "violating negative",
    "train/positive_pairs": "places recipe: positive pairs the miner kept in the last batch",
    "train/negative_pairs": "places recipe: negative pairs the miner kept in the last batch",
    "train/epoch_loss": "places recipe: mean loss of the last epoch",
    "val/recall@N": "recall@N on the val split after the last epoch",
    "best/recall@N": "val recall@N of the best epoch (by recall@`best-by`), the model `train` writes",
    "best/epoch": "the best epoch",
}

_LIVE_SUMMARY_FILES = ("metrics.json", "params.yaml")


def _live_history_paths(live_dir: Path) -> list[Path]:
    """The DVCLive files that hold the curves and the summary: metrics.json, params.yaml, plots/metrics/**/*.tsv."""
    paths = [live_dir / name for name in _LIVE_SUMMARY_FILES]
    paths += sorted((live_dir / "plots" / "metrics").rglob("*.tsv"))
    return [p for p in paths if p.is_file()]


def live_history(live_dir: str | os.PathLike) -> dict[str, str]:
    """DVCLive's files in ``live_dir`` as ``{relative posix path: text}`` (metrics.json, params.yaml and every
    .tsv under plots/metrics), for the checkpoint: strings load with ``weights_only=True``."""
    live_dir = Path(live_dir)
    files = {}
    for p in _live_history_paths(live_dir):
        with open(p, encoding="utf-8", newline="") as f:
            files[p.relative_to(live_dir).as_posix()] = f.read()
    return files


def restore_live_history(live_dir: str | os.PathLike, files: dict[str, str]) -> None:
    """Make ``live_dir``'s DVCLive files exactly ``files`` (from :func:`live_history`): files of that kind not in it
    (rows logged after the checkpoint, or a folder `dvc repro` emptied) are removed, the others (re)written, each
    atomically. Called before DVCLive opens the folder, so a resumed run's curves equal an uninterrupted run's."""
    live_dir = Path(live_dir)
    for p in _live_history_paths(live_dir):
        if p.relative_to(live_dir).as_posix() not in files:
            p.unlink()
    for rel, text in files.items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise NetVLADError(f"checkpoint: bad DVCLive file name {rel!r}")
        target = live_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.restore.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, target)


class NoLive:
    """What ranks other than 0 log to: nothing (only rank 0 writes DVCLive files)."""

    def __init__(self) -> None:
        self.step = 0
        self.summary: dict = {}

    def log_metric(self, *args, **kwargs) -> None:
        pass

    def log_params(self, *args, **kwargs) -> None:
        pass

    def next_step(self) -> None:
        self.step += 1

    def end(self) -> None:
        pass
