"""Stage `features`: global descriptors of a split's database and query images, cached in HDF5."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import run, user_errors


@user_errors
def main(
    model: Path = typer.Option(..., help="Model file (written by `kmeans`, `train` or `pca`)."),
    split_dir: Path = typer.Option(..., help="Split folder written by `download` (e.g. data/synthetic/test)."),
    out: Path = typer.Option(..., help="Output HDF5 with datasets `db` and `query`."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding images."),
    float16: bool = typer.Option(False, help="Store descriptors as float16 (half the disk) instead of float32."),
    amp: str = typer.Option("bf16", help="Autocast dtype on GPU: bf16, fp16 or fp32 (ignored on CPU)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    dist_timeout: float = typer.Option(600.0, help="Under torchrun: seconds a process waits for the others in a collective before failing with an error (a dead or stuck peer)."),
) -> None:
    """Encode every database and query image of a split. An interrupted run resumes where it stopped, if the model,
    the split (manifest rows, image root, image files' sizes and times) and the options are the same; otherwise it
    starts over. Under torchrun the images are shared out among the processes and rank 0 writes the file."""
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.distributed import distributed_session
    from netvlad_core.features import FeatureConfig, extract_split_features
    from netvlad_core.io import distinct_paths
    from netvlad_core.models import load_model

    distinct_paths({"--model": model}, {"--out": out})
    cfg = FeatureConfig(batch_size=batch_size, num_workers=workers, float16=float16, amp=amp)
    cfg.validate()
    split = load_split(split_dir)
    net, model_cfg = load_model(model)
    with distributed_session(device, dist_timeout) as dist:
        extract_split_features(net, model_cfg.to_dict(), split, out, device=dist.device, cfg=cfg,
                               progress=progress, dist=dist)
        if dist.is_main:
            typer.echo(f"features: {split.num_db} database + {split.num_queries} query descriptors -> {out}"
                       + (f" ({dist.world_size} processes)" if dist.enabled else ""))


if __name__ == "__main__":
    run(main)
