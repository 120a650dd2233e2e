"""The benchmark suite's pieces outside DVC: `bench-split` (one split per benchmark, the MSLS name warning), the
combined table (`bench-table`) and `compare`'s layout of `dvc exp show --json` (the real runs are in
tests/test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from netvlad_core.experiments import CompareConfig, experiments_from_json, render
from stages.cli import app
from tests.conftest import make_jpegs
from tests.test_report import two_commits  # noqa: F401,F811 (the fixture: two commits of a small DVC project)


def vg_folder(root: Path, note: str = "") -> Path:
    make_jpegs(root / "images" / "test" / "database", [f"@{500000 + 6 * i}.00@4000000.00@17@T@@@@@@@@@@{note}@.jpg"
                                                       for i in range(4)], size=(16, 12))
    make_jpegs(root / "images" / "test" / "queries", [f"@500001.00@4000001.00@17@T@@@@@@@@@@{note}@.jpg"],
               size=(16, 12))
    return root


def test_bench_split_writes_one_split_folder_and_names_msls_impostors(tmp_path):
    root = vg_folder(tmp_path / "src")
    res = CliRunner().invoke(app, ["bench-split", "--out", str(tmp_path / "bench" / "msls"), "--dataset", "vg",
                                   "--image-root", str(root), "--no-progress"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "bench" / "msls" / "split" / "split.json").read_text())
    assert (meta["dataset"], meta["split"], meta["num_db"], meta["num_queries"]) == ("vg", "test", 4, 1)
    assert sorted(p.name for p in (tmp_path / "bench" / "msls").iterdir()) == ["split"]
    assert "warning: benchmark msls: read as dataset vg, not with MSLS's official protocol" in res.output
    res = CliRunner().invoke(app, ["bench-split", "--out", str(tmp_path / "bench" / "two"), "--dataset", "vg",
                                   "--image-root", str(root), "--split", "val", "--split", "test"])
    assert res.exit_code == 2 and "one split per benchmark" in res.output
    res = CliRunner().invoke(app, ["bench-split", "--out", str(tmp_path / "bench" / "t"), "--dataset", "tokyo247",
                                   "--image-root", str(root), "--split", "val"])
    assert res.exit_code == 2 and "dataset tokyo247 has no split 'val'" in res.output
    assert not (tmp_path / "bench" / "two").exists() and not (tmp_path / "bench" / "t").exists()


def write_metrics(folder: Path, model: str, bench: str, r1: float, num_queries: int = 5) -> None:
    (folder / model).mkdir(parents=True, exist_ok=True)
    (folder / model / f"{bench}.json").write_text(json.dumps(
        {"recall@1": r1, "recall@5": min(1.0, r1 + 0.2), "recall@10": 1.0, "num_queries": num_queries,
         "num_db": 10}))
    (folder / model / bench).mkdir(exist_ok=True)
    (folder / model / bench / "settings.json").write_text("{}")  # beside the metrics: not a benchmark


def test_the_table_has_a_row_per_model_and_a_column_per_benchmark(tmp_path):
    metrics = tmp_path / "metrics" / "bench"
    write_metrics(metrics, "trained", "pitts", 0.8)
    write_metrics(metrics, "trained", "city", 0.6)
    write_metrics(metrics, "offtheshelf", "pitts", 0.4)
    res = CliRunner().invoke(app, ["bench-table", "--metrics-dir", str(metrics), "--markdown",
                                   str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[2] == "| model | city (5 q / 10 db) | pitts (5 q / 10 db) |"
    assert lines[4] == "| `offtheshelf` | — | 40.0 / 60.0 / 100.0 |"
    assert lines[5] == "| `trained` | 60.0 / 80.0 / 100.0 | 80.0 / 100.0 / 100.0 |"
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["models"]["offtheshelf"]["city"] is None
    assert data["models"]["trained"]["pitts"] == {"recall@1": 0.8, "recall@5": 1.0, "recall@10": 1.0}
    res = CliRunner().invoke(app, ["bench-table", "--metrics-dir", str(metrics), "--markdown",
                                   str(metrics / "t.md"), "--json", str(tmp_path / "u.json")])
    assert res.exit_code == 2 and "lies inside --metrics-dir" in res.output and not (tmp_path / "u.json").exists()


def test_an_empty_suite_is_a_table_that_says_so(tmp_path):
    (tmp_path / "bench").mkdir()
    res = CliRunner().invoke(app, ["bench-table", "--metrics-dir", str(tmp_path / "bench"), "--markdown",
                                   str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0 and "No benchmarks evaluated" in (tmp_path / "t.md").read_text()


def _rev(rev: str, name: str | None, params: dict, recall: dict[str, float]) -> dict:
    metrics = {path: {"data": {"recall@1": r, "recall@5": r + 0.1, "num_queries": 3}} for path, r in recall.items()}
    return {"rev": rev, "name": name, "data": {"rev": rev, "params": {"params.yaml": {"data": params}},
                                               "metrics": metrics}}


def test_compare_lays_out_dvc_exp_show_in_the_width_given():
    base_params = {"train": {"lr": 0.005, "epochs": 3}, "benchmarks": {}, "model": {"head": {"num-clusters": 64}}}
    exp_params = {"train": {"lr": 0.02, "epochs": 3}, "model": {"head": {"num-clusters": 64}},
                  "benchmarks": {f"set{i}": {"dataset": "vg", "image-root": f"/data/set{i}"} for i in range(6)}}
    recall = {"metrics/test_trained.json": 0.5, "metrics/test_offtheshelf.json": 0.25,
              **{f"metrics/bench/trained/set{i}.json": 0.1 * i for i in range(6)}}
    baseline = _rev("a" * 40, "main", base_params, {"metrics/test_trained.json": 0.4})
    baseline["experiments"] = [{"name": "lr-up", "revs": [_rev("b" * 40, "lr-up", exp_params, recall)]}]
    rows = [_rev("workspace", None, base_params, {"metrics/test_trained.json": 0.4}), baseline]
    cfg = CompareConfig()
    exps = experiments_from_json(rows, cfg)
    assert [(e.name, e.kind) for e in exps] == [("workspace", "workspace"), (f"main ({'a' * 7})", "baseline"),
                                               ("lr-up", "experiment")]
    assert exps[2].changed == [f"benchmarks.set{i} (added)" for i in range(6)] + ["train.lr=0.02"]
    assert exps[0].changed == []
    text = render(exps, cfg)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120
    tables = [i for i, line in enumerate(lines) if line.startswith("Experiment")]
    assert len(tables) == 2  # seven benchmark columns do not fit 120 columns at once
    assert lines[tables[0]].split()[4:] == ["test", "set0", "set1", "set2"]
    assert lines[tables[1]].split()[4:] == ["set3", "set4", "set5"]
    start = next(i for i in range(tables[0], tables[1]) if lines[i].startswith("lr-up"))
    assert lines[start].split()[:4] == ["lr-up", "benchmarks.set0", "(added)", "offtheshelf"]
    trained = lines[start + 1].split()  # the second model of the block, beside the second changed param
    assert trained[:3] == ["benchmarks.set1", "(added)", "trained"]
    assert trained[3:] == ["50.0", "60.0", "0.0", "10.0", "10.0", "20.0", "20.0", "30.0"]
    assert "workspace" in text and "(baseline)" in text and "(none)" in text


@pytest.mark.parametrize("width", [60, 80])
def test_compare_never_exceeds_a_narrow_width(width):
    base = _rev("a" * 40, "main", {"a": {"b": "y"}}, {})
    base["experiments"] = [{"revs": [_rev("c" * 40, "long", {"a": {"b": "x" * 80}},
                                          {"metrics/test_a_very_long_model_name.json": 0.5})]}]
    text = render(experiments_from_json([base], CompareConfig(width=width)), CompareConfig(width=width))
    assert max(map(len, text.splitlines())) <= width
    assert "".join(line.split()[1 if line.startswith("long") else 0] for line in text.splitlines()
                   if "x" * 10 in line) == "a.b=" + "x" * 80  # wrapped over several lines, nothing cut


def test_make_report_includes_the_suite_table(two_commits, tmp_path):  # noqa: F811
    from netvlad_core.bench_table import write_table
    from tests.test_report import _write

    write_metrics(tmp_path / "bench", "trained", "pitts", 0.8)
    write_table(tmp_path / "bench", two_commits / "metrics" / "bench_table.md", tmp_path / "t.json")
    _write(two_commits, base="HEAD~1")
    text = (two_commits / "r.md").read_text()
    assert text.index("## recall@N") < text.index("## Benchmark suite: recall@1 / @5 / @10 (%)")
    assert "| `trained` | 80.0 / 100.0 / 100.0 |" in text
    write_table(tmp_path / "empty", two_commits / "metrics" / "bench_table.md", tmp_path / "t.json")
    _write(two_commits, base="HEAD~1")  # a suite without benchmarks adds nothing
    assert "Benchmark suite" not in (two_commits / "r.md").read_text()


def test_each_benchmark_entry_is_the_options_of_bench_split():
    """params.yaml `benchmarks` entries expand into `netvlad bench-split` options (dvc.yaml passes `${item}`): every
    key of the examples in the comment above the group, and of the benchmark-suite page's, is an option of it."""
    import io

    import typer
    import yaml

    from tests.conftest import REPO

    options = {o for p in typer.main.get_command(app).commands["bench-split"].params for o in p.opts}
    text = (REPO / "params.yaml").read_text()
    block = text[text.index("# The benchmark suite"):text.index("\nbenchmarks:")]
    example = "\n".join(line[len("#"):] for line in block.splitlines() if line.startswith("#   "))
    readme = (REPO / "docs" / "how-to" / "benchmark-suite.md").read_text()
    readme_block = readme[readme.index("## List the benchmarks"):]
    readme_block = readme_block[readme_block.index("```yaml\n") + 8:]
    entries = {**yaml.safe_load(io.StringIO(example)),
               **yaml.safe_load(io.StringIO(readme_block[:readme_block.index("```")]))["benchmarks"]}
    assert {"pitts30k", "msls", "nordland"} <= set(entries)
    for name, entry in entries.items():
        for key in entry:
            assert f"--{key}" in options, f"benchmark {name}: {key} is no option of `netvlad bench-split`"
    assert "netvlad bench-split --out data/bench/${key} ${item}" in (REPO / "dvc.yaml").read_text()
