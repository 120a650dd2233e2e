"""Experiments at a glance: for each DVC experiment, the params it changed and recall@1/5 of every model on every
benchmark, in a table that fits a terminal (``netvlad compare``, ``make compare``).

``dvc exp show`` lists every param and metric as a column named after its file and key
(``metrics/test_trained.json:recall@1``): with three models, a benchmark suite and 60 params, a 120-column terminal
shows only ``…``. :func:`compare` reads the same data (``dvc exp show --json``) and lays it out the other way round:
one block of lines per experiment (the workspace, each baseline commit and the experiments derived from it), one
line per model, one column pair per benchmark (``test`` is the pipeline's own test split, ``metrics/test_<model>.json``;
the suite's are ``metrics/bench/<model>/<benchmark>.json``), and beside them the params that differ from the
experiment's baseline (for the workspace: from HEAD). Benchmarks that do not fit the width go to a second table.
"""

from __future__ import annotations

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


@dataclass
class CompareConfig:
    """What ``compare`` shows and how wide."""

    recall_ns: tuple[int, ...] = option((1, 5), "N of the recall@N shown per model and benchmark (repeat the option "
                                        "for several).", name="recall-n")
    width: int = option(120, "Columns of the terminal: benchmarks that do not fit go to a further table.")
    all_commits: bool = option(False, "Every commit's experiments (dvc exp show -A), not only those of HEAD.")
    own_metrics: str = option("metrics/test_{model}.json", "The pipeline's own models' metrics files (shown as "
                              "benchmark 'test'): a path with {model}.")
    bench_metrics: str = option("metrics/bench/{model}/{benchmark}.json", "The benchmark suite's metrics files: a "
                                "path with {model} and {benchmark}.")

    def validate(self) -> None:
        if not self.recall_ns or any(int(n) < 1 for n in self.recall_ns):
            raise NetVLADError(f"--recall-n must be positive integers, got {list(self.recall_ns)}")
        if self.width < 60:
            raise NetVLADError(f"--width must be at least 60 columns, got {self.width}")
        if "{model}" not in self.own_metrics:
            raise NetVLADError(f"--own-metrics must contain {{model}}, got {self.own_metrics!r}")
        if "{model}" not in self.bench_metrics or "{benchmark}" not in self.bench_metrics:
            raise NetVLADError(f"--bench-metrics must contain {{model}} and {{benchmark}}, got {self.bench_metrics!r}")


@dataclass
class Experiment:
    """One row of ``dvc exp show``: its name, kind (workspace, baseline, experiment), params (flattened, dotted
    keys) and recall per (model, benchmark)."""

    name: str
    kind: str
    params: dict[str, Any]
    recall: dict[tuple[str, str], dict[str, Any]]
    baseline: Experiment | None = None
    changed: list[str] = field(default_factory=list)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data} if prefix else {}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{model\}|\{benchmark\})", template)
    regex = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p in ("{model}", "{benchmark}") else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


def _recall(metrics: dict[str, Any], cfg: CompareConfig) -> dict[tuple[str, str], dict[str, Any]]:
    own, bench = _pattern(cfg.own_metrics), _pattern(cfg.bench_metrics)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path, entry in (metrics or {}).items():
        data = (entry or {}).get("data") or {}
        path = path.replace(os.sep, "/")
        found = own.match(path)
        if found:
            key = (found["model"], "test")
        else:
            found = bench.match(path)
            if not found:
                continue
            key = (found["model"], found["benchmark"])
        out[key] = {f"recall@{n}": data.get(f"recall@{n}") for n in cfg.recall_ns}
    return out


def _row(entry: dict, kind: str, cfg: CompareConfig) -> Experiment:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    rev = str(entry.get("rev") or "")
    name = entry.get("name") or (rev if kind == "workspace" else rev[:7])
    if kind == "baseline" and entry.get("name") and rev:
        name = f"{entry['name']} ({rev[:7]})"
    return Experiment(name=name, kind=kind, params=_flatten(params), recall=_recall(data.get("metrics"), cfg))


def experiments_from_json(rows: list, cfg: CompareConfig) -> list[Experiment]:
    """The workspace, each baseline commit and its experiments from ``dvc exp show --json`` (DVC 3), each with the
    params it changed against its baseline (the workspace against the first baseline, HEAD)."""
    if not isinstance(rows, list):
        raise NetVLADError("dvc exp show --json: expected a list of revisions")
    out: list[Experiment] = []
    workspace = None
    for entry in rows:
        if not isinstance(entry, dict):
            continue
        if entry.get("rev") == "workspace":
            workspace = _row(entry, "workspace", cfg)
            out.append(workspace)
            continue
        base = _row(entry, "baseline", cfg)
        out.append(base)
        if workspace is not None and workspace.baseline is None:
            workspace.baseline = base
        for group in entry.get("experiments") or []:
            revs = (group or {}).get("revs") or []
            if revs:
                exp = _row(revs[0], "experiment", cfg)
                if exp.name == revs[0].get("rev", "")[:7] and group.get("name"):
                    exp.name = group["name"]
                exp.baseline = base
                out.append(exp)
    for exp in out:
        if exp.baseline is not None:
            exp.changed = changed_params(exp.params, exp.baseline.params)
    return out


