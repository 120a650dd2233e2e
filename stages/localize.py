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

from stages._common import run, user_errors


@user_errors
def main(
    images: list[Path] = typer.Argument(..., help="Photos to localise (JPEG, PNG, ...)."),
    model: Path = typer.Option(..., help="Model file (the final model, written by `pca`, `train` or `kmeans`)."),
    database: Path = typer.Option(..., help="Features HDF5 written by `features` with the same model for the --manifest split."),
    manifest: Path = typer.Option(..., help="Split folder written by `download` (its database paths and UTM positions)."),
    top_k: int = typer.Option(5, help="Database matches listed per photo."),
    localisation_k: int = typer.Option(1, help="Top matches averaged into the position estimate."),
    weighting: str = typer.Option("uniform", help="Weights of those matches: uniform, inverse_distance or softmax."),
    temperature: float = typer.Option(0.1, help="Temperature of the softmax weighting (squared descriptor distance)."),
    batch_size: int = typer.Option(16, help="Photos per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (a list with one object per answered photo), every number at full precision."),
) -> None:
    """Retrieve each photo's nearest database images and estimate its position (UTM metres).

    Unreadable photos are reported on stderr (one `error:` line each) and skipped. Exit status: 0 when every photo
    was answered, 1 when some could not be read (the others are answered), 2 when none could be read or on a user
    error (bad model, features file or split).

    The plain-text output rounds positions to 0.1 m and d² to 4 decimals; --json gives full precision.
    """
    from netvlad_core.device import select_device
    from netvlad_core.localization import LocalizeConfig, format_localization, localize, results_json
    from netvlad_core.models import load_model

    cfg = LocalizeConfig(top_k=top_k, localisation_k=localisation_k, weighting=weighting, temperature=temperature,
                         batch_size=batch_size)
    cfg.validate()
    net, model_cfg = load_model(model)
    results, failures = localize(net, model_cfg.to_dict(), images, database, manifest, device=select_device(device),
                                 cfg=cfg)
    for failure in failures:
        typer.echo(f"error: {failure.message}", err=True)
    if json_output:
        typer.echo(results_json(results))
    else:
        for result in results:
            typer.echo(format_localization(result))
    if not results:
        typer.echo(f"error: none of the {len(failures)} photo(s) could be read", err=True)
        raise typer.Exit(2)
    if failures:  # partly answered: a script must not take the missing answers for success
        raise typer.Exit(1)


if __name__ == "__main__":
    run(main)
