"""Stage `pca`: fit PCA whitening on train-database descriptors and write the final (whitened) model."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import run, user_errors


@user_errors
def main(
    model: Path = typer.Option(..., help="Model file to whiten (written by `train`, or `kmeans` for the off-the-shelf model)."),
    split_dir: Path = typer.Option(..., help="Split folder whose database images the PCA is fitted on (e.g. data/dataset/train)."),
    out: Path = typer.Option(..., help="Output model file: the input model followed by the whitening layer (Linear + L2-normalisation)."),
    dim: int = typer.Option(4096, help="Whitened descriptor size (kept principal components); fewer, with a warning, when the sample is too small."),
    max_images: int = typer.Option(10_000, help="Fit on at most this many randomly chosen database images."),
    seed: int = typer.Option(0, help="Seed of the image choice."),
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    workers: int = typer.Option(2, help="DataLoader worker processes for decoding images."),
    amp: str = typer.Option("bf16", help="Autocast dtype on GPU while encoding: bf16, fp16 or fp32 (ignored on CPU)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    dist_timeout: float = typer.Option(600.0, help="Under torchrun: seconds a process waits for the others in a collective before failing with an error (a dead or stuck peer)."),
) -> None:
    """Fit PCA whitening (y = diag(1/sqrt(λ+1e-9))·Uᵀ·(x−μ), then L2-normalise) and append it to the model."""
    from netvlad_core.datasets.manifest import load_split
    from netvlad_core.distributed import distributed_session
    from netvlad_core.features import FeatureConfig
    from netvlad_core.io import distinct_paths
    from netvlad_core.models import load_model, save_model
    from netvlad_core.models.whitening import PCAConfig, fit_model_whitening

    distinct_paths({"--model": model}, {"--out": out})
    cfg = PCAConfig(dim=dim, max_images=max_images, seed=seed)
    cfg.validate()
    feature_cfg = FeatureConfig(batch_size=batch_size, num_workers=workers, amp=amp)
    feature_cfg.validate()
    split = load_split(split_dir)
    net, model_cfg = load_model(model)
    replaced = net.whitening is not None
    with distributed_session(device, dist_timeout) as dist:  # under torchrun: sharded descriptor pass
        whitening = fit_model_whitening(net, model_cfg, split, device=dist.device, cfg=cfg,
                                        feature_cfg=feature_cfg, progress=progress, dist=dist)
    if whitening is None:  # not rank 0: rank 0 fits and writes the model
        return
    save_model(out, net, model_cfg)
    note = " (replaced the model's previous whitening)" if replaced else ""
    typer.echo(f"pca: {whitening.input_dim}-D -> {whitening.dim}-D whitening fitted on {whitening.num_samples} "
               f"database images ({whitening.method} form){note} -> {out}")


if __name__ == "__main__":
    run(main)
