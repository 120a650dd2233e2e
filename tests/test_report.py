"""`netvlad report`: the table formatting against hand-checked values, and the report of small real git + DVC
repositories (metrics and params files committed, no pipeline run) with the real `dvc params/metrics diff`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from netvlad_core.errors import NetVLADError
from netvlad_core.report import (
    ReportConfig,
    describe_value,
    format_change,
    format_value,
    markdown_table,
    parse_max_drop,
    verdict,
    write_report,
)
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
    assert verdict("m", 0.5, None, now="recall@1 is NaN") == (
        "`m`: no usable recall@1 in the working tree: recall@1 is NaN; it was 50.0 % at BASE")
    assert verdict("m", None, 0.4, before="true (a boolean)") == (
        "`m`: recall@1 at BASE is true (a boolean), not a number: nothing to compare against; 40.0 % in the working "
        "tree")


@pytest.mark.parametrize("value, text", [
    (0.5, None), (1, None), (0, None), (float("nan"), "NaN"), (float("inf"), "infinite"), (float("-inf"), "-infinite"),
    (10 ** 400, "infinite (an integer too large for a float)"), (None, "null"), (True, "true (a boolean)"),
    (False, "false (a boolean)"), ("0.9", '"0.9" (text)'),
    ([0.5], "[0.5] (a list)"), ({"v": 1}, '{"v": 1} (an object)'),
])
def test_what_a_recall_that_is_no_number_is_called(value, text):
    assert describe_value(value) == text


@pytest.mark.parametrize("text", ["none", "", "null", "default", "abc", "-1", "nan", "inf"])
def test_a_given_max_drop_must_be_a_number_unset_words_included(text):
    with pytest.raises(NetVLADError, match="^--max-drop must be a number of percentage points >= 0"):
        parse_max_drop(text)
    assert parse_max_drop(None) is None and parse_max_drop("0") == 0.0 and parse_max_drop("1.5") == 1.5


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


# -------------------------------------------------------------------------- broken metrics never pass the gate

def _empty(tmp_path: Path) -> Path:
    """An empty folder for a command's outputs (``tmp_path`` holds the repository)."""
    out = tmp_path / "out"
    out.mkdir()
    return out


def _short(repo: Path, rev: str = "HEAD~1") -> str:
    return _git(repo, "rev-parse", "--short=7", rev).strip()


def _set_metric(repo: Path, model: str, key: str, value) -> None:
    path = repo / f"metrics/test_{model}.json"
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))  # json.dumps writes NaN and Infinity as Python's json module does


@pytest.mark.parametrize("case, why", [
    ("nan", "recall@1 is NaN"), ("inf", "recall@1 is infinite"), ("null", "recall@1 is null"),
    ("boolean", "recall@1 is true (a boolean)"), ("text", 'recall@1 is "0.9" (text)'),
    ("deleted", "metrics/test_a.json is missing"), ("no key", "metrics/test_a.json has no recall@1"),
])
def test_a_recall1_that_is_gone_or_no_number_fails_the_gate(two_commits, case, why):
    path = two_commits / "metrics/test_a.json"
    if case == "deleted":
        path.unlink()
    elif case == "no key":
        path.write_text(json.dumps({"recall@5": 0.9, "num_queries": 4}))
    else:
        value = {"nan": float("nan"), "inf": float("inf"), "null": None, "boolean": True, "text": "0.9"}[case]
        _set_metric(two_commits, "a", "recall@1", value)
    # a gate of 50 points: only a recall@1 that is no number, or gone, can fail it here
    report = _write(two_commits, base="HEAD~1", max_drop=50.0)
    assert report.failures == ["a"] and report.recall1["a"] == (0.5, None)
    line = f"no usable recall@1 in the working tree: a ({why}; 50.0 % at {_short(two_commits)})"
    assert report.failure_line() == line
    text = (two_commits / "r.md").read_text()
    assert f"- `a`: no usable recall@1 in the working tree: {why}; it was 50.0 % at BASE" in text
    assert f"**Fails**: {line}." in text and "Passes" not in text
    assert "100.0 %" not in text  # a boolean is never a percentage
    assert "- `b`: recall@1 +5.3 points (60.0 % → 65.3 %)" in text  # the other model is judged as before


def test_the_command_exits_1_on_a_nan_recall1_and_names_the_model(two_commits):
    _set_metric(two_commits, "a", "recall@1", float("nan"))
    proc = _report(two_commits, "--base", "HEAD~1", "--max-drop", "50")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"no usable recall@1 in the working tree: a (recall@1 is NaN; 50.0 % at {_short(two_commits)})"]
    assert "**Fails**" in (two_commits / "r.md").read_text()


