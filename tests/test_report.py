"""`netvlad report`: the table formatting against hand-checked values, and the report of small real git + DVC
repositories (metrics and params files committed, no pipeline run) with the real `dvc params/metrics diff`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from netvlad_core.errors import NetVLADError
from netvlad_core.report import ReportConfig, format_change, format_value, markdown_table, verdict, write_report
from tests.conftest import REPO

DVC = str(Path(sys.executable).parent / "dvc")


@pytest.mark.parametrize("value, text", [
    (0.7333333333333333, "0.7333"), (0.88, "0.88"), (1.0, "1"), (13.142512441244719, "13.14"),
    (0.000123456, "0.0001235"), (123456.0, "1.235e+05"), (2.5e-05, "2.5e-05"), (300, "300"), (123456, "123456"),
    (0, "0"), (None, "—"), ("efficientnet_lite0", "efficientnet_lite0"), (True, "true"), ([1, 5, 10], "[1, 5, 10]"),
])
def test_values_have_4_significant_digits_and_integers_stay_exact(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("change, text", [
    (0.01, "+0.01"), (-0.04166666666666674, "-0.04167"), (1.3333668115273412, "+1.333"), (0.008634030818939209,
     "+0.008634"), (-0.09999999999999998, "-0.1"), (0.0, "0"), (-0.0, "0"), (0, "0"), (1, "+1"), (-3, "-3"),
    (None, "—"), ("x", "—"),
])
def test_the_change_is_signed_to_4_significant_digits(change, text):
    assert format_change(change) == text


def test_markdown_table_and_verdict_lines():
    assert markdown_table(["a", "b"], [["1", "x|y"]]) == "| a | b |\n| --- | --- |\n| 1 | x\\|y |"
    assert verdict("trained", 0.71, 0.7333333333333333) == "`trained`: recall@1 +2.3 points (71.0 % → 73.3 %)"
    assert verdict("pca", 0.6533333333333333, 0.5933333333333334) == "`pca`: recall@1 -6.0 points (65.3 % → 59.3 %)"
    assert verdict("m", 0.625, 0.625) == "`m`: recall@1 unchanged (62.5 %)"
    assert verdict("m", None, 0.5) == "`m`: new, recall@1 50.0 %"
    assert verdict("m", 0.5, None) == "`m`: removed (recall@1 was 50.0 % at BASE)"


# -------------------------------------------------------------------------------------------- small real repositories

def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, capture_output=True,
                          text=True, check=True)
    return proc.stdout


def _commit_state(repo: Path, params: dict, metrics: dict[str, dict], curves: dict[str, list[tuple[int, float]]],
                  message: str) -> None:
    """Write params.yaml, metrics/test_<model>.json and metrics/recall_<model>.csv (declared in dvc.yaml as
    top-level metrics and params) and commit them."""
    (repo / "metrics").mkdir(exist_ok=True)
    for old in (repo / "metrics").iterdir():
        old.unlink()
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for model, values in metrics.items():
        (repo / f"metrics/test_{model}.json").write_text(json.dumps(values))
    for model, rows in curves.items():
        (repo / f"metrics/recall_{model}.csv").write_text(
            "model,n,recall\n" + "".join(f"{model},{n},{r!r}\n" for n, r in rows))
    spec = {"params": ["params.yaml"], "metrics": sorted(f"metrics/test_{m}.json" for m in ("a", "b", "c"))}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", message)


BASE_STATE = dict(
    params={"train": {"lr": 0.01, "loss": "squared", "epochs": 2}},
    metrics={"a": {"recall@1": 0.5, "recall@5": 0.8333333333333334, "num_queries": 3},
             "b": {"recall@1": 0.6, "recall@5": 0.9, "num_queries": 3}},
    curves={"a": [(1, 0.5), (5, 0.8333333333333334)], "b": [(1, 0.6), (5, 0.9)]},
)
NEW_STATE = dict(
    params={"train": {"lr": 0.02, "loss": "sqrt", "epochs": 2}},
    metrics={"a": {"recall@1": 0.4, "recall@5": 0.8333333333333334, "num_queries": 4},
             "b": {"recall@1": 0.6533333333333333, "recall@5": 0.9, "num_queries": 3}},
    curves={"a": [(1, 0.4), (5, 0.8333333333333334)], "b": [(1, 0.6533333333333333), (5, 0.9)]},
)


@pytest.fixture
def two_commits(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    _commit_state(repo, **BASE_STATE, message="base")
    _commit_state(repo, **NEW_STATE, message="change")
    return repo


def _report(repo: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    """The command, as `make report` runs it."""
    out = out or repo
    return subprocess.run([sys.executable, "-m", "stages.report", "--repo", str(repo), "--out", str(out / "r.md"),
                           "--plot", str(out / "r.png"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def _write(repo: Path, out: Path | None = None, **cfg):
    """The library call (in this process: no interpreter start-up per report)."""
    out = out or repo
    return write_report(repo, out / "r.md", out / "r.png", cfg=ReportConfig(**cfg))


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(path, key): [BASE, working tree, change]} of every table row of a report."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("Path", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_report_tables_hold_both_revisions_values_and_the_verdicts(two_commits):
    _write(two_commits, base="HEAD~1")
    text = (two_commits / "r.md").read_text()
    base = _git(two_commits, "rev-parse", "--short=7", "HEAD~1").strip()
    assert f"commit `{base}`" in text
    rows = _rows(text)
    # hand-checked: DVC's diff of each pair, to 4 significant digits, signed
    assert rows[("params.yaml", "train.lr")] == ["0.01", "0.02", "+0.01"]
    assert rows[("params.yaml", "train.loss")] == ["squared", "sqrt", "—"]
    assert ("params.yaml", "train.epochs") not in rows  # unchanged params are not listed, as in `dvc params diff`
    assert rows[("metrics/test_a.json", "recall@1")] == ["0.5", "0.4", "-0.1"]
    assert rows[("metrics/test_a.json", "recall@5")] == ["0.8333", "0.8333", "0"]
    assert rows[("metrics/test_a.json", "num_queries")] == ["3", "4", "+1"]
    assert rows[("metrics/test_b.json", "recall@1")] == ["0.6", "0.6533", "+0.05333"]
    assert rows[("metrics/test_b.json", "num_queries")] == ["3", "3", "0"]
    assert "- `a`: recall@1 -10.0 points (50.0 % → 40.0 %)" in text
    assert "- `b`: recall@1 +5.3 points (60.0 % → 65.3 %)" in text
    assert "](r.png)" in text
    with Image.open(two_commits / "r.png") as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 300 and len(image.getcolors(1 << 20) or []) > 10


def test_max_drop_fails_with_one_line_and_still_writes_the_report(two_commits):
    passed = _write(two_commits, base="HEAD~1", max_drop=10.0)  # a drop of exactly 10 points is not more than 10
    assert passed.failures == [] and passed.recall1 == {"a": (0.5, 0.4), "b": (0.6, 0.6533333333333333)}
    assert "Passes: no recall@1 dropped by more than 10 points." in (two_commits / "r.md").read_text()
    (two_commits / "r.md").unlink()
    failed = _report(two_commits, "--base", "HEAD~1", "--max-drop", "9.5")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"recall@1 dropped by more than 9.5 points against "
        f"{_git(two_commits, 'rev-parse', '--short=7', 'HEAD~1').strip()}: a -10.0"]
    assert "**Fails**" in (two_commits / "r.md").read_text() and (two_commits / "r.png").is_file()


def test_the_default_base_is_the_merge_base_with_main(two_commits):
    _git(two_commits, "branch", "-M", "feature")
    # main moved on after the branch point (to the branch's own state): the merge base, not main's tip, is BASE
    fork = _git(two_commits, "rev-parse", "HEAD~1").strip()
    tip = _git(two_commits, "commit-tree", "HEAD^{tree}", "-p", fork, "-m", "main moved on").strip()
    _git(two_commits, "branch", "main", tip)
    _write(two_commits)
    text = (two_commits / "r.md").read_text()
    assert "merge base of HEAD and main" in text
    assert _rows(text)[("params.yaml", "train.lr")] == ["0.01", "0.02", "+0.01"]
    _git(two_commits, "branch", "-D", "main")  # no main nor master: against HEAD, i.e. the uncommitted changes
    _write(two_commits)
    text = (two_commits / "r.md").read_text()
    assert "HEAD (no main or master branch)" in text and "No param changed." in text


@pytest.mark.parametrize("case", ["unknown base", "no metrics at base", "not a git repository", "no metrics now"])
def test_bad_input_raises_one_line_and_writes_nothing(two_commits, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    repo, cfg = two_commits, {"base": "HEAD~1"}
    if case == "unknown base":
        cfg, expected = {"base": "no-such-rev"}, "'no-such-rev' is not a git revision"
    elif case == "no metrics at base":
        tree = _git(repo, "hash-object", "-t", "tree", "-w", "/dev/null").strip()  # the empty tree
        empty = _git(repo, "commit-tree", tree, "-m", "nothing").strip()
        cfg, expected = {"base": empty}, f"BASE {empty} ({empty[:7]}) has no committed metrics/test_*.json"
    elif case == "no metrics now":
        for path in (repo / "metrics").glob("test_*.json"):
            path.unlink()
        expected = "the working tree has no metrics/test_*.json; run `dvc repro` first"
    else:
        repo, expected = tmp_path / "plain", "not a git working tree"
        repo.mkdir()
    with pytest.raises(NetVLADError, match="^[^\n]*$") as raised:
        _write(repo, out, **cfg)
    assert expected in str(raised.value)
    assert list(out.iterdir()) == []


def test_the_command_turns_bad_input_into_error_exit_2(two_commits, tmp_path):
    proc = _report(two_commits, "--base", "no-such-rev", out=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: 'no-such-rev' is not a git revision of {two_commits}"]
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "r.png").exists()
