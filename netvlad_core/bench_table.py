"""The benchmark suite's combined table: every model's recall@1/5/10 on every benchmark, as Markdown and JSON.

Read from the metrics files the suite's ``evaluate`` stages write, ``metrics/bench/<model>/<benchmark>.json``; the
Markdown table has a row per model and a column per benchmark (its query and database counts in the header), the
JSON the same numbers as fractions at full precision. ``make report`` includes the Markdown table.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from .config import option
from .errors import NetVLADError, NetVLADWarning
from .io import atomic_path, distinct_paths, read_json, write_json


@dataclass
class BenchTableConfig:
    """What the combined benchmark table shows."""

    recall_ns: tuple[int, ...] = option((1, 5, 10), "N of the recall@N shown per model and benchmark (repeat the "
                                        "option for several).", name="recall-n")

    def validate(self) -> None:
        if not self.recall_ns or any(int(n) < 1 for n in self.recall_ns):
            raise NetVLADError(f"--recall-n must be positive integers, got {list(self.recall_ns)}")


def read_suite(metrics_dir: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """``{model: {benchmark: metrics}}`` from ``metrics_dir/<model>/<benchmark>.json`` (other files are ignored;
    a missing folder is an empty suite)."""
    metrics_dir = Path(metrics_dir)
    suite: dict[str, dict[str, dict]] = {}
    if not metrics_dir.is_dir():
        return suite
    for model_dir in sorted(p for p in metrics_dir.iterdir() if p.is_dir()):
        for path in sorted(model_dir.glob("*.json")):
            metrics = read_json(path)
            if not isinstance(metrics, dict):
                raise NetVLADError(f"{path}: not a metrics file (a JSON object)")
            suite.setdefault(model_dir.name, {})[path.stem] = metrics
    return suite


def _percent(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f}"


def suite_table(suite: dict[str, dict[str, dict]], recall_ns: tuple[int, ...]) -> tuple[str, dict]:
    """The Markdown table (models as rows, benchmarks as columns, ``R@1 / R@5 / R@10`` in percent in each cell) and
    its JSON form (fractions, full precision, ``null`` where a model was not evaluated on a benchmark)."""
    benchmarks = sorted({b for per_model in suite.values() for b in per_model})
    models = sorted(suite)
    sizes: dict[str, dict] = {}
    for b in benchmarks:
        found = [suite[m][b] for m in models if b in suite[m]]
        counts = {(m.get("num_queries"), m.get("num_db")) for m in found}
        q, db = sorted(counts, key=str)[0]
        sizes[b] = {"num_queries": q, "num_db": db}
        if len(counts) > 1:
            warnings.warn(f"benchmark {b}: its metrics files disagree on the counts ({sorted(counts, key=str)}); "
                          f"a model was evaluated on another version of it", NetVLADWarning)
    keys = [f"recall@{n}" for n in recall_ns]
    data = {"recall_n": list(recall_ns), "benchmarks": sizes,
            "models": {m: {b: ({k: suite[m][b].get(k) for k in keys} if b in suite[m] else None) for b in benchmarks}
                       for m in models}}
    title = "recall@" + " / @".join(str(n) for n in recall_ns) + " (%)"
    lines = [f"## Benchmark suite: {title}", ""]
    if not benchmarks:
        lines.append("No benchmarks evaluated (params.yaml `benchmarks:` is empty).")
        return "\n".join(lines) + "\n", data
    header = ["model"] + [f"{b} ({_count(sizes[b]['num_queries'])} q / {_count(sizes[b]['num_db'])} db)"
                          for b in benchmarks]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    for m in models:
        cells = [" / ".join(_percent(suite[m][b].get(k)) for k in keys) if b in suite[m] else "—" for b in benchmarks]
        lines.append("| " + " | ".join([f"`{m}`"] + cells) + " |")
    return "\n".join(lines) + "\n", data


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"


def write_table(metrics_dir: str | os.PathLike, markdown: str | os.PathLike, json_out: str | os.PathLike, *,
                cfg: BenchTableConfig | None = None) -> dict:
    """The ``bench-table`` stage: :func:`suite_table` of ``metrics_dir`` written to ``markdown`` and ``json_out``
    (both or neither). Returns the JSON form."""
    cfg = cfg or BenchTableConfig()
    cfg.validate()
    distinct_paths({}, {"--markdown": markdown, "--json": json_out})
    for out in (markdown, json_out):
        if Path(out).resolve().is_relative_to(Path(metrics_dir).resolve()):
            raise NetVLADError(f"{out}: lies inside --metrics-dir {metrics_dir}, which the table is built from")
    text, data = suite_table(read_suite(metrics_dir), tuple(int(n) for n in cfg.recall_ns))
    with atomic_path(markdown) as tmp_md:
        tmp_md.write_text(text)
        write_json(json_out, data)
    return data
