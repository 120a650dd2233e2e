"""Stage `evaluate`: recall@N and localisation error of one features file, plus DVC metrics/plots files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages._common import run, user_errors


@user_errors
def main(
    features: Path = typer.Option(..., help="Features HDF5 written by `features` (datasets `db` and `query`)."),
    split_dir: Path = typer.Option(..., help="Split folder written by `download` (manifest + ground truth)."),
    metrics: Path = typer.Option(..., help="Output metrics JSON, numbers only (recall@N, counts, median error; a DVC metrics file)."),
    plot: Path = typer.Option(..., help="Output CSV `model,n,recall` for `dvc plots` (x=n, y=recall)."),
    per_query: Path = typer.Option(..., help="Output CSV with every query's top matches, correctness, position estimate and error (full precision)."),
    retrievals: Optional[Path] = typer.Option(None, help="Output PNG of example queries and their top-5 matches."),
    settings: Optional[Path] = typer.Option(None, help="Output JSON of how the metrics were made (model, dataset, split, index, panorama collapsing and what decided it, localisation, recall N requested and used); not a metric."),
    model_name: str = typer.Option(..., help="Name of the model in the plot CSV and settings (e.g. offtheshelf)."),
    recall_n: list[int] = typer.Option([1, 5, 10, 20, 50, 100], "--recall-n", help="N of recall@N; repeat the option for several. An N above the database size (after collapsing: the number of panoramas) is lowered to it, with a warning."),
    localisation_k: int = typer.Option(1, help="Top matches averaged into the position estimate."),
    localisation_weighting: str = typer.Option("uniform", help="Weights of those matches: uniform, inverse_distance or softmax."),
    localisation_temperature: float = typer.Option(0.1, help="Temperature of the softmax weighting (squared descriptor distance)."),
    index_factory: Optional[str] = typer.Option(None, help="faiss index factory string for approximate search (e.g. 'IVF1024,PQ64'); default exact."),
    index_params: Optional[str] = typer.Option(None, help="faiss parameters for that index (e.g. 'nprobe=16')."),
    collapse_panoramas: Optional[str] = typer.Option(None, "--collapse-panoramas", metavar="auto|yes|no", help="Count each database panorama once per ranking (Tokyo 24/7 protocol): auto (the default) does when the split records views_per_panorama (tokyo247: 12); yes/true or no/false decide regardless. It takes a value: in params.yaml write auto, yes or no (a YAML true would come as a bare --collapse-panoramas, which is refused)."),
    no_collapse_panoramas: bool = typer.Option(False, "--no-collapse-panoramas", help="The same as --collapse-panoramas no (what DVC passes for a YAML false)."),
    batch_size: int = typer.Option(1024, help="Queries per search batch (bounds memory)."),
    num_examples: int = typer.Option(8, help="Example queries drawn in the retrievals PNG."),
    per_query_top: int = typer.Option(20, help="Matches listed per query in the per-query CSV."),
    seed: int = typer.Option(0, help="Seed of the approximate index's k-means training."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Search the split's database for every query and report recall@N and localisation error.

    Every number in the output files is written at full precision; only the summary line printed here is rounded.
    Giving one file for two outputs (or the features file as an output) is an error, before any work.
    """
    from netvlad_core.errors import NetVLADError
    from netvlad_core.evaluation import EvalConfig, evaluate

    def optional(text: Optional[str]) -> Optional[str]:  # params.yaml `null` arrives as the string "None"
        return None if text is None or text.strip().lower() in ("", "none", "null") else text

    collapse: Optional[bool] = None
    if optional(collapse_panoramas) is not None:
        choices = {"auto": None, "yes": True, "true": True, "on": True, "1": True,
                   "no": False, "false": False, "off": False, "0": False}
        word = collapse_panoramas.strip().lower()
        if word not in choices:
            raise NetVLADError(f"--collapse-panoramas: expected auto, yes or no, got {collapse_panoramas!r}")
        collapse = choices[word]
        if no_collapse_panoramas and collapse is not False:
            raise NetVLADError(f"--collapse-panoramas {collapse_panoramas} contradicts --no-collapse-panoramas")
    if no_collapse_panoramas:
        collapse = False

    cfg = EvalConfig(
        recall_ns=tuple(recall_n),
        localisation_k=localisation_k,
        localisation_weighting=localisation_weighting,
        localisation_temperature=localisation_temperature,
        index_factory=optional(index_factory),
        index_params=optional(index_params),
        collapse_panoramas=collapse,
        batch_size=batch_size,
        num_examples=num_examples,
        per_query_top=per_query_top,
        train_seed=seed,
    )
    result = evaluate(features, split_dir, metrics_json=metrics, plot_csv=plot, per_query_csv=per_query,
                      retrievals_png=retrievals, settings_json=settings, model_name=model_name, cfg=cfg,
                      progress=progress)
    numbers, used = result.metrics, result.settings
    shown = " ".join(f"R@{n} {100 * numbers[f'recall@{n}']:.1f}" for n in (1, 5, 10) if f"recall@{n}" in numbers)
    median = numbers["median_error_m"]
    median_text = "n/a" if median is None else f"{median:.1f} m"
    panoramas = (f", {used['num_panoramas']} panoramas (collapsed, from the {used['collapse_panoramas_decided_by']})"
                 if used["collapse_panoramas"] else "")
    typer.echo(f"evaluate {model_name}: {shown}, median error {median_text} "
               f"({numbers['num_queries']} queries, {numbers['num_db']} db{panoramas}) -> {metrics}")


if __name__ == "__main__":
    run(main)