def test_a_broken_recall1_is_named_without_a_gate_and_a_new_model_with_one_fails_it(two_commits):
    _set_metric(two_commits, "b", "recall@1", None)
    (two_commits / "metrics/test_c.json").write_text(json.dumps({"recall@1": float("nan")}))
    report = _write(two_commits, base="HEAD~1")  # no gate: no failure, but the verdicts say it
    assert report.failures == [] and report.failure_line() is None
    text = (two_commits / "r.md").read_text()
    assert "- `b`: no usable recall@1 in the working tree: recall@1 is null; it was 60.0 % at BASE" in text
    assert "- `c`: no usable recall@1 in the working tree: recall@1 is NaN" in text
    assert _write(two_commits, base="HEAD~1", max_drop=50.0).failures == ["b", "c"]


def test_a_recall1_at_base_that_is_no_number_is_named_and_not_compared(two_commits):
    _set_metric(two_commits, "a", "recall@1", float("nan"))
    _git(two_commits, "commit", "-qam", "a NaN at BASE")
    _set_metric(two_commits, "a", "recall@1", 0.45)
    report = _write(two_commits, base="HEAD", max_drop=1.0)
    assert report.failures == [] and report.recall1["a"] == (None, 0.45) and report.base_unusable == {"a": "NaN"}
    text = (two_commits / "r.md").read_text()
    assert ("- `a`: recall@1 at BASE is NaN, not a number: nothing to compare against; 45.0 % in the working tree"
            in text)
    assert "Passes" in text


CONFLICTED = '<<<<<<< HEAD\n{"recall@1": 0.4, "num_queries": 4}\n=======\n{"recall@1": 0.45, "num_queries": 4}\n' \
             '>>>>>>> feature\n'


