"""The real pipeline: `dvc repro` of this repository's dvc.yaml in a temporary git repository, at tiny sizes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Tiny sizes: every stage runs, in about a minute or two on 2 cores.
TINY = {
    "download": {"width": 160, "height": 120, "train-blocks": 1, "val-blocks": 1, "test-blocks": 1,
                 "train-queries": 24, "val-queries": 16, "test-queries": 24, "headings": 2, "db-spacing-m": 8.0,
                 "workers": 1},
    "model": {"trunk": {"input-height": 120, "input-width": 160}, "head": {"num-clusters": 8}},
    "sample": {"num-descriptors": 2000, "per-image": 50, "workers": 0},
    "kmeans": {"iterations": 10},
    "features": {"workers": 0},
    "train": {"epochs": 1, "max-queries-per-epoch": 8, "cache-refresh-rate": 8, "workers": 0, "lr": 0.01},
    "mining": {"num-negatives-sampled": 50},
    "pca": {"dim": 32, "max-images": 60, "workers": 0},
}


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**_env(), "PYTHONPATH": str(cwd)}  # the repository's own copy of the code (dvc.yaml lists it as deps)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _merge(target: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            _merge(target.setdefault(key, {}), value)
        else:
            target[key] = value


def _set_params(path: Path, overrides: dict) -> None:
    params = yaml.safe_load(path.read_text())
    _merge(params, overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_tiny_pipeline(repo: Path, files: tuple[str, ...] = (), *, targets: tuple[str, ...] = (),
                       params: dict | None = None, repro: bool = True) -> Path:
    """A git repository in ``repo`` holding this checkout's pipeline (dvc.yaml, params.yaml with the TINY sizes and
    ``params``, the code, and ``files``), committed, then (``repro``) reproduced with `dvc repro` (of ``targets``
    only, when given; outputs and dvc.lock not committed)."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "metrics/bench/README.md", *files):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    for package in ("netvlad_core", "stages"):  # the code the stages run, tracked as their deps
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, repo / ".dvc" / name)
    _set_params(repo / "params.yaml", TINY)
    _set_params(repo / "params.yaml", params or {})
    _run(["git", "init", "-q"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], repo)
    if repro:
        _run([str(Path(sys.executable).parent / "dvc"), "repro", *targets], repo)
    return repo


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


def test_repro_writes_metrics_that_match_an_independent_recall(pipeline_repo):
    metrics = json.loads((pipeline_repo / "metrics/test_offtheshelf.json").read_text())
    split_dir = pipeline_repo / "data/dataset/test"
    manifest = __import__("pandas").read_csv(split_dir / "manifest.csv")
    db_xy = manifest[manifest.role == "database"][["utm_east", "utm_north"]].to_numpy()
    q_xy = manifest[manifest.role == "query"][["utm_east", "utm_north"]].to_numpy()
    with h5py.File(pipeline_repo / "artifacts/features/test_offtheshelf.h5") as f:
        db, q = f["db"][()].astype(np.float64), f["query"][()].astype(np.float64)
    assert metrics["num_queries"] == len(q_xy) == len(q)
    # brute force: rank by squared L2, a hit is a database image within 25 m
    order = np.argsort(((q[:, None, :] - db[None]) ** 2).sum(-1), axis=1, kind="stable")
    geo = np.linalg.norm(q_xy[:, None, :] - db_xy[None], axis=-1)
    hit = np.take_along_axis(geo, order, axis=1) <= 25.0
    for n in (1, 5, 10, 20):
        assert metrics[f"recall@{n}"] == pytest.approx(hit[:, :n].any(1).mean(), abs=1e-9), n
    assert 0.0 <= metrics["localised_within_25m"] <= 1.0
    assert (pipeline_repo / "metrics/retrievals_offtheshelf.png").stat().st_size > 1000


def test_every_model_is_evaluated_with_the_same_keys(pipeline_repo):
    keys = None
    for model in ("offtheshelf", "trained", "trained_pca"):
        m = json.loads((pipeline_repo / f"metrics/test_{model}.json").read_text())
        recall = {k for k in m if k.startswith("recall@")}
        assert {"recall@1", "recall@5", "recall@10", "recall@20"} <= recall
        keys = keys or recall
        assert recall == keys
    with h5py.File(pipeline_repo / "artifacts/features/test_trained_pca.h5") as f:
        assert f["db"].shape[1] == 32
    train_metrics = json.loads((pipeline_repo / "metrics/train/metrics.json").read_text())
    assert "val" in json.dumps(train_metrics)


