"""Stage `train`: weakly supervised triplet training from the k-means-initialised model (resumable)."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import run, user_errors


@user_errors
def main(
    init_model: Path = typer.Option(..., help="Model file written by `kmeans` (the off-the-shelf, k-means-initialised model)."),
    train_split: Path = typer.Option(..., help="Split folder to mine triplets from (e.g. data/synthetic/train)."),
    val_split: Path = typer.Option(..., help="Split folder for the per-epoch recall@N (e.g. data/synthetic/val)."),
    out: Path = typer.Option(..., help="Output model file: the best epoch by validation recall@5, written when training ends (an interrupted run leaves none)."),
    live_dir: Path = typer.Option(Path("metrics/train"), help="DVCLive folder for the training curves."),
    checkpoint_dir: Path = typer.Option(Path("checkpoints/train"), help="Folder of the resume checkpoint (keep it out of DVC outputs); emptied after a successful finish."),
    epochs: int = typer.Option(30, help="Maximum number of epochs."),
    lr: float = typer.Option(1e-4, help="SGD learning rate."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    weight_decay: float = typer.Option(1e-3, help="SGD weight decay."),
    lr_step: int = typer.Option(5, help="Multiply the learning rate by lr-gamma every this many epochs."),
    lr_gamma: float = typer.Option(0.5, help="Learning-rate factor applied every lr-step epochs."),
    batch_size: int = typer.Option(4, help="Queries per optimisation step (each with its positive and negatives)."),
    margin: float = typer.Option(0.1, help="Triplet margin m in squared-distance units (the sqrt loss uses sqrt(m))."),
    loss: str = typer.Option("squared", help="squared: sum max(0, |q-p|^2 + m - |q-n|^2) (MATLAB); sqrt: non-squared distances, margin sqrt(m) (PyTorch port)."),
    num_negatives: int = typer.Option(10, help="Hardest negatives kept per query (those violating the margin train)."),
    num_negatives_sampled: int = typer.Option(1000, help="Random negatives (farther than the positive radius) drawn per query."),
    cache_refresh_rate: int = typer.Option(1000, help="Queries between descriptor-cache refreshes (and checkpoints)."),
    patience: int = typer.Option(10, help="Stop after this many epochs without a better validation recall@5 (0 = never)."),
    trainable_blocks: str = typer.Option("keep", help="Freeze boundary: number of trainable backbone units counted from the end (-1 all, 0 none); 'keep' (or null) keeps the initial model's."),
    seed: int = typer.Option(0, help="Seed of the query order and the negative sampling."),
    max_queries_per_epoch: int = typer.Option(0, help="Train on at most this many queries per epoch (0 = all)."),
    encode_batch_size: int = typer.Option(16, help="Images per forward pass when refreshing the cache and validating."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding images."),
    cache_memmap: bool = typer.Option(False, help="Keep the database descriptor cache in a memory-mapped file in the checkpoint dir instead of RAM."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    amp: str = typer.Option("bf16", help="Autocast dtype on GPU: bf16, fp16 or fp32 (ignored on CPU)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    dist_timeout: float = typer.Option(600.0, help="Under torchrun: seconds a process waits for the others in a collective before failing with an error (a dead or stuck peer)."),
) -> None:
    """Train the place model with triplets mined from the train split (best positive within 10 m in feature space,
    hard negatives beyond 25 m); keep the best epoch by validation recall@5. Rerunning after an interruption
    resumes from the last checkpoint, curves included; a checkpoint made with other parameters, another initial
    model or other split contents or image files (size, mtime) is ignored with a notice.
    Under torchrun each process takes a share of every batch (batch-size is the global batch) and rank 0 writes."""
    from netvlad_core.datasets.manifest import load_ground_truth, load_split
    from netvlad_core.distributed import distributed_session
    from netvlad_core.io import distinct_paths
    from netvlad_core.models import load_model
    from netvlad_core.training import TrainConfig, apply_trainable_blocks, parse_trainable_blocks, train

    distinct_paths({"--init-model": init_model}, {"--out": out})
    cfg = TrainConfig(
        epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma,
        batch_size=batch_size, margin=margin, loss=loss, num_negatives=num_negatives,
        num_negatives_sampled=num_negatives_sampled, cache_refresh_rate=cache_refresh_rate, patience=patience,
        seed=seed, max_queries_per_epoch=max_queries_per_epoch, encode_batch_size=encode_batch_size,
        workers=workers, amp=amp, cache_memmap=cache_memmap,
    )
    cfg.validate()
    train_data, val_data = load_split(train_split), load_split(val_split)
    train_gt, val_gt = load_ground_truth(train_split), load_ground_truth(val_split)
    model, model_cfg = load_model(init_model)
    blocks = parse_trainable_blocks(trainable_blocks)
    if blocks is not None:
        model_cfg = apply_trainable_blocks(model, model_cfg, blocks)
    with distributed_session(device, dist_timeout) as dist:
        result = train(model, model_cfg, train_data, train_gt, val_data, val_gt, out=out, live_dir=live_dir,
                       checkpoint_dir=checkpoint_dir, cfg=cfg, device=dist.device, progress=progress,
                       log=lambda msg: typer.echo(msg, err=True), dist=dist)
    if not dist.is_main:
        return
    r = result.best_recall
    typer.echo(f"train: best epoch {result.best_epoch} of {result.epochs_run} (R@1 {100 * r[1]:.1f} R@5 {100 * r[5]:.1f} "
               f"R@10 {100 * r[10]:.1f} on {val_data.name}){' early stop' if result.stopped_early else ''}"
               f"{', resumed' if result.resumed else ''}{f', {dist.world_size} processes' if dist.enabled else ''} -> {out}")


if __name__ == "__main__":
    run(main)
