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
    """Run faiss k-means on the descriptor sample and initialise the NetVLAD layer from it. The centroids and the
    model are written together: both or neither."""
    from netvlad_core.clustering import KMeansConfig, initial_model

    cfg = KMeansConfig(num_clusters=num_clusters, iterations=iterations, seed=seed)
    centroids, _ = initial_model(descriptors, centroids_out=centroids_out, model_out=model_out,
                                 pooling={"pooling": pooling, "num_clusters": num_clusters, "vladv2": vladv2},
                                 cfg=cfg, progress=progress)
    typer.echo(f"kmeans: {centroids.shape[0]} centroids -> {centroids_out}; model -> {model_out}")


if __name__ == "__main__":
    run(main)