def _subtree(key: str, params: dict[str, Any], other: dict[str, Any]) -> str | None:
    """The shortest prefix of ``key`` under which ``other`` has nothing (a whole entry added or removed)."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if not any(k == prefix or k.startswith(prefix + ".") for k in other):
            return prefix if i < len(parts) else None
    return None


def changed_params(params: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """``key=value`` for each param that differs from ``baseline`` (sorted); a whole entry added or removed (a
    benchmark, a released model) is one ``key (added)`` / ``key (removed)``."""
    out: list[str] = []
    for key in sorted(set(params) | set(baseline)):
        value = params[key] if key in params else baseline[key]
        other = baseline if key in params else params
        if value == {} and any(k.startswith(key + ".") for k in other):  # an empty group that the other side fills
            continue
        if key in params and key in baseline:
            if params[key] != baseline[key]:
                out.append(f"{key}={_value(params[key])}")
            continue
        added = key in params
        whole = _subtree(key, *(params, baseline) if added else (baseline, params))
        if whole is None:
            out.append(f"{key}={_value(params[key])}" if added else f"{key} (removed)")
        elif f"{whole} ({'added' if added else 'removed'})" not in out:
            out.append(f"{whole} ({'added' if added else 'removed'})")
    return out


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value or "''"
    return json.dumps(value)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(1, width - 1)] + "…"


def render(experiments: list[Experiment], cfg: CompareConfig) -> str:
    """The tables as text, no line longer than ``cfg.width``."""
    models = sorted({m for e in experiments for m, _ in e.recall})
    benchmarks = sorted({b for e in experiments for _, b in e.recall}, key=lambda b: (b != "test", b))
    if not experiments:
        return "no experiments (dvc exp show lists none)\n"
    ns = [int(n) for n in cfg.recall_ns]
    value_w = 6
    name_w = min(max(len("Experiment"), *(len(e.name) for e in experiments)), 24, cfg.width // 6)
    model_w = min(max([len("Model")] + [len(m) for m in models]), 16, cfg.width // 6)
    block_w = {b: min(max(len(b), value_w * len(ns)) + 2, cfg.width // 4) for b in benchmarks}
    fixed = name_w + 2 + model_w + 2
    params_max = 40
    params_min = max(10, min(24, cfg.width - fixed - 2 - max(block_w.values(), default=0)))
    chunks: list[list[str]] = [[]]
    for b in benchmarks:
        used = fixed + params_min + 2 + sum(block_w[x] for x in chunks[-1])
        if chunks[-1] and used + block_w[b] > cfg.width:
            chunks.append([])
        chunks[-1].append(b)
    tables = []
    for chunk in chunks:
        free = cfg.width - fixed - 2 - sum(block_w[b] for b in chunk)
        params_w = max(params_min, min(params_max, free))
        head1 = (f"{'Experiment':<{name_w}}  {'Changed params':<{params_w}}  {'Model':<{model_w}}"
                 + "".join(f"{_fit(b, block_w[b] - 2):>{block_w[b]}}" for b in chunk))
        head2 = (" " * (name_w + 2 + params_w + 2 + model_w)
                 + "".join(" " * (block_w[b] - value_w * len(ns)) + "".join(f"{'R@' + str(n):>{value_w}}" for n in ns)
                           for b in chunk))
        lines = [head1.rstrip(), head2.rstrip(), "-" * min(cfg.width, len(head1))]
        for exp in experiments:
            params = exp.changed if exp.baseline is not None else ["(baseline)"]
            if exp.baseline is not None and not params:
                params = ["(none)"]
            params = [piece for text in params for piece in _pieces(text, params_w)]  # wrapped, not cut
            rows = max(len(models), len(params), 1)
            for i in range(rows):
                name = _fit(exp.name, name_w) if i == 0 else ""
                param = _fit(params[i], params_w) if i < len(params) else ""
                model = models[i] if i < len(models) else ""
                cells = ""
                for b in chunk:
                    recall = exp.recall.get((model, b)) if model else None
                    values = "".join(f"{_cell(recall.get(f'recall@{n}')) if recall else '':>{value_w}}" for n in ns)
                    cells += " " * (block_w[b] - value_w * len(ns)) + values
                line = f"{name:<{name_w}}  {param:<{params_w}}  {_fit(model, model_w):<{model_w}}{cells}"
                lines.append(line.rstrip())
            lines.append("")
        tables.append("\n".join(lines))
    legend = ("recall@N in percent; test = the pipeline's test split, the others: params.yaml benchmarks; changed "
              "params against the experiment's baseline commit (workspace: against HEAD)")
    return "\n".join(tables) + "\n".join(_wrap(legend, cfg.width)) + "\n"


def _pieces(text: str, width: int) -> list[str]:
    """``text`` cut into lines of at most ``width`` characters, the continuation lines indented by two."""
    if len(text) <= width:
        return [text]
    out = [text[:width]]
    rest = text[width:]
    while rest:
        out.append("  " + rest[:width - 2])
        rest = rest[width - 2:]
    return out


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def compare(repo: str | os.PathLike, *, cfg: CompareConfig | None = None) -> str:
    """``dvc exp show --json`` of the DVC project in ``repo``, as :func:`render` lays it out."""
    cfg = cfg or CompareConfig()
    cfg.validate()
    repo = Path(repo)
    if not (repo / "dvc.yaml").is_file():
        raise NetVLADError(f"{repo}: no dvc.yaml (not the pipeline's folder)")
    args = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--no-pager"] + (["-A"] if cfg.all_commits else [])
    proc = subprocess.run(args, cwd=repo, env={**os.environ, "DVC_NO_ANALYTICS": "1"}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise NetVLADError(f"{repo}: dvc exp show failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    try:
        rows = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise NetVLADError(f"{repo}: dvc exp show --json printed no JSON: {proc.stdout.strip()[:200]!r}") from None
    return render(experiments_from_json(rows, cfg), cfg)
