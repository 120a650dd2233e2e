"""Sharing and reviewing a run, end to end on one tiny `dvc repro` (tests/test_pipeline.py's sizes): the outputs
pushed to a local-directory DVC remote come back in a fresh `git clone` with `dvc pull`, and `make report` compares
two commits of the pipeline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.test_pipeline import _env, _run, _set_params, make_tiny_pipeline
from tests.test_report import _rows

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")


def _commit(repo: Path, message: str) -> None:
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny pipeline reproduced, with its dvc.lock and metrics committed (as a change would be)."""
    repo = make_tiny_pipeline(tmp_path_factory.mktemp("sharing"), files=("Makefile",))
    _commit(repo, "tiny run")
    return repo


def _outs(repo: Path) -> list[str]:
    """Every output dvc.lock records, files and folders."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def _files(root: Path) -> dict[str, bytes]:
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def test_push_then_clone_and_pull_gives_a_clean_status_and_the_same_outputs(tiny_run, tmp_path):
    repo, remote = tiny_run, tmp_path / "remote"
    _run([DVC, "remote", "add", "-d", "shared", str(remote)], repo)  # written to .dvc/config, committed
    _commit(repo, "DVC remote")
    _run([DVC, "push"], repo)
    assert json.loads(_run([DVC, "status", "--cloud", "--json"], repo).stdout) == {}  # all of it is on the remote
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    outs = _outs(repo)
    cached = [o for o in outs if not o.startswith("metrics/")]
    assert {"data/dataset", "artifacts/model_trained.pt", "artifacts/features/test_trained.h5"} <= set(cached)
    assert not any((clone / o).exists() for o in cached)  # git brings the committed files only
    assert json.loads(_run([DVC, "status", "--json"], clone).stdout) != {}
    _run([DVC, "pull"], clone)
    assert json.loads(_run([DVC, "status", "--json"], clone).stdout) == {}
    for out in outs:  # models, features, dataset and metrics: byte for byte the first checkout's
        assert _files(clone / out) == _files(repo / out), out
    shown = [json.loads(_run([DVC, "metrics", "show", "--json"], where).stdout) for where in (repo, clone)]
    assert shown[0] == shown[1] and "recall@1" in json.dumps(shown[0])


def _flatten(data: dict, prefix: str = "") -> dict:
    """A metrics file's numbers under DVC's names (nested keys joined with '.')."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shows(cell: str, value) -> bool:
    """Whether a table cell is ``value``: an integer exactly, any other number to at most 4 significant digits."""
    if isinstance(value, int):
        return cell == str(value)
    digits = re.sub(r"e.*$", "", cell).lstrip("+-").replace(".", "").lstrip("0")
    return len(digits) <= 4 and float(cell) == pytest.approx(value, rel=5e-4, abs=1e-12)


def test_make_report_holds_both_commits_metrics_and_the_changed_param(tiny_run):
    repo = tiny_run
    _set_params(repo / "params.yaml", {"train": {"lr": 0.02}})
    ran = {line.split("'")[1] for line in _run([DVC, "repro"], repo).stdout.splitlines()
           if line.startswith("Running stage")}
    assert "train" in ran and "download" not in ran and "kmeans" not in ran
    _commit(repo, "train.lr 0.02")
    proc = _run(["make", "report", "BASE=HEAD~1", f"REPORT_PYTHON={sys.executable}"], repo)
    assert "install" not in proc.stdout  # REPORT_PYTHON: no venv made in the repository
    text = (repo / "report.md").read_text()
    rows = _rows(text)
    assert rows[("params.yaml", "train.lr")] == ["0.01", "0.02", "+0.01"]
    assert [key for key in rows if key[0] == "params.yaml"] == [("params.yaml", "train.lr")]

    files = [p for p in _run(["git", "ls-files", "metrics"], repo).stdout.split()
             if re.fullmatch(r"metrics/(test_\w+|train/metrics)\.json", p)]
    assert len(files) == 4
    for path in files:
        old = _flatten(json.loads(_run(["git", "show", f"HEAD~1:{path}"], repo).stdout))
        new = _flatten(json.loads((repo / path).read_text()))
        assert set(old) == set(new)
        for key in new:
            base, work, change = rows[(path, key)]
            assert _shows(base, old[key]) and _shows(work, new[key]), (path, key, rows[(path, key)])
            if new[key] == old[key]:
                assert change == "0"
            else:
                assert change[0] == ("+" if new[key] > old[key] else "-")
                assert _shows(change.lstrip("+"), new[key] - old[key]), (path, key, change)
        if path.startswith("metrics/test_"):
            model = path[len("metrics/test_"):-len(".json")]
            points = 100 * (new["recall@1"] - old["recall@1"])
            expected = f"unchanged ({100 * new['recall@1']:.1f} %)" if points == 0 else f"{points:+.1f} points"
            assert re.search(rf"^- `{model}`: recall@1 {re.escape(expected)}", text, re.M), (model, text)
    with Image.open(repo / "report_recall.png") as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 300

    # a recall@1 drop beyond MAX_DROP fails the target (the command's exit 1), the report is still written
    trained = repo / "metrics/test_trained.json"
    original = trained.read_text()
    try:
        lowered = json.loads(original)
        lowered["recall@1"] -= 0.05
        trained.write_text(json.dumps(lowered))
        (repo / "report.md").unlink()
        env = {**_env(), "PYTHONPATH": str(repo)}
        failed = subprocess.run(["make", "report", "BASE=HEAD", "MAX_DROP=1", f"REPORT_PYTHON={sys.executable}"],
                                cwd=repo, env=env, capture_output=True, text=True)
        assert failed.returncode != 0
        assert re.search(r"^recall@1 dropped by more than 1 point against \w{7}: trained -5\.0$", failed.stderr, re.M)
        assert "**Fails**" in (repo / "report.md").read_text()
    finally:
        trained.write_text(original)
