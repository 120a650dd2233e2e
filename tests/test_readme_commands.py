"""The README's multi-GPU and SLURM `train` commands run as written: every option they pass exists and no required
option is missing (parsed by the real command line of `netvlad train`, not run)."""

from __future__ import annotations

import re
import shlex

import typer

from stages.cli import app
from tests.conftest import REPO


def readme_train_commands() -> list[list[str]]:
    """Every `… train …` command of the README's bash blocks, continuation lines joined, as the stage's arguments."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "train" in argv and "--init-model" in argv:
                commands.append(argv[argv.index("train") + 1:])
    return commands


def test_readme_train_commands_have_every_required_option():
    commands = readme_train_commands()
    assert len(commands) >= 2, "the `netvlad launch … train` and the SLURM `torchrun … train` examples"
    train = typer.main.get_command(app).commands["train"]
    for args in commands:
        ctx = train.make_context("train", list(args))  # raises a UsageError for a missing or unknown option
        assert ctx.params["train_split"] is not None and ctx.params["checkpoint_dir"] is not None, args