def test_metrics_and_plots_are_visible_to_dvc(pipeline_repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    shown = json.loads(_run([dvc, "metrics", "show", "--json"], pipeline_repo).stdout)
    flat = json.dumps(shown)
    assert "recall@1" in flat and "test_offtheshelf.json" in flat
    plots = _run([dvc, "plots", "show", "--json"], pipeline_repo).stdout
    assert "recall@N" in plots
    assert "train/loss" in plots or "loss" in plots


def test_changing_num_clusters_reruns_exactly_kmeans_and_what_follows(pipeline_repo):
    dvc = str(Path(sys.executable).parent / "dvc")
    _set_params(pipeline_repo / "params.yaml", {"model": {"head": {"num-clusters": 6}}})
    out = _run([dvc, "repro"], pipeline_repo).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert "download" not in ran and "sample" not in ran
    assert "kmeans" in ran and any(s.startswith("features") for s in ran) and any(s.startswith("evaluate") for s in ran)
    with h5py.File(pipeline_repo / "artifacts/centroids.h5") as f:
        assert f["centroids"].shape[0] == 6


def test_exp_run_with_two_processes_lists_its_recall(pipeline_repo):
    """`dvc exp run -S …` with `dist.nproc-per-node=2`: dvc.yaml starts the heavy stages under torchrun (2 CPU
    processes, gloo), and `dvc exp show` lists the experiment's parameters and recall metrics."""
    dvc = str(Path(sys.executable).parent / "dvc")
    out = _run([dvc, "exp", "run", "--name", "lr-two-procs", "-S", "train.lr=0.02", "-S", "dist.nproc-per-node=2"],
               pipeline_repo).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert "download" not in ran and {"train", "pca", "features@trained", "evaluate@trained"} <= ran
    assert "netvlad launch --nproc-per-node 2 train" in out
    assert "(2 processes)" in out  # `features` says it ran sharded
    table = list(csv.DictReader(io.StringIO(_run([dvc, "exp", "show", "--csv"], pipeline_repo).stdout)))
    row = next(r for r in table if r["Experiment"] == "lr-two-procs")
    # a column is named by its key, prefixed with its file where two files share the key (DVCLive logs train.lr too)
    assert float(row["params.yaml:train.lr"]) == 0.02 and int(row["dist.nproc-per-node"]) == 2
    for model in ("offtheshelf", "trained", "trained_pca"):  # the experiment's recall, as its evaluate wrote it
        written = json.loads((pipeline_repo / f"metrics/test_{model}.json").read_text())["recall@1"]
        assert float(row[f"metrics/test_{model}.json:recall@1"]) == pytest.approx(written, abs=1e-6)
    assert float(row["metrics/train/metrics.json:train.lr"]) == pytest.approx(0.02)  # DVCLive's logged lr


def _changed_stages(repo: Path) -> set[str]:
    dvc = str(Path(sys.executable).parent / "dvc")
    return set(json.loads(_run([dvc, "status", "--json"], repo).stdout))


def test_dvc_status_names_the_stages_whose_code_changed(pipeline_repo):
    """A change to a library module makes `dvc status` list exactly the stages that run it."""
    assert _changed_stages(pipeline_repo) == set()
    for module, expected in (("mining.py", {"train"}),
                             ("evaluation.py", {"evaluate@offtheshelf", "evaluate@trained", "evaluate@trained_pca"})):
        path = pipeline_repo / "netvlad_core" / module
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# touched\n")
            assert _changed_stages(pipeline_repo) == expected, module
        finally:
            path.write_bytes(original)
    assert _changed_stages(pipeline_repo) == set()


def test_a_released_model_listed_in_params_is_imported_and_evaluated_beside_the_others(pipeline_repo):
    """params.yaml `models: {released: {src: <a MatConvNet struct file>, …}}`: `dvc repro` runs import →
    features-imported → evaluate-imported for it alone, and `dvc metrics show` lists its recall."""
    from tests import released_files as rf

    dvc = str(Path(sys.executable).parent / "dvc")
    rng = np.random.default_rng(0)
    (pipeline_repo / "released").mkdir()
    rf.write_matconvnet(pipeline_repo / "released" / "tiny_struct.mat",
                        rf.vgg_like_trunk(rng, widths=(8, 16, 16)) + rf.vlad_head(rng, 16, 4, 16))
    _set_params(pipeline_repo / "params.yaml", {"models": {"released": {
        "src": "released/tiny_struct.mat", "input-height": 120, "input-width": 160}}})
    out = _run([dvc, "repro"], pipeline_repo).stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"import@released", "features-imported@released", "evaluate-imported@released"}, out
    metrics = json.loads((pipeline_repo / "metrics/test_released.json").read_text())
    with h5py.File(pipeline_repo / "artifacts/features/test_released.h5") as f:
        assert f["db"].shape[1] == 16 and f["query"].shape[0] == metrics["num_queries"]
    shown = json.dumps(json.loads(_run([dvc, "metrics", "show", "--json"], pipeline_repo).stdout))
    assert "test_released.json" in shown and "test_trained.json" in shown
    assert _changed_stages(pipeline_repo) == set()


