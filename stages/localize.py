"""Command `localize`: where were these photos taken? Top database matches and a position estimate per photo.

Exit status: 0 when every photo was answered; 1 when some photos could not be read (they are reported, the others
answered); 2 when none could be read, or on a user error (bad model, features file or split; nothing answered).
Each unreadable photo gets one ``error: <path>: ...`` line on stderr.

Numbers: ``--json`` writes every position, match position and squared distance at full precision (JSON floats are
Python ``repr``); the plain-text lines round positions to 0.1 m and d² to 4 decimals, for reading.
"""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.localization import LocalizeConfig, localize_files
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(LocalizeConfig), run_cfg=Group(RunConfig, only=("device",)))
def main(
    images: list[Path] = typer.Argument(..., help="Photos to localize (JPEG, PNG, ...)."),
    model: Path = typer.Option(..., help="Model file (the final model, written by `pca`, `train` or `kmeans`)."),
    database: Path = typer.Option(..., help="Features HDF5 written by `features` with the same model for the "
                                  "--manifest split."),
    manifest: Path = typer.Option(..., help="Split folder written by `download` (database paths and UTM positions)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (a list with one object per "
                                     "answered photo), every number at full precision."),
    *, cfg: LocalizeConfig, run_cfg: RunConfig,
) -> None:
    """Retrieve each photo's nearest database images and estimate its position (UTM metres).

    Unreadable photos get one `error:` line each on stderr and are skipped. Exit status: 0 when every photo was
    answered, 1 when some could not be read, 2 when none could be or on a user error (bad model, features file or
    split). The plain-text output rounds positions to 0.1 m and d² to 4 decimals; --json gives full precision.
    """
    text, errors, status = localize_files(model, images, database, manifest, cfg=cfg, device=run_cfg.device,
                                          as_json=json_output)
    for line in errors:
        typer.echo(line, err=True)
    if text:
        typer.echo(text)
    raise typer.Exit(status)


if __name__ == "__main__":
    run(main)
