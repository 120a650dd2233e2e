"""Command `launch`: run a stage in this process, or under torchrun with several processes on this machine.

``netvlad launch --nproc-per-node N <stage> <options…>`` is what dvc.yaml's heavy stages call with
``N = ${dist.nproc-per-node}``:

* ``N = 1`` (or already inside a torchrun worker): the stage runs right here, exactly as ``netvlad <stage> …``
  (no torchrun agent, so no extra interpreter and torch import: about 5 s saved per stage);
* ``N > 1``: this process becomes torchrun's agent (``--standalone``: a local rendezvous on a free port) and starts
  N workers ``python -m stages.cli <stage> …``, one per GPU (NCCL) or N CPU processes (gloo). If one worker fails
  the agent stops the others and this command exits 1 after the workers' own ``error: …`` lines.

Several machines (``--nnodes``, a rendezvous endpoint) are started by the cluster's own launcher: call
``torchrun`` directly there (see the README, "Training on several GPUs").
"""

from __future__ import annotations

import os
import sys
from typing import List

import typer

# Registered in stages/cli.py with these settings, so the stage's own options pass through untouched.
# Options are read up to the stage's name; everything from it on (its --help too) goes to the stage.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False}


def torchrun_args(nproc_per_node: int, stage_argv: List[str]) -> List[str]:
    """The argument list for ``torch.distributed.run`` that starts ``stage_argv`` on ``nproc_per_node`` local
    processes."""
    return ["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", "stages.cli", *stage_argv]


def launch(nproc_per_node: int, stage_argv: List[str]) -> int:
    """Run ``netvlad <stage_argv…>`` with ``nproc_per_node`` processes; the exit status."""
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
        from stages.cli import app

        try:
            app(args=stage_argv, prog_name="netvlad")
        except SystemExit as e:  # Typer's standalone mode always exits
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
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


def main(
    ctx: typer.Context,
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", metavar="N",
                                       help="Processes on this machine: 1 runs the stage here; N > 1 starts it under "
                                       "torchrun (one process per GPU, or N CPU processes)."),
) -> None:
    """Run a stage with one or several processes: `netvlad launch --nproc-per-node N STAGE OPTIONS...`."""
    code = launch(nproc_per_node, list(ctx.args))
    raise typer.Exit(code)


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command(context_settings=CONTEXT_SETTINGS, help=main.__doc__)(main)
    _app(prog_name="python -m stages.launch")
    sys.exit(0)