@pytest.mark.parametrize("case", ["conflict", "truncated", "truncated at BASE", "not an object"])
def test_an_unreadable_metrics_file_is_an_error_that_writes_nothing(two_commits, tmp_path, case):
    out = _empty(tmp_path)
    path = two_commits / "metrics/test_a.json"
    good = path.read_text()
    path.write_text({"conflict": CONFLICTED, "not an object": "[0.4, 0.8]"}.get(case, good[:len(good) // 2]))
    base = "HEAD~1"
    if case == "truncated at BASE":
        _git(two_commits, "commit", "-qam", "a truncated metrics file")
        path.write_text(good)
        base = "HEAD"
    proc = _report(two_commits, "--base", base, "--max-drop", "1", out=out)
    assert proc.returncode == 2 and not list(out.iterdir())
    [line] = proc.stderr.strip().splitlines()
    where = f"metrics/test_a.json at BASE {_short(two_commits, 'HEAD')}" if case == "truncated at BASE" else path
    expected = {"conflict": "holds merge-conflict markers", "not an object": "not a metrics file (a JSON object"}
    assert line.startswith(f"error: {where}: {expected.get(case, 'not valid JSON (')}"), line


def test_a_curve_value_that_is_no_finite_number_is_an_error(two_commits, tmp_path):
    out = _empty(tmp_path)
    curve = two_commits / "metrics/recall_a.csv"
    curve.write_text("model,n,recall\na,1,0.4\na,5,nan\n")
    proc = _report(two_commits, "--base", "HEAD~1", out=out)
    assert proc.returncode == 2 and not list(out.iterdir())
    assert proc.stderr.strip().splitlines() == [f"error: {curve}: line 3: recall 'nan' is not a finite number"]
    curve.write_text("model,n,recall\na,1,high\n")
    with pytest.raises(NetVLADError, match=r"recall_a\.csv: line 2: recall 'high' is not a finite number$"):
        _write(two_commits, out, base="HEAD~1")


@pytest.mark.parametrize("value", ["none", ""])
def test_an_unset_max_drop_is_refused_not_a_silent_pass(two_commits, tmp_path, value):
    out = _empty(tmp_path)
    _set_metric(two_commits, "a", "recall@1", 0.1)  # a drop of 40 points: any number would fail it
    proc = _report(two_commits, "--base", "HEAD~1", "--max-drop", value, out=out)
    assert proc.returncode == 2 and not list(out.iterdir())
    assert proc.stderr.strip().splitlines() == [
        f"error: --max-drop must be a number of percentage points >= 0, got {value!r} (leave --max-drop, or "
        f"MAX_DROP of `make report`, out for a report without a gate)"]


# ------------------------------------------------------------------- what the pipeline declares, what it reads

PIPELINE = """\
stages:
  evaluate:
    foreach: [a, b]
    do:
      cmd: "true"
      metrics:
        - metrics/test_${item}.json:
            cache: false
  train:
    cmd: "true"
    metrics:
      - metrics/train.json:
          cache: false
      - metrics/never_written.json:
          cache: false
"""


def test_every_declared_metrics_file_is_reported_and_an_undeclared_one_is_named(two_commits):
    (two_commits / "dvc.yaml").write_text(PIPELINE)  # foreach and plain stages; c is no longer declared
    (two_commits / "metrics/train.json").write_text(json.dumps({"loss": 0.25, "best": {"recall@1": 0.5}}))
    (two_commits / "metrics/test_c.json").write_text(json.dumps({"recall@1": 0.7}))
    report = _write(two_commits, base="HEAD~1", max_drop=50.0)
    assert report.undeclared == ["metrics/test_c.json"] and report.failures == []
    text = (two_commits / "r.md").read_text()
    assert ("Not declared as metrics in dvc.yaml (judged above from the file itself; `dvc metrics diff`, hence the "
            "tables below, leave it out): `metrics/test_c.json`.") in text
    assert "- `c`: new, recall@1 70.0 %" in text
    rows = _rows(text)
    assert rows[("metrics/train.json", "loss")] == ["—", "0.25", "—"]  # a plain stage's metrics
    assert rows[("metrics/train.json", "best.recall@1")] == ["—", "0.5", "—"]
    assert rows[("metrics/test_a.json", "recall@1")] == ["0.5", "0.4", "-0.1"]  # a foreach stage's metrics
    assert ("metrics/test_c.json", "recall@1") not in rows
    assert "Declared as metrics in dvc.yaml but missing in the working tree: `metrics/never_written.json`." in text
    # BASE declared test_c.json at the top level, and had none
    missing_at_base = f"Declared as metrics in dvc.yaml but missing at BASE `{_short(two_commits)}`: "
    assert missing_at_base + "`metrics/test_c.json`." in text


def test_an_unreadable_declared_metrics_file_is_an_error(two_commits, tmp_path):
    out = _empty(tmp_path)
    (two_commits / "dvc.yaml").write_text(PIPELINE)
    (two_commits / "metrics/train.json").write_text('{"loss": 0.2')
    proc = _report(two_commits, "--base", "HEAD~1", out=out)
    assert proc.returncode == 2 and not list(out.iterdir())
    assert proc.stderr.strip().splitlines() == [
        "error: metrics/train.json in the working tree: the metrics file that dvc.yaml declares cannot be read (JSON "
        "file structure is corrupted); resolve it (a merge conflict, a truncated write?) or rerun the stage that "
        "writes it"]


@pytest.mark.parametrize("option, path", [("--out", "metrics/test_a.json"), ("--plot", "metrics/recall_a.csv"),
                                          ("--out", "params.yaml"), ("--plot", "dvc.yaml")])
def test_an_output_never_replaces_a_file_the_report_reads(two_commits, tmp_path, option, path):
    out = _empty(tmp_path)
    target = two_commits / path
    before = target.read_bytes()
    outputs = {"--out": str(out / "r.md"), "--plot": str(out / "r.png"), option: str(target)}
    proc = subprocess.run([sys.executable, "-m", "stages.report", "--repo", str(two_commits), "--base", "HEAD~1",
                           *[x for pair in outputs.items() for x in pair]], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {target}: ") and option in line and "must not replace" in line, line
    assert target.read_bytes() == before and not list(out.iterdir())


def test_an_output_on_a_file_that_only_base_has_is_refused_too(two_commits, tmp_path):
    (two_commits / "metrics/test_b.json").unlink()  # read from BASE with git show: the ledger is told
    proc = subprocess.run([sys.executable, "-m", "stages.report", "--repo", str(two_commits), "--base", "HEAD~1",
                           "--out", str(two_commits / "metrics/test_b.json"), "--plot", str(tmp_path / "r.png")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 2 and not (two_commits / "metrics/test_b.json").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: {two_commits / 'metrics/test_b.json'}: read as an input (the metrics of b at BASE) and given as the "
        f"output --out; an output must not replace a file the command reads"]


# ------------------------------------------------------------------------ `make report`: BASE and MAX_DROP as data

def _make_report(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """The real `make report` of this project's Makefile, run in ``repo`` with this interpreter."""
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(["make", "--no-print-directory", "report", f"REPORT_PYTHON={sys.executable}", *args],
                          cwd=repo, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("branch", ["it's-base", "x';>pwned;'", "v$(HOME)"])
def test_make_report_passes_base_as_data_whatever_the_branch_name(two_commits, branch):
    _git(two_commits, "branch", branch, "HEAD~1")
    proc = _make_report(two_commits, f"BASE={branch}", "MAX_DROP=50")
    assert proc.returncode == 0, proc.stderr
    assert not (two_commits / "pwned").exists()  # the name ran no shell
    text = (two_commits / "report.md").read_text()
    assert f"BASE: {branch}, commit `{_short(two_commits)}`" in text
    assert _rows(text)[("params.yaml", "train.lr")] == ["0.01", "0.02", "+0.01"]


@pytest.mark.parametrize("value", ["none", ""])
def test_make_report_refuses_an_unset_max_drop(two_commits, value):
    proc = _make_report(two_commits, "BASE=HEAD~1", f"MAX_DROP={value}")
    assert proc.returncode != 0 and not (two_commits / "report.md").exists()
    assert f"error: --max-drop must be a number of percentage points >= 0, got {value!r}" in proc.stderr
    if value == "none":
        without = _make_report(two_commits, "BASE=HEAD~1")  # left out: a report without a gate
        assert without.returncode == 0 and "Passes" not in (two_commits / "report.md").read_text()