def test_a_released_model_whose_url_file_changes_is_imported_anew(server, tmp_path):
    """params.yaml `models: {released: {src: <URL>}}`: when the file at the URL changes, DVC sees its new ETag and
    reruns `import`, and the model file holds the new file (its sha256 in the model config is the served file's),
    not the copy downloaded for the previous run."""
    import hashlib

    from netvlad_core.models import load_model
    from tests import released_files as rf

    dvc = str(Path(sys.executable).parent / "dvc")

    def served(seed: int) -> bytes:
        rng = np.random.default_rng(seed)
        layers = rf.vgg_like_trunk(rng, widths=(8, 16, 16)) + rf.vlad_head(rng, 16, 4, 16)
        return rf.write_matconvnet(tmp_path / f"v{seed}.mat", layers).read_bytes()

    def recorded_sha256() -> str:
        return load_model(repo / "artifacts/imported/released.pt")[1].source["sha256"]

    first, second = served(1), served(2)
    server.files["/Pitts30K_struct.mat"] = first
    repo = tmp_path / "repo"
    repo.mkdir()
    make_tiny_pipeline(repo, targets=("import@released",), params={"models": {"released": {
        "src": server.url + "/Pitts30K_struct.mat", "input-height": 120, "input-width": 160,
        "download-dir": str(tmp_path / "downloads")}}})
    assert recorded_sha256() == hashlib.sha256(first).hexdigest()
    assert "HEAD" in server.methods, "DVC checked the URL dependency"
    server.files["/Pitts30K_struct.mat"] = second
    server.modified["/Pitts30K_struct.mat"] = "Tue, 02 Jan 2024 00:00:00 GMT"
    out = _run([dvc, "repro", "import@released"], repo).stdout
    assert "Running stage 'import@released'" in out, out
    assert recorded_sha256() == hashlib.sha256(second).hexdigest()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"]["import@released"]["deps"] if d["path"].startswith("http"))
    assert dep["checksum"] == f'"{hashlib.sha256(second).hexdigest()[:16]}"'
    out = _run([dvc, "repro", "import@released"], repo).stdout
    assert "Running stage" not in out, out


# ------------------------------------------------------------------------------------------- the benchmark suite


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def _vg_folder(root: Path, seed: int) -> Path:
    """A small benchmark in the VG benchmark's folder format: real JPEGs named @east@north@…@.jpg, queries near the
    database images along a line."""
    from tests.conftest import make_jpegs

    rng = np.random.default_rng(seed)
    db = [(500000.0 + 6 * i, 4000000.0) for i in range(10)]
    q = [(e + rng.normal(0, 3), n + rng.normal(0, 3)) for e, n in [db[i] for i in rng.choice(10, 5, replace=False)]]
    for role, points in (("database", db), ("queries", q)):
        make_jpegs(root / "images" / "test" / role, [f"@{e:.2f}@{n:.2f}@17@T@@@@@@@@@@@.jpg" for e, n in points],
                   size=(160, 120), seed=seed + len(role))
    return root


MODELS = ("offtheshelf", "trained", "trained_pca", "released")


