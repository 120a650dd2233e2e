"""Command `retrieve` (not a dvc.yaml stage): rank a folder of photos against another, no positions or split files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from netvlad_core.config import RunConfig
from netvlad_core.features import FeatureConfig
from netvlad_core.unlabelled import RetrieveConfig, retrieve
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(RetrieveConfig), features_cfg=Group(FeatureConfig, "features"),
       run_cfg=Group(RunConfig, only=("device", "progress")))
def main(
    model: Path = typer.Option(..., help="Model file (written by `kmeans`, `train`, `pca` or `import`)."),
    database: Path = typer.Option(..., help="Folder of database photos (searched recursively for .jpg/.jpeg/.png)."),
    queries: Path = typer.Option(..., help="Folder of query photos (searched recursively)."),
    out: Path = typer.Option(..., help="Output CSV: query,rank,database,squared_distance (image paths relative to "
                             "their folders), --top rows per query."),
    features: Optional[Path] = typer.Option(None, help="The descriptors' HDF5 file (db, query); an interrupted run "
                                            "resumes it. Default: <out stem>.features.h5 beside --out."),
    html: Optional[Path] = typer.Option(None, help="Also write an HTML page showing each query beside its matches "
                                        "(images linked by relative paths)."),
    *, cfg: RetrieveConfig, features_cfg: FeatureConfig, run_cfg: RunConfig,
) -> None:
    """Rank every photo of --queries against the photos of --database with a model (exact search on the global
    descriptors) and write the top matches of each as CSV (and an HTML page). Large folders go through the batched,
    resumable extraction of `features`."""
    retrieve(model, database, queries, out, features_h5=features, html_page=html, cfg=cfg, features_cfg=features_cfg,
             run=run_cfg, log=typer.echo)


if __name__ == "__main__":
    run(main)
