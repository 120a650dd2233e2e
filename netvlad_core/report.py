"""What a change did, for review: the working tree's params, metrics and recall@N curves against a git revision.

:func:`write_report` asks DVC for the differences (``dvc params diff BASE --json``, ``dvc metrics diff BASE --all
--json``), so the tables hold what DVC shows, and reads the recall@N curve CSVs of BASE with ``git show BASE:path``
(they are committed, ``cache: false``), so no DVC remote is needed. It writes a Markdown report (the two tables,
numbers to 4 significant digits with a signed change column, one verdict line per model on its recall@1) and one
PNG with the curves of both revisions. Both files are written atomically, after every input was read: bad input
(not a git repository, an unknown BASE, no metrics at BASE or in the working tree) raises :class:`NetVLADError`
and writes nothing.
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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import option
from .errors import NetVLADError
from .io import atomic_path

#: Where the default BASE comes from: the merge base of HEAD with the first of these that exists.
BASE_BRANCHES = ("main", "origin/main", "master", "origin/master")


@dataclass
class ReportConfig:
    """What ``report`` compares and when it fails."""

    base: str | None = option(None, "Git revision to compare the working tree against; unset: the merge base of "
                              "HEAD with main (else origin/main, master, origin/master; HEAD when none exists).")
    max_drop: float | None = option(None, "Exit with status 1 when a model's recall@1 is lower than at BASE by more "
                                    "than this many percentage points (the report is written all the same); "
                                    "unset: never.")
    metrics: str = option("metrics/test_*.json", "The models' metrics files, a glob relative to the repository "
                          "whose * is the model name: each gets a verdict line on its recall@1.")
    curves: str = option("metrics/recall_*.csv", "The models' recall@N curves (CSV with columns n and recall), a "
                         "glob relative to the repository whose * is the model name: plotted at BASE and in the "
                         "working tree.")

    def validate(self) -> None:
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise NetVLADError(f"--max-drop must be a number of points >= 0, got {self.max_drop}")
        for name, pattern in (("--metrics", self.metrics), ("--curves", self.curves)):
            if pattern.count("*") != 1 or os.path.isabs(pattern):
                raise NetVLADError(f"{name} must be a path relative to the repository with one * (the model name), "
                                   f"got {pattern!r}")


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


def verdict(model: str, old: float | None, new: float | None) -> str:
    """One line on a model's recall@1 (fractions in, percentage points out): ``trained: recall@1 +2.3 points
    (71.0 % → 73.3 %)``."""
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


def _tool(repo: Path, args: list[str], what: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise NetVLADError(f"{what}: {args[0]} not found") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise NetVLADError(f"{repo}: {what} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.stdout


def _git(repo: Path, *args: str) -> str:
    return _tool(repo, ["git", *args], f"git {args[0]}")


def _dvc_json(repo: Path, *args: str) -> dict:
    out = _tool(repo, [sys.executable, "-m", "dvc", *args, "--json"], f"dvc {' '.join(args[:2])}")
    try:
        return json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        raise NetVLADError(f"{repo}: dvc {' '.join(args[:2])} --json printed no JSON: {out.strip()[:200]!r}") from None


def _commit(repo: Path, rev: str) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
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


# ---------------------------------------------------------------------------------------------------- curves


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


def _parse_curve(text: str, where: str) -> tuple[list[float], list[float]]:
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
        points = sorted((float(r["n"]), float(r["recall"])) for r in rows)
    except (KeyError, TypeError, ValueError, csv.Error):
        raise NetVLADError(f"{where}: not a recall@N curve (a CSV with numeric columns n and recall)") from None
    if not points:
        raise NetVLADError(f"{where}: the recall@N curve has no rows")
    return [n for n, _ in points], [r for _, r in points]


def read_curves(repo: Path, sha: str | None, pattern: str) -> dict[str, tuple[list[float], list[float]]]:
    """{model: (N values, recall values)} of the curve CSVs in commit ``sha`` (read with ``git show``) or, when
    ``sha`` is ``None``, in the working tree."""
    curves = {}
    for model, path in _files_at(repo, sha, pattern).items():
        if sha is None:
            text, where = (repo / path).read_text(), str(repo / path)
        else:
            text, where = _git(repo, "show", f"{sha}:./{path}"), f"{sha[:7]}:{path}"  # ./: relative to repo
        curves[model] = _parse_curve(text, where)
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
    """What :func:`write_report` found: BASE, each model's recall@1 at BASE and now (``{model: (old, new)}``), and
    the models whose recall@1 dropped by more than ``max_drop`` points."""

    base_name: str
    base_sha: str
    recall1: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    max_drop: float | None = None

    def verdicts(self) -> list[str]:
        return [verdict(model, old, new) for model, (old, new) in self.recall1.items()]

    def failure_line(self) -> str | None:
        """One line naming the models whose recall@1 dropped by more than ``max_drop`` points, or ``None``."""
        if not self.failures:
            return None
        drops = ", ".join(f"{m} {100 * (self.recall1[m][1] - self.recall1[m][0]):+.1f}" for m in self.failures)
        return f"recall@1 dropped by more than {_points(self.max_drop)} against {self.base_sha[:7]}: {drops}"


def _natural(text: str) -> list:
    """Sort key that puts recall@5 before recall@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _diff_rows(diff: dict, *, compute_change: bool) -> tuple[list[list[str]], list[list[str]]]:
    """Table rows (path, key, BASE, working tree, change) of a ``dvc … diff --json`` document, paths and keys in
    natural order: (the rows that changed, the rows that did not)."""
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


