"""Stage `download`: the dataset spec (.mat files or VG folders) → normalised split folders with ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from stages._common import run, user_errors


@user_errors
def main(
    dataset: str = typer.Option(
        ..., "--dataset", metavar="NAME",
        help="Dataset: pitts30k, pitts250k, tokyoTM, tokyo247, vg (benchmark folders) or synthetic.",
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR",
        help="Output folder: one sub-folder per split (manifest.csv, split.json, ground_truth.h5); "
        "replaced as a whole, and left untouched on any error.",
    ),
    spec: Optional[str] = typer.Option(
        None, "--spec", metavar="PATH_OR_URL",
        help="The dbStruct .mat files: an http(s)/file URL, a local tar/zip archive or a folder holding them "
        "(searched recursively). Default: the authors' netvlad_v100_datasets.tar.gz from the NetVLAD project "
        "page (netvlad_core.download.AUTHORS_SPEC_URL). Not used for vg.",
    ),
    image_root: Optional[str] = typer.Option(
        None, "--image-root", metavar="DIR",
        help="Folder holding the images (distributed separately by the authors); Pittsburgh/Tokyo 24/7 "
        "queries under DIR/queries_real/. For vg: the benchmark's dataset folder (with images/<split>/).",
    ),
    sha256: Optional[str] = typer.Option(
        None, "--sha256", metavar="HEX",
        help="Expected sha256 of the spec archive; a mismatch is an error. The digest of every archive used "
        "is printed so it can be pinned.",
    ),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", metavar="DIR",
        help="Where downloads are kept (and interrupted ones resumed). Default: <parent of --out>/.netvlad_cache.",
    ),
    split: Optional[List[str]] = typer.Option(
        None, "--split", metavar="NAME",
        help="Only this split (repeatable), e.g. --split test. Default: every split of the dataset.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar while downloading."),
    seed: int = typer.Option(0, help="synthetic: seed of the city and its views (another seed, another city)."),
    width: int = typer.Option(320, help="synthetic: image width in pixels."),
    height: int = typer.Option(240, help="synthetic: image height in pixels."),
    train_blocks: int = typer.Option(9, help="synthetic: city blocks in the train district."),
    val_blocks: int = typer.Option(2, help="synthetic: city blocks in the val district."),
    test_blocks: int = typer.Option(6, help="synthetic: city blocks in the test district."),
    db_spacing_m: float = typer.Option(4.0, help="synthetic: metres between database positions along a street."),
    headings: int = typer.Option(4, help="synthetic: database headings (yaws) per position."),
    train_queries: int = typer.Option(400, help="synthetic: queries in the train split."),
    val_queries: int = typer.Option(150, help="synthetic: queries in the val split."),
    test_queries: int = typer.Option(300, help="synthetic: queries in the test split."),
    workers: int = typer.Option(2, help="synthetic: rendering processes."),
) -> None:
    """Download or read a dataset's spec and write its splits with ground-truth positives (25 m / 10 m)."""
    from netvlad_core.datasets.official import get_dataset, prepare_dataset
    from netvlad_core.io import read_json

    def log(message: str) -> None:
        typer.echo(message, err=True)

    # params.yaml keeps unused options as "" (DVC passes them as empty strings): treat those as not given.
    spec = spec or None
    sha256 = sha256 or None
    image_root = Path(image_root) if image_root else None
    info = get_dataset(dataset)
    if info.name == "synthetic":  # the built-in city: rendered into --out (all or nothing), read like Pittsburgh
        from netvlad_core.datasets.synthetic import SyntheticConfig, prepare_synthetic_dataset

        cfg = SyntheticConfig(seed=seed, width=width, height=height, train_blocks=train_blocks,
                              val_blocks=val_blocks, test_blocks=test_blocks, db_spacing_m=db_spacing_m,
                              headings=headings, train_queries=train_queries, val_queries=val_queries,
                              test_queries=test_queries)
        paths = prepare_synthetic_dataset(cfg, out, splits=split or None, workers=workers, progress=progress)
    else:
        paths = prepare_dataset(
            info.name, out, spec=spec, image_root=image_root, sha256=sha256, cache_dir=cache_dir,
            splits=split or None, progress=progress, log=log,
        )
    for path in paths:
        meta = read_json(path / "split.json")
        typer.echo(
            f"download: {meta['dataset']} {meta['split']}: {meta['num_db']} database images, "
            f"{meta['num_queries']} queries → {path}"
        )


if __name__ == "__main__":
    run(main)
