"""Command-line mistakes print the usage line and one `error:` line, exit status 2: no multi-line box, no
traceback, for the `netvlad` group and for `python -m stages.<stage>` alike."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

CASES = {
    "a value of the wrong type": (["--batch-size", "abc"], "error: Invalid value for '--batch-size'"),
    "an unknown option": (["--bogus", "1"], "error: No such option: --bogus"),
    "a missing required option": ([], "error: Missing option '--features'"),
}


@pytest.mark.parametrize("entry", ["stages.cli", "stages.evaluate"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_errors_are_the_usage_line_and_one_error_line(entry, case):
    args, start = CASES[case]
    argv = [sys.executable, "-m", entry, *(["evaluate"] if entry == "stages.cli" else []), *args]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Usage: ") and lines[1].startswith(start), lines
    assert "--help" in lines[1] and not any(c in proc.stderr for c in "╭│╰") and proc.stdout == ""


def test_help_still_works_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "evaluate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--features" in proc.stdout, proc.stderr