def test_a_benchmark_suite_evaluates_every_model_and_adding_one_reruns_only_its_stages(pipeline_repo, tmp_path):
    """params.yaml `benchmarks`: the built-in city's test split and a VG-format folder; `dvc repro` runs only the
    suite's stages, writes metrics/bench/<model>/<name>.json and the combined table; a third benchmark then runs
    only its own stages and the table."""
    dvc = str(Path(sys.executable).parent / "dvc")
    city = {"dataset": "synthetic", "split": "test", **TINY["download"]}
    _set_params(pipeline_repo / "params.yaml", {"benchmarks": {
        "city": city, "vgset": {"dataset": "vg", "image-root": str(_vg_folder(tmp_path / "vgset", 1))}}})
    ran = _ran(_run([dvc, "repro"], pipeline_repo).stdout)
    suite = {f"bench-{step}{'-imported' if m == 'released' else ''}@{m}-{b}"
             for step in ("features", "evaluate") for m in MODELS for b in ("city", "vgset")}
    assert ran == {"bench-split@city", "bench-split@vgset", "bench-table"} | suite, ran
    # the built-in city's benchmark is the pipeline's own test split again: the same recall, found independently
    for model in ("offtheshelf", "trained", "trained_pca"):
        own = json.loads((pipeline_repo / f"metrics/test_{model}.json").read_text())
        bench = json.loads((pipeline_repo / f"metrics/bench/{model}/city.json").read_text())
        assert {k: bench[k] for k in own if k.startswith("recall@")} == {k: own[k] for k in own if
                                                                          k.startswith("recall@")}
    table = json.loads((pipeline_repo / "metrics/bench_table.json").read_text())
    assert set(table["models"]) == set(MODELS) and set(table["benchmarks"]) == {"city", "vgset"}
    assert table["benchmarks"]["vgset"] == {"num_queries": 5, "num_db": 10}
    for model in MODELS:
        for name in ("city", "vgset"):
            written = json.loads((pipeline_repo / f"metrics/bench/{model}/{name}.json").read_text())
            assert table["models"][model][name] == {f"recall@{n}": written[f"recall@{n}"] for n in (1, 5, 10)}
    markdown = (pipeline_repo / "metrics/bench_table.md").read_text()
    cell = " / ".join(f"{100 * table['models']['trained']['vgset'][f'recall@{n}']:.1f}" for n in (1, 5, 10))
    assert "| `trained` |" in markdown and cell in markdown and "vgset (5 q / 10 db)" in markdown

    _set_params(pipeline_repo / "params.yaml", {"benchmarks": {
        "vgset2": {"dataset": "vg", "image-root": str(_vg_folder(tmp_path / "vgset2", 2))}}})
    new = {"bench-split@vgset2"} | {s.replace("vgset", "vgset2") for s in suite if s.endswith("-vgset")}
    assert _changed_stages(pipeline_repo) == new  # bench-table follows once their metrics exist
    ran = _ran(_run([dvc, "repro"], pipeline_repo).stdout)
    assert ran == new | {"bench-table"}, ran
    assert set(json.loads((pipeline_repo / "metrics/bench_table.json").read_text())["benchmarks"]) == {
        "city", "vgset", "vgset2"}
    assert _changed_stages(pipeline_repo) == set()
    shown = json.dumps(json.loads(_run([dvc, "metrics", "show", "--json"], pipeline_repo).stdout))
    assert "metrics/bench/trained/vgset2.json" in shown


def test_compare_shows_each_experiments_changed_params_and_recall_in_120_columns(pipeline_repo):
    """Two `dvc exp run`s (one earlier in this module, one here) and `netvlad compare`: a block per experiment with
    the params it changed, recall@1/5 of every model on the test split and on each benchmark, as `dvc exp show
    --json` has them, and no line over 120 columns. The experiment here changes an `evaluate` param, so that only
    the evaluation stages rerun (the module's benchmarks make a model change cost every model's features again)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "exp", "run", "--name", "loc-k3", "-S", "evaluate.localisation-k=3"], pipeline_repo)
    out = _run([str(Path(sys.executable).parent / "netvlad"), "compare"], pipeline_repo).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120, out
    header = lines[0].split()
    assert header[:4] == ["Experiment", "Changed", "params", "Model"] and header[4] == "test"
    assert {"city", "vgset", "vgset2"} <= set(header)
    blocks = {}
    for line in lines[3:]:
        if line[:1].strip():
            blocks[line.split()[0]] = []
        if line.strip() and blocks:
            blocks[list(blocks)[-1]].append(line)
    assert "loc-k3" in blocks and "lr-two-procs" in blocks, out
    assert "evaluate.localisation-k=3" in "\n".join(blocks["loc-k3"])
    assert "train.lr=0.02" in "\n".join(blocks["lr-two-procs"])
    exps = json.loads(_run([dvc, "exp", "show", "--json"], pipeline_repo).stdout)
    found = next(r for e in exps for g in (e.get("experiments") or []) for r in g["revs"]
                 if (r.get("name") or g.get("name")) == "loc-k3")
    metrics = found["data"]["metrics"]
    trained = next(line for line in blocks["loc-k3"] if " trained " in f" {line} ")
    values = trained.split()[-2 * 4:]  # test, city, vgset, vgset2: R@1 R@5 each
    expected = [metrics["metrics/test_trained.json"]["data"][f"recall@{n}"] for n in (1, 5)]
    assert values[:2] == [f"{100 * v:.1f}" for v in expected]
