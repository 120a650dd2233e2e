"""Stage `kmeans`: cluster the sampled descriptors and write the k-means-initialised (off-the-shelf) model."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import run, user_errors


@user_errors
def main(
    descriptors: Path = typer.Option(..., help="HDF5 written by `sample`."),
    centroids_out: Path = typer.Option(..., help="Output HDF5 with the K×D centroids."),
    model_out: Path = typer.Option(..., help="Output model file (state dict + config) initialised from the centroids."),
    pooling: str = typer.Option("netvlad", help="Pooling: netvlad, max, avg or gem (only netvlad uses the centroids)."),
    num_clusters: int = typer.Option(64, help="K, the number of NetVLAD clusters."),
    vladv2: bool = typer.Option(False, help="Use the vladv2 initialisation (conv bias from squared distances)."),
    iterations: int = typer.Option(100, help="k-means iterations."),
    seed: int = typer.Option(0, help="k-means seed."),
    progress: bool = typer.Option(True, help="Show k-means progress."),
) -> None:
    """Run faiss k-means on the descriptor sample and initialise the NetVLAD layer from it."""
    from netvlad_core.clustering import KMeansConfig, kmeans, read_descriptors, write_centroids
    from netvlad_core.models import ModelConfig, build_model, save_model

    desc, model_dict = read_descriptors(descriptors)
    model_cfg = ModelConfig.from_dict({**model_dict, "pooling": pooling, "num_clusters": num_clusters, "vladv2": vladv2})
    model_cfg.validate()
    cfg = KMeansConfig(num_clusters=num_clusters, iterations=iterations, seed=seed)
    if pooling == "netvlad" and not 2 <= num_clusters <= len(desc):
        from netvlad_core.errors import NetVLADError

        raise NetVLADError(f"num-clusters must be between 2 and the {len(desc)} sampled descriptors, got {num_clusters}")
    model = build_model(model_cfg)
    if pooling == "netvlad":
        centroids = kmeans(desc, cfg, progress=progress)
        model.pool.init_params(centroids, desc)
    else:
        centroids = desc[:0]
    write_centroids(centroids_out, centroids, model_config=model_cfg.to_dict(), cfg=cfg)
    save_model(model_out, model, model_cfg)
    typer.echo(f"kmeans: {centroids.shape[0]} centroids -> {centroids_out}; model -> {model_out}")


if __name__ == "__main__":
    run(main)
