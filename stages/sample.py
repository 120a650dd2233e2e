"""Stage `sample`: local descriptors from random train-database images, for k-means."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.clustering import SampleConfig, write_descriptor_sample
from netvlad_core.config import RunConfig
from netvlad_core.models.build import TRUNK_FIELDS, ModelConfig
from stages._common import run
from stages._options import RUN, Group, stage


@stage(trunk=Group(ModelConfig, "model.trunk", only=TRUNK_FIELDS), cfg=Group(SampleConfig, "sample"), run_cfg=RUN)
def main(
    split_dir: Path = typer.Option(..., help="Split folder written by `download` (e.g. data/dataset/train)."),
    out: Path = typer.Option(..., help="Output HDF5 with the sampled descriptors (float32) and their provenance."),
    *, trunk: ModelConfig, cfg: SampleConfig, run_cfg: RunConfig,
) -> None:
    """Sample local descriptors (L2-normalised, as the NetVLAD layer sees them) from random database images."""
    write_descriptor_sample(split_dir, out, trunk=trunk, cfg=cfg, run=run_cfg, log=typer.echo)


if __name__ == "__main__":
    run(main)