def write_report(repo: str | os.PathLike, report_md: str | os.PathLike, plot_png: str | os.PathLike, *,
                 cfg: ReportConfig) -> Report:
    """Compare the working tree of ``repo`` with ``cfg.base`` and write ``report_md`` and ``plot_png``.

    The Markdown report names BASE, gives one verdict line per model (recall@1 in points), the params DVC lists
    as changed, every metric of both revisions (``dvc metrics diff --all``) and links the PNG by its path relative
    to the report. Returns the :class:`Report`; its ``failures`` name the models whose recall@1 dropped by more
    than ``cfg.max_drop`` points (the caller decides what that means for its exit status)."""
    repo = Path(repo).resolve()
    report_md, plot_png = Path(report_md), Path(plot_png)
    if report_md.resolve() == plot_png.resolve():
        raise NetVLADError(f"{report_md}: given as the report and as the plot; each output must be a file of its own")
    base_name, sha = resolve_base(repo, cfg.base)
    short = sha[:7]
    base_metrics = _files_at(repo, sha, cfg.metrics)
    if not base_metrics:
        raise NetVLADError(f"BASE {base_name} ({short}) has no committed {cfg.metrics}: nothing to compare against")
    work_metrics = _files_at(repo, None, cfg.metrics)
    if not work_metrics:
        raise NetVLADError(f"{repo}: the working tree has no {cfg.metrics}; run `dvc repro` first")

    params = _dvc_json(repo, "params", "diff", sha)
    metrics = _dvc_json(repo, "metrics", "diff", sha, "--all")
    base_curves = read_curves(repo, sha, cfg.curves)
    work_curves = read_curves(repo, None, cfg.curves)
    if not base_curves and not work_curves:
        raise NetVLADError(f"{repo}: no {cfg.curves} at BASE {short} nor in the working tree: no curve to plot")

    report = Report(base_name=base_name, base_sha=sha, max_drop=cfg.max_drop)
    for model in sorted(set(base_metrics) | set(work_metrics)):
        path = work_metrics.get(model) or base_metrics[model]
        entry = metrics.get(path, {}).get("recall@1", {})
        old, new = entry.get("old"), entry.get("new")
        report.recall1[model] = (old, new)
        # 1e-9: a drop of exactly max_drop points is not more than it, whatever the float rounding of old - new
        if cfg.max_drop is not None and _is_number(old) and _is_number(new) and 100 * (old - new) > cfg.max_drop + 1e-9:
            report.failures.append(model)

    head = _commit(repo, "HEAD")
    lines = ["# What this change does to the metrics", "",
             f"BASE: {base_name}, commit `{short}`. Compared with: the working tree on HEAD `{head[:7]}`. "
             "Numbers to 4 significant digits (integers exactly); recall as a fraction; change = working tree − BASE.",
             "", "## Verdict", ""]
    lines += [f"- {line}" for line in report.verdicts()]
    if cfg.max_drop is not None:
        failure = report.failure_line()
        lines += ["", f"**Fails**: {failure}." if failure else
                  f"Passes: no recall@1 dropped by more than {_points(cfg.max_drop)}."]
    lines += ["", "## Params changed", ""]
    param_rows = sum(_diff_rows(params, compute_change=True), [])
    lines.append(markdown_table(["Path", "Param", f"BASE `{short}`", "working tree", "Change"], param_rows)
                 if param_rows else "No param changed.")
    lines += ["", "## Metrics that changed", ""]
    changed, same = _diff_rows(metrics, compute_change=False)
    header = ["Path", "Metric", f"BASE `{short}`", "working tree", "Change"]
    lines.append(markdown_table(header, changed) if changed else "No metric changed.")
    if same:
        lines += ["", f"<details><summary>{len(same)} metrics unchanged</summary>", "", markdown_table(header, same),
                  "", "</details>"]
    link = Path(os.path.relpath(plot_png.resolve(), report_md.resolve().parent)).as_posix()
    missing = [] if base_curves else [" (none at BASE)"]
    lines += ["", "## recall@N", "", f"![recall@N at BASE (dashed) and in the working tree (solid)]({link})"
              + "".join(missing), ""]

    with atomic_path(plot_png) as png, atomic_path(report_md) as md:  # both or neither
        plot_curves(base_curves, work_curves, short, png)
        md.write_text("\n".join(lines))
    return report
