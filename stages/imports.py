"""Command `import`: a released model (the authors' MatConvNet files, pytorch-NetVlad, Patch-NetVLAD or OpenIBL
checkpoints) as a model file of this project."""

from __future__ import annotations

from pathlib import Path

import typer

from netvlad_core.config import RunConfig
from netvlad_core.errors import NetVLADError
from netvlad_core.importing import ImportConfig, import_model
from stages._common import run
from stages._options import Group, stage


@stage(cfg=Group(ImportConfig), run_cfg=Group(RunConfig, only=("progress",)))
def main(
    src: str = typer.Argument(None, help="The released model: a local file, a folder holding one checkpoint, or an "
                              "http(s) URL (downloaded resumably, checked against --sha256 when given; a cached "
                              "copy is reused only when it matches --sha256 or the server says it is unchanged; "
                              "printed and recorded without user:password or query string)."),
    src_option: str = typer.Option(None, "--src", help="SRC as an option (what dvc.yaml passes from params.yaml "
                                   "`models`)."),
    out: Path = typer.Option(..., help="Output model file."),
    *, cfg: ImportConfig, run_cfg: RunConfig,
) -> None:
    """Read a released NetVLAD model (format detected from the content unless --format says it) and write it as a
    model file that features, evaluate, localize, export and `train --init-model` take; its config records the
    format, the source and its sha256. Checkpoints are read with torch.load(weights_only=True) only."""
    if (src is None) == (src_option is None):
        raise NetVLADError("give the source once: as the argument SRC or as --src")
    import_model(src if src is not None else src_option, out, cfg=cfg, progress=run_cfg.progress, log=typer.echo)


if __name__ == "__main__":
    run(main)
