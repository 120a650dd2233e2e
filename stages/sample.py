"""Stage `sample`: local descriptors from random train-database images, for k-means."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import run, user_errors


@user_errors
def main(
    split_dir: Path = typer.Option(..., help="Split folder written by `download` (e.g. data/synthetic/train)."),
    out: Path = typer.Option(..., help="Output HDF5 with the sampled descriptors (float32) and their provenance."),
    backbone: str = typer.Option("efficientnet_lite0", help="Backbone: vgg16, alexnet, resnet18/50[_layer3|_layer4], efficientnet_lite0, timm:<name>."),
    weights: str = typer.Option("imagenet", help="Backbone weights: imagenet, none, or a local state-dict file."),
    input_height: int = typer.Option(240, help="Images are resized to this height (pixels)."),
    input_width: int = typer.Option(320, help="Images are resized to this width (pixels)."),
    num_descriptors: int = typer.Option(50_000, help="Total number of local descriptors to sample."),
    per_image: int = typer.Option(100, help="Descriptors sampled per image (at most the feature-map locations)."),
    seed: int = typer.Option(0, help="Seed for choosing images and locations, and of the backbone's random initialisation with --weights none (recorded in the model config as init_seed)."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding images."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    dist_timeout: float = typer.Option(600.0, help="Under torchrun: seconds a process waits for the others in a collective before failing with an error (a dead or stuck peer)."),
) -> None:
    """Sample local descriptors (L2-normalised, as the NetVLAD layer sees them) from random database images."""
    from netvlad_core.clustering import SampleConfig, sample_descriptors
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.distributed import broadcast_module, distributed_session, local_main_first
    from netvlad_core.models import ModelConfig, build_model

    if not 0 <= seed < 2**63:
        from netvlad_core.errors import NetVLADError

        raise NetVLADError(f"seed must be an integer between 0 and 2**63 - 1, got {seed}")
    model_cfg = ModelConfig(backbone=backbone, weights=weights, input_height=input_height, input_width=input_width,
                            init_seed=seed)
    model_cfg.validate()
    cfg = SampleConfig(num_descriptors=num_descriptors, per_image=per_image, seed=seed, batch_size=batch_size,
                       num_workers=workers)
    cfg.validate()
    split = load_split(split_dir)
    with distributed_session(device, dist_timeout) as dist:
        with local_main_first(dist):  # one process per node fills the weights cache, the others then read it
            model = build_model(model_cfg)
        broadcast_module(model, dist)  # the same weights on every rank (weights none: random initialisation)
        sample_descriptors(model, model_cfg.to_dict(), split, out, device=dist.device, cfg=cfg, progress=progress,
                           dist=dist)
        if dist.is_main:
            typer.echo(f"sample: {out} ({num_descriptors} descriptors requested from {split.name}, backbone "
                       f"{backbone})")


if __name__ == "__main__":
    run(main)
