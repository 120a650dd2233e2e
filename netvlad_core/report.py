"""What a change did, for review: the working tree's params, metrics and recall@N curves against a git revision.

:func:`write_report` asks DVC (its Python API, in this process) for the params and metrics files the pipeline
declares in dvc.yaml at BASE and in the working tree, and for their differences (what ``dvc params diff BASE`` and
``dvc metrics diff BASE --all`` show), so the tables hold what DVC shows. It reads each model's metrics file
(``--metrics``) itself, strictly, for the recall@1 gate, and the recall@N curve CSVs; those of BASE with
``git show BASE:path`` (they are committed, ``cache: false``), so no DVC remote is needed. It writes a Markdown
report (the two tables, numbers to 4 significant digits with a signed change column, one verdict line per model
on its recall@1) and one PNG with the curves of both revisions. Both files are written atomically, after every
input was read.

What is a gate failure and what is bad input:

- the gate (``max_drop`` set) fails, the report being written all the same, when a model's recall@1 dropped by
  more than ``max_drop`` points, or the working tree has no usable recall@1 for a model: its recall@1 is there but
  null, a boolean, text or another non-number, NaN or infinite; or it was a number at BASE and is now gone (the
  metrics file deleted, or without the key). A recall@1 at BASE that is not a number is named in the verdict and
  not compared against (the change cannot repair BASE; its working-tree value is judged all the same).
- bad input raises :class:`NetVLADError` and writes nothing: not a git repository, an unknown BASE, no metrics at
  BASE or in the working tree, a metrics file (of ``--metrics``, or declared in dvc.yaml) or params file that
  cannot be read at BASE or in the working tree (not valid JSON: merge-conflict markers, a truncated write), a
  recall@N curve with a value that is not a finite number, an output that is a file the report reads.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import option
from .errors import NetVLADError
from .io import atomic_path, distinct_paths, note_read

#: Where the default BASE comes from: the merge base of HEAD with the first of these that exists.
BASE_BRANCHES = ("main", "origin/main", "master", "origin/master")


@dataclass
class ReportConfig:
    """What ``report`` compares and when it fails."""

    base: str | None = option(None, "Git revision to compare the working tree against; unset: the merge base of "
                              "HEAD with main (else origin/main, master, origin/master; HEAD when none exists).")
    max_drop: float | None = option(None, "The gate: exit with status 1 when a model's recall@1 is lower than at "
                                    "BASE by more than this many percentage points, or when the working tree has "
                                    "no usable recall@1 for a model (null, not a number, a boolean, NaN or "
                                    "infinite; or gone where BASE had one); the report is written all the same. "
                                    "Left out: no gate.")
    metrics: str = option("metrics/test_*.json", "The models' metrics files (JSON), a glob relative to the "
                          "repository whose * is the model name: each gets a verdict line on its recall@1; one "
                          "that dvc.yaml does not declare as metrics is named as such.")
    curves: str = option("metrics/recall_*.csv", "The models' recall@N curves (CSV with columns n and recall), a "
                         "glob relative to the repository whose * is the model name: plotted at BASE and in the "
                         "working tree.")
    bench_table: str = option("metrics/bench_table.md", "The benchmark suite's combined table (Markdown, written by "
                              "dvc.yaml's bench-table stage), relative to the repository: included as it is in the "
                              "working tree when it lists a benchmark.")

    def validate(self) -> None:
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise NetVLADError(f"--max-drop must be a number of points >= 0, got {self.max_drop}")
        for name, pattern in (("--metrics", self.metrics), ("--curves", self.curves)):
            if pattern.count("*") != 1 or os.path.isabs(pattern):
                raise NetVLADError(f"{name} must be a path relative to the repository with one * (the model name), "
                                   f"got {pattern!r}")
        if not self.metrics.endswith(".json"):
            raise NetVLADError(f"--metrics must name JSON files (the metrics `evaluate` writes), got {self.metrics!r}")


def parse_max_drop(text: str | None) -> float | None:
    """The gate's ``--max-drop`` as given on the command line (``None``: not given, no gate). A given value must be a
    number: ``none``, ``null`` or an empty value (``make report MAX_DROP=``) would turn the gate off without a word,
    so they are refused like any other text."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise NetVLADError(f"--max-drop must be a number of percentage points >= 0, got {text!r} (leave --max-drop, "
                           f"or MAX_DROP of `make report`, out for a report without a gate)") from None
    if not (math.isfinite(value) and value >= 0):
        raise NetVLADError(f"--max-drop must be a number of percentage points >= 0, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------- formatting


def format_value(value: Any) -> str:
    """A table cell: integers as they are, other numbers to 4 significant digits, ``—`` when absent, anything else
    (a param's text, list or switch) as written in params.yaml."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def format_change(change: Any) -> str:
    """The change column: signed, to 4 significant digits (integers exactly); ``0`` for no change, ``—`` when
    either side is absent or not a number."""
    if not _is_number(change):
        return "—"
    if change == 0:
        return "0"
    return f"{change:+d}" if isinstance(change, int) else f"{change:+.4g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` inside a cell is escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe_value(value: Any) -> str | None:
    """``None`` when ``value`` is a finite number (a boolean is not one); else what it is, for a verdict line:
    ``null``, ``NaN``, ``infinite``, ``true (a boolean)``, ``"high" (text)`` …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            return f"{'-' if value < 0 else ''}infinite (an integer too large for a float)"
        if math.isnan(number):
            return "NaN"
        return None if math.isfinite(number) else f"{'-' if number < 0 else ''}infinite"
    kind = {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    shown = json.dumps(value, allow_nan=True)
    return f"{shown if len(shown) <= 40 else shown[:37] + '...'} ({kind})"


def verdict(model: str, old: float | None, new: float | None, *, before: str | None = None,
            now: str | None = None) -> str:
    """One line on a model's recall@1 (fractions in, percentage points out): ``trained: recall@1 +2.3 points
    (71.0 % → 73.3 %)``. ``now``: why the working tree has no usable recall@1 (a gate failure); ``before``: what
    BASE's recall@1 is when it is there but not a number."""
    if now is not None:
        at_base = (f"; it was {100 * old:.1f} % at BASE" if old is not None else
                   f"; at BASE recall@1 is {before}" if before is not None else "")
        return f"`{model}`: no usable recall@1 in the working tree: {now}{at_base}"
    if before is not None:
        work = f"{100 * new:.1f} % in the working tree" if new is not None else "none in the working tree"
        return f"`{model}`: recall@1 at BASE is {before}, not a number: nothing to compare against; {work}"
    if old is None and new is None:
        return f"`{model}`: no recall@1 at BASE nor in the working tree"
    if old is None:
        return f"`{model}`: new, recall@1 {100 * new:.1f} %"
    if new is None:
        return f"`{model}`: removed (recall@1 was {100 * old:.1f} % at BASE)"
    if new == old:
        return f"`{model}`: recall@1 unchanged ({100 * new:.1f} %)"
    return f"`{model}`: recall@1 {100 * (new - old):+.1f} points ({100 * old:.1f} % → {100 * new:.1f} %)"


# ---------------------------------------------------------------------------------------------------- git and DVC


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _tool(repo: Path, args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        raise NetVLADError(f"{what}: {args[0]} not found") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise NetVLADError(f"{repo}: {what} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.stdout


def _git(repo: Path, *args: str) -> str:
    return _tool(repo, ["git", *args], f"git {args[0]}")


def _commit(repo: Path, rev: str) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def resolve_base(repo: Path, base: str | None) -> tuple[str, str]:
    """(how BASE is named in the report, its commit) for ``base``, or when it is unset the merge base of HEAD with
    the first of :data:`BASE_BRANCHES` that exists (HEAD itself when none does)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise NetVLADError(f"{repo}: no such folder")
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=repo, capture_output=True, text=True)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        raise NetVLADError(f"{repo}: not a git working tree; the report compares it against a git revision")
    if _commit(repo, "HEAD") is None:
        raise NetVLADError(f"{repo}: the repository has no commit yet; nothing to compare against")
    if base is not None:
        sha = _commit(repo, base)
        if sha is None:
            raise NetVLADError(f"{base!r} is not a git revision of {repo}")
        return base, sha
    for branch in BASE_BRANCHES:
        if _commit(repo, branch) is not None:
            sha = _git(repo, "merge-base", "HEAD", branch).strip()
            return f"merge base of HEAD and {branch}", sha
    return "HEAD (no main or master branch)", _commit(repo, "HEAD")


#: The files DVC reads to know the pipeline and its default params (recorded as inputs: no output may replace them).
DVC_FILES = ("dvc.yaml", "dvc.lock", "params.yaml")


@dataclass
class DvcTables:
    """What DVC says about BASE and the working tree: the params and metrics files dvc.yaml declares in each
    (``{"base"|"work": {path: missing}}``: ``missing`` is True when DVC lists the file but it is not there) and the
    differences of their values (``dvc params diff`` and ``dvc metrics diff --all`` as ``{path: {key: {"old",
    "new", "diff"}}}``)."""

    params: dict[str, dict[str, bool]]
    metrics: dict[str, dict[str, bool]]
    params_diff: dict
    metrics_diff: dict


def _declared(shown: dict, rev: str, where: str, kind: str) -> dict[str, bool]:
    """{path: missing} of the ``kind`` files DVC listed for ``rev`` in ``shown`` (a ``Repo.metrics.show`` or
    ``Repo.params.show`` result); a file DVC could not read raises one :class:`NetVLADError`."""
    result = shown.get(rev, {})
    if result.get("error") is not None:
        raise NetVLADError(f"DVC cannot read the pipeline {where}: {_first_line(result['error'])}")
    files = {}
    for path, entry in result.get("data", {}).items():
        path = Path(path).as_posix()
        error = entry.get("error")
        if isinstance(error, NetVLADError):  # our FileLedger refused the read: an output names this input
            raise error
        if error is not None and not isinstance(error, FileNotFoundError):
            message = re.sub(r"^unable to read: '[^']*',\s*", "", _first_line(error))  # DVC names a relative path
            raise NetVLADError(f"{path} {where}: the {kind} file that dvc.yaml declares cannot be read ({message}); "
                               f"resolve it (a merge conflict, a truncated write?) or rerun the stage that writes it")
        files[path] = error is not None
    return files


def dvc_tables(repo: Path, sha: str) -> DvcTables:
    """Ask DVC (its Python API) for the params and metrics files of commit ``sha`` and of the working tree of
    ``repo`` and for their differences. Unreadable files raise :class:`NetVLADError` (``dvc metrics diff`` would
    show their values as absent without a word); every file is recorded as read (:func:`note_read`, by its
    working-tree path: those of BASE come from git, not from the file)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    where = {"workspace": "in the working tree", sha: f"at BASE {sha[:7]}"}
    try:
        with Repo(str(repo)) as dvc:
            shown_metrics = dvc.metrics.show(revs=[sha], hide_workspace=False)
            shown_params = dvc.params.show(revs=[sha], hide_workspace=False)
            metrics = {side: _declared(shown_metrics, rev, where[rev], "metrics")
                       for side, rev in (("base", sha), ("work", "workspace"))}
            params = {side: _declared(shown_params, rev, where[rev], "params")
                      for side, rev in (("base", sha), ("work", "workspace"))}
            for kind, files in (("metrics", metrics), ("params", params)):
                for path in sorted(set(files["base"]) | set(files["work"])):
                    note_read(repo / path, f"a {kind} file DVC compares")
            metrics_diff = dvc.metrics.diff(a_rev=sha, all=True).get("diff", {})
            params_diff = dvc.params.diff(a_rev=sha).get("diff", {})
    except DvcException as e:
        raise NetVLADError(f"{repo}: DVC cannot compare it with {sha[:7]}: {_first_line(e)}") from None

    def posix(diff: dict) -> dict:
        return {Path(path).as_posix(): entries for path, entries in diff.items()}

    return DvcTables(params=params, metrics=metrics, params_diff=posix(params_diff), metrics_diff=posix(metrics_diff))


# ---------------------------------------------------------------------------------------------------- input files


def _model_of(pattern: str, path: str) -> str | None:
    prefix, suffix = pattern.split("*")
    if fnmatch.fnmatchcase(path, pattern) and "/" not in path[len(prefix):len(path) - len(suffix)]:
        return path[len(prefix):len(path) - len(suffix)]
    return None


def _files_at(repo: Path, sha: str | None, pattern: str) -> dict[str, str]:
    """{model: path} of the files matching ``pattern`` in commit ``sha`` (the working tree when ``None``)."""
    if sha is None:
        paths = [p.relative_to(repo).as_posix() for p in repo.glob(pattern) if p.is_file()]
    else:
        folder = os.path.dirname(pattern) or "."
        listed = _git(repo, "ls-tree", "-r", "--name-only", sha, "--", folder if folder == "." else f"{folder}/")
        paths = [p for p in listed.splitlines() if p]
    found = {model: path for path in sorted(paths) if (model := _model_of(pattern, path)) is not None}
    return found


def _read_text(repo: Path, sha: str | None, path: str, what: str) -> tuple[str, str]:
    """(the text of ``path`` in commit ``sha`` or, when ``None``, the working tree; how to name it in a message).
    The file is recorded as read either way (``git show`` does not go through Python's ``open``)."""
    if sha is not None:
        note_read(repo / path, f"{what} at BASE")
        return _git(repo, "show", f"{sha}:./{path}"), f"{path} at BASE {sha[:7]}"  # ./: relative to repo
    where = str(repo / path)
    try:
        return (repo / path).read_text(), where
    except (OSError, UnicodeDecodeError) as e:
        raise NetVLADError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


_CONFLICT_MARKER = re.compile(r"^(<{7}|={7}|>{7})(\s|$)", re.M)


def parse_metrics(text: str, where: str) -> dict:
    """A metrics file's JSON object. Python's JSON reading (``NaN``, ``Infinity`` accepted: ``json.dump`` writes
    them) as DVC reads it; what is not a JSON object raises one :class:`NetVLADError` naming ``where``."""
    if _CONFLICT_MARKER.search(text):
        raise NetVLADError(f"{where}: holds merge-conflict markers; resolve the conflict (or rerun the stage that "
                           f"writes it)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise NetVLADError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); a truncated write? Rerun the "
                           f"stage that writes it") from None
    if not isinstance(doc, dict):
        raise NetVLADError(f"{where}: not a metrics file (a JSON object of metric names and values)")
    return doc


def _parse_curve(text: str, where: str) -> tuple[list[float], list[float]]:
    not_a_curve = NetVLADError(f"{where}: not a recall@N curve (a CSV with numeric columns n and recall)")
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error:
        raise not_a_curve from None
    if rows and not {"n", "recall"} <= set(rows[0]):
        raise not_a_curve
    points = []
    for line, row in enumerate(rows, start=2):
        values = []
        for column in ("n", "recall"):
            cell = row.get(column)
            try:
                value = float(cell)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise NetVLADError(f"{where}: line {line}: {column} {cell!r} is not a finite number")
            values.append(value)
        points.append(tuple(values))
    if not points:
        raise NetVLADError(f"{where}: the recall@N curve has no rows")
    points.sort()
    return [n for n, _ in points], [r for _, r in points]


def read_curves(repo: Path, sha: str | None, pattern: str) -> dict[str, tuple[list[float], list[float]]]:
    """{model: (N values, recall values)} of the curve CSVs in commit ``sha`` (read with ``git show``) or, when
    ``sha`` is ``None``, in the working tree."""
    curves = {}
    for model, path in _files_at(repo, sha, pattern).items():
        curves[model] = _parse_curve(*_read_text(repo, sha, path, f"the recall@N curve of {model}"))
    return curves


def plot_curves(base: dict, work: dict, base_name: str, path: Path) -> None:
    """One PNG at ``path`` (written as it is: callers write to a temporary name): each model's recall@N at BASE
    (dashed) and in the working tree (solid, same colour), N on a log axis. Drawn on a bare matplotlib Figure (no
    pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    models = sorted(set(base) | set(work))
    for i, model in enumerate(models):
        colour = f"C{i % 10}"
        if model in base:
            ax.plot(*base[model], linestyle="--", marker="o", markersize=3, color=colour, alpha=0.7,
                    label=f"{model} (BASE)")
        if model in work:
            ax.plot(*work[model], linestyle="-", marker="o", markersize=3, color=colour, label=model)
    ax.set_xscale("log")
    ticks = sorted({n for curve in (*base.values(), *work.values()) for n in curve[0]})
    ax.set_xticks(ticks, [f"{n:g}" for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("N")
    ax.set_ylabel("recall@N")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"recall@N: working tree (solid) vs BASE {base_name} (dashed)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What :func:`write_report` found: BASE; each model's recall@1 at BASE and now (``{model: (old, new)}``, a
    fraction, ``None`` where there is no usable number); ``unusable``: why the working tree has no usable recall@1
    for a model, where that fails the gate; ``base_unusable``: what BASE's recall@1 is where it is there but not a
    number; ``failures``: the models that fail the gate (none when ``max_drop`` is ``None``); ``undeclared``: the
    models' metrics files that dvc.yaml does not declare as metrics."""

    base_name: str
    base_sha: str
    recall1: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)
    base_unusable: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    undeclared: list[str] = field(default_factory=list)
    max_drop: float | None = None

    def verdicts(self) -> list[str]:
        return [verdict(model, old, new, before=self.base_unusable.get(model), now=self.unusable.get(model))
                for model, (old, new) in self.recall1.items()]

    def failure_line(self) -> str | None:
        """One line naming the models that fail the gate (a drop of more than ``max_drop`` points, no usable
        recall@1 in the working tree), or ``None``."""
        drops = [m for m in self.failures if m not in self.unusable]
        gone = [m for m in self.failures if m in self.unusable]
        parts = []
        if drops:
            parts.append(f"recall@1 dropped by more than {_points(self.max_drop)} against {self.base_sha[:7]}: "
                         + ", ".join(f"{m} {100 * (self.recall1[m][1] - self.recall1[m][0]):+.1f}" for m in drops))
        if gone:
            def why(m: str) -> str:
                old = self.recall1[m][0]
                return self.unusable[m] + (f"; {100 * old:.1f} % at {self.base_sha[:7]}" if old is not None else "")
            parts.append("no usable recall@1 in the working tree: " + ", ".join(f"{m} ({why(m)})" for m in gone))
        return "; ".join(parts) or None


def _natural(text: str) -> list:
    """Sort key that puts recall@5 before recall@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _diff_rows(diff: dict, *, compute_change: bool) -> tuple[list[list[str]], list[list[str]]]:
    """Table rows (path, key, BASE, working tree, change) of a ``dvc … diff`` result, paths and keys in natural
    order: (the rows that changed, the rows that did not)."""
    changed, same = [], []
    for path in sorted(diff, key=_natural):
        entries = diff[path]
        for key in sorted(entries, key=_natural):
            entry = entries[key]
            old, new = entry.get("old"), entry.get("new")
            change = entry.get("diff")
            if change is None and compute_change and _is_number(old) and _is_number(new):
                change = new - old
            row = [path, key, format_value(old), format_value(new), format_change(change)]
            (same if "old" in entry and "new" in entry and old == new else changed).append(row)
    return changed, same


def _points(value: float) -> str:
    return f"{value:g} point{'' if value == 1 else 's'}"


_ABSENT = object()


def _recall1(repo: Path, sha: str | None, files: dict[str, str]) -> dict[str, Any]:
    """{model: its recall@1 value as written (any JSON value; ``_ABSENT`` without the key)} of the metrics files
    ``files`` ({model: path}) in commit ``sha`` or the working tree; a file that is not a JSON object raises."""
    values = {}
    for model, path in files.items():
        doc = parse_metrics(*_read_text(repo, sha, path, f"the metrics of {model}"))
        values[model] = doc.get("recall@1", _ABSENT)
    return values


def judge(report: Report, base: dict[str, Any], work: dict[str, Any], work_files: dict[str, str],
          max_drop: float | None) -> None:
    """Fill ``report`` with each model's recall@1 and verdict from the values of BASE and the working tree
    (``{model: value as written}``, ``_ABSENT`` or no entry: none); ``work_files`` names the working tree's metrics
    files ({model: path}) and, for the models that have none, the path they had at BASE."""
    for model in sorted(set(base) | set(work)):
        before, now = base.get(model, _ABSENT), work.get(model, _ABSENT)
        old = new = None
        if before is not _ABSENT:
            problem = describe_value(before)
            if problem is None:
                old = float(before)
            else:
                report.base_unusable[model] = problem
        if now is not _ABSENT:
            problem = describe_value(now)
            if problem is None:
                new = float(now)
            else:
                report.unusable[model] = f"recall@1 is {problem}"
        elif old is not None:  # it existed at BASE and is gone
            path = work_files[model]
            report.unusable[model] = f"{path} {'has no recall@1' if model in work else 'is missing'}"
        report.recall1[model] = (old, new)
        if max_drop is None:
            continue
        # 1e-9: a drop of exactly max_drop points is not more than it, whatever the float rounding of old - new
        if model in report.unusable or (old is not None and new is not None and 100 * (old - new) > max_drop + 1e-9):
            report.failures.append(model)


def write_report(repo: str | os.PathLike, report_md: str | os.PathLike, plot_png: str | os.PathLike, *,
                 cfg: ReportConfig) -> Report:
    """Compare the working tree of ``repo`` with ``cfg.base`` and write ``report_md`` and ``plot_png``.

    The Markdown report names BASE, gives one verdict line per model (recall@1 in points), the params DVC lists
    as changed, every metric of both revisions (``dvc metrics diff --all``) and links the PNG by its path relative
    to the report. Returns the :class:`Report`; its ``failures`` name the models that fail the gate when
    ``cfg.max_drop`` is set (the caller decides what that means for its exit status). Bad input (see the module's
    text) raises :class:`NetVLADError` before anything is written."""
    repo = Path(repo).resolve()
    report_md, plot_png = Path(report_md), Path(plot_png)
    distinct_paths({}, {"--out": report_md, "--plot": plot_png})  # the FileLedger then refuses them as inputs
    base_name, sha = resolve_base(repo, cfg.base)
    short = sha[:7]
    for name in DVC_FILES:
        note_read(repo / name, "read by DVC")
    base_metrics = _files_at(repo, sha, cfg.metrics)
    if not base_metrics:
        raise NetVLADError(f"BASE {base_name} ({short}) has no committed {cfg.metrics}: nothing to compare against")
    work_metrics = _files_at(repo, None, cfg.metrics)
    if not work_metrics:
        raise NetVLADError(f"{repo}: the working tree has no {cfg.metrics}; run `dvc repro` first")
    base_recall = _recall1(repo, sha, base_metrics)
    work_recall = _recall1(repo, None, work_metrics)
    tables = dvc_tables(repo, sha)
    base_curves = read_curves(repo, sha, cfg.curves)
    work_curves = read_curves(repo, None, cfg.curves)
    if not base_curves and not work_curves:
        raise NetVLADError(f"{repo}: no {cfg.curves} at BASE {short} nor in the working tree: no curve to plot")

    report = Report(base_name=base_name, base_sha=sha, max_drop=cfg.max_drop)
    judge(report, base_recall, work_recall, {**base_metrics, **work_metrics}, cfg.max_drop)
    report.undeclared = sorted({path for model, path in work_metrics.items() if path not in tables.metrics["work"]}
                               | {path for model, path in base_metrics.items()
                                  if model not in work_metrics and path not in tables.metrics["base"]})

    head = _commit(repo, "HEAD")
    lines = ["# What this change does to the metrics", "",
             f"BASE: {base_name}, commit `{short}`. Compared with: the working tree on HEAD `{head[:7]}`. "
             "Numbers to 4 significant digits (integers exactly); recall as a fraction; change = working tree − BASE.",
             "", "## Verdict", ""]
    lines += [f"- {line}" for line in report.verdicts()]
    if report.undeclared:
        lines += ["", "Not declared as metrics in dvc.yaml (judged above from the file itself; `dvc metrics diff`, "
                  "hence the tables below, leave it out): " + ", ".join(f"`{p}`" for p in report.undeclared) + "."]
    if cfg.max_drop is not None:
        failure = report.failure_line()
        lines += ["", f"**Fails**: {failure}." if failure else
                  f"Passes: no recall@1 dropped by more than {_points(cfg.max_drop)}."]
    lines += ["", "## Params changed", ""]
    param_rows = sum(_diff_rows(tables.params_diff, compute_change=True), [])
    lines.append(markdown_table(["Path", "Param", f"BASE `{short}`", "working tree", "Change"], param_rows)
                 if param_rows else "No param changed.")
    lines += ["", "## Metrics that changed", ""]
    changed, same = _diff_rows(tables.metrics_diff, compute_change=False)
    header = ["Path", "Metric", f"BASE `{short}`", "working tree", "Change"]
    lines.append(markdown_table(header, changed) if changed else "No metric changed.")
    if same:
        lines += ["", f"<details><summary>{len(same)} metrics unchanged</summary>", "", markdown_table(header, same),
                  "", "</details>"]
    for side, where in (("base", f"at BASE `{short}`"), ("work", "in the working tree")):
        missing = sorted(path for path, gone in tables.metrics[side].items() if gone)
        if missing:
            lines += ["", f"Declared as metrics in dvc.yaml but missing {where}: "
                      + ", ".join(f"`{p}`" for p in missing) + "."]
    link = Path(os.path.relpath(plot_png.resolve(), report_md.resolve().parent)).as_posix()
    missing = [] if base_curves else [" (none at BASE)"]
    lines += ["", "## recall@N", "", f"![recall@N at BASE (dashed) and in the working tree (solid)]({link})"
              + "".join(missing), ""]
    suite = repo / cfg.bench_table
    if suite.is_file() and "| model |" in suite.read_text():  # the benchmark suite (netvlad_core.bench_table)
        lines += [suite.read_text().rstrip(), ""]

    with atomic_path(plot_png) as png, atomic_path(report_md) as md:  # both or neither
        plot_curves(base_curves, work_curves, short, png)
        md.write_text("\n".join(lines))
    return report
