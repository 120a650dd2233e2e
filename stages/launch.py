"""Command `launch`: run a stage in this process, or under torchrun with several processes on this machine.

``netvlad launch --nproc-per-node N <stage> <options…>`` is what dvc.yaml's heavy stages call with
``N = ${dist.nproc-per-node}``:

* ``N = 1`` (or already inside a torchrun worker): the stage runs right here, exactly as ``netvlad <stage> …``
  (no torchrun agent, so no extra interpreter and torch import: about 5 s saved per stage);
* ``N > 1``: this process becomes torchrun's agent (``--standalone``: a local rendezvous on a free port) and starts
  N workers ``python -m stages.cli <stage> …``, one per GPU (NCCL) or N CPU processes (gloo). If one worker fails
  the agent stops the others and this command exits 1 after the workers' own ``error: …`` lines.

Several machines (``--nnodes``, a rendezvous endpoint) are started by the cluster's own launcher: call
``torchrun`` directly there (see docs/how-to/several-gpus.md).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List

import click
import typer

# Registered in stages/cli.py with these settings, so the stage's own options pass through untouched.
# Options are read up to the stage's name; everything from it on (its --help too) goes to the stage.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def torchrun_args(nproc_per_node: int, stage_argv: List[str]) -> List[str]:
    """The argument list for ``torch.distributed.run`` that starts ``stage_argv`` on ``nproc_per_node`` local
    processes."""
    return ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "stages.cli", *stage_argv]


def launch(nproc_per_node: int, stage_argv: List[str], run_here: Callable[[List[str]], int]) -> int:
    """Run ``netvlad <stage_argv…>`` with ``nproc_per_node`` processes; the exit status. ``run_here`` runs a stage's
    argument list in this process (one process, or already inside a torchrun worker) and returns its exit status."""
    if nproc_per_node < 1:
        typer.echo(f"error: nproc-per-node must be >= 1, got {nproc_per_node}", err=True)
        return 2
    if not stage_argv or stage_argv[0].startswith("-"):
        typer.echo("error: launch needs a stage to run, e.g. `netvlad launch --nproc-per-node 2 features …`",
                   err=True)
        return 2
    if stage_argv[0] == "launch":
        typer.echo("error: launch cannot launch itself", err=True)
        return 2
    if nproc_per_node == 1 or "LOCAL_RANK" in os.environ:
        return run_here(stage_argv)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args(nproc_per_node, stage_argv)))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        typer.echo(f"error: {stage_argv[0]}: rank {rank} of {nproc_per_node} failed first ({why}); the other "
                   f"processes were stopped", err=True)
        return 2 if code == 2 else 1
    return 0


def command_runner(command: click.Command) -> Callable[[List[str]], int]:
    """``run_here`` for :func:`launch`: run an argument list with ``command`` (the ``netvlad`` group) in this
    process."""

    def run_here(argv: List[str]) -> int:
        try:
            command.main(args=argv, prog_name="netvlad")
        except SystemExit as e:  # click's standalone mode always exits
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0

    return run_here


def main(
    ctx: typer.Context,
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", metavar="N",
                                       help="Processes on this machine: 1 runs the stage here; N > 1 starts it under "
                                       "torchrun (one process per GPU, or N CPU processes)."),
) -> None:
    """Run a stage with one or several processes: `netvlad launch --nproc-per-node N STAGE OPTIONS...`."""
    # the stage runs through the command group this launch belongs to (the `netvlad` app): no import of stages.cli
    code = launch(nproc_per_node, list(ctx.args), command_runner(ctx.find_root().command))
    raise typer.Exit(code)


if __name__ == "__main__":  # `python -m stages.launch …` is `netvlad launch …`
    from stages.cli import app

    app(args=["launch", *sys.argv[1:]], prog_name="python -m stages.launch")
