"""The documentation: the site builds in strict mode (links, pages, anchors), its reference pages are generated from
the code, the README is a short front page, and every shell command a page shows exists as written — each how-to
command runs on the built-in city (tiny) or says in its block's title what it needs that a test machine lacks."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml

from stages.cli import app
from tests.conftest import REPO
from tests.test_pipeline import make_tiny_pipeline

BIN = Path(sys.executable).parent
#: What a how-to block may say it needs instead of running in the tests (its title starts with one of these).
NEEDS = ("Needs a dataset", "Needs a GPU", "Needs a DVC remote")
#: The how-to pages, in the order their commands run on one tiny city (later pages use earlier pages' results).
HOW_TO_ORDER = ("own-photos", "compare-and-review", "places-recipe", "dinov2", "evaluate-released-model",
                "train-pittsburgh", "benchmark-suite", "share-artifacts", "several-gpus", "troubleshooting")


def _reference_module():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, env=env)


# ------------------------------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _mkdocs(REPO / "mkdocs.yml", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_site_builds_strictly_with_every_page_of_the_nav(site):
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for n in node:
                yield from pages(n)
        else:
            for v in node.values():
                yield from pages(v)

    listed = set(pages(nav))
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert on_disk <= listed, f"pages missing from mkdocs.yml's nav: {sorted(on_disk - listed)}"
    for page in listed:
        assert (site / page.replace(".md", ".html")).is_file(), page


def test_the_reference_pages_hold_every_command_option_and_params_key(site):
    commands = (site / "reference" / "commands.html").read_text()
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="netvlad")
    for name in group.list_commands(ctx):
        assert f'id="{name}"' in commands, name
        for param in group.get_command(ctx, name).params:
            for opt in [] if param.hidden else [*param.opts, *param.secondary_opts]:
                if opt.startswith("--"):
                    assert f"<code>{opt}</code>" in commands, (name, opt)
    params = (site / "reference" / "params.html").read_text()

    def keys(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and prefix.count(".") < 2 and k not in ("models", "benchmarks"):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield prefix, k

    for prefix, key in keys(yaml.safe_load((REPO / "params.yaml").read_text())):
        if prefix:
            assert f"<code>{key}</code>" in params, f"{prefix}{key}"
    metrics = (site / "reference" / "metrics.html").read_text()
    for key in json.loads((REPO / "metrics" / "test_trained.json").read_text()):
        assert re.sub(r"\d+", "N", key).replace("localised_within_N", "localised_within_&lt;T&gt;") in metrics, key


def test_the_start_page_is_the_readme_with_working_links(site):
    index = (site / "index.html").read_text()
    assert "Which page do I need" in index and 'href="how-to/evaluate-released-model.html"' in index


def _broken_copy(tmp_path: Path, page: str, text: str) -> Path:
    """This checkout's site sources in ``tmp_path`` with ``text`` appended to ``page``."""
    for name in ("mkdocs.yml", "README.md", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "metrics", tmp_path / "metrics")
    with open(tmp_path / "docs" / page, "a") as f:
        f.write(f"\n{text}\n")
    return tmp_path / "mkdocs.yml"


@pytest.mark.parametrize("link, complaint", [
    ("[gone](how-to/no-such-page.md)", "not found among documentation files"),
    ("[stale](concepts/training.md#no-such-section)", "does not contain an anchor '#no-such-section'"),
    ("[option](reference/commands.md#no-such-command)", "does not contain an anchor '#no-such-command'"),
])
def test_a_link_to_a_missing_page_or_anchor_fails_the_build(tmp_path, link, complaint):
    proc = _mkdocs(_broken_copy(tmp_path, "figures.md", f"See {link}."), tmp_path / "site")
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr[-2000:]


def test_a_committed_metrics_key_without_a_description_fails_the_build(tmp_path):
    config = _broken_copy(tmp_path, "figures.md", "")
    path = tmp_path / "metrics" / "test_trained.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "recall_at_one": 0.5}))
    proc = _mkdocs(config, tmp_path / "site")
    assert proc.returncode != 0 and "recall_at_one" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ the README
def test_the_readme_is_a_short_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    headings = re.findall(r"^(#+) (.*)$", outside_code, re.M)
    assert headings[0] == ("#", "NetVLAD pipeline") and all(level == "##" for level, _ in headings[1:]), headings
    assert not re.findall(r"^#+ ", "".join(re.findall(r"```.*?```", text, flags=re.S)), re.M), "a heading in a block"
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        generated = target.removeprefix("docs/") in _reference_module().PAGES
        assert generated or (REPO / target).is_file(), target


# ------------------------------------------------------------------------------------------- shell commands
@dataclass
class Block:
    page: str
    title: str
    text: str

    @property
    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comments and blank lines dropped, `&&` split."""
        out = []
        for line in self.text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            if words:
                out += [c.strip() for c in shlex.join(words).split(" '&&' ")]
        return out


def shell_blocks(pages=None) -> list[Block]:
    """Every ```bash / ```sh block of the README and the pages under docs/, with its title."""
    files = pages or [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    blocks = []
    for path in files:
        for match in re.finditer(r"^```(?:bash|sh)([^\n]*)\n(.*?)^```", path.read_text(), re.S | re.M):
            title = re.search(r'title="([^"]*)"', match.group(1))
            page = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
            blocks.append(Block(page, title.group(1) if title else "", match.group(2)))
    return blocks


def _params_keys() -> set[str]:
    def walk(node, prefix=""):
        for k, v in node.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")

    return set(walk(yaml.safe_load((REPO / "params.yaml").read_text())))


def _check_command(argv: list[str], where: str) -> None:
    """A `netvlad` command parses with the real command line; `dvc exp run -S key=…` names a params.yaml key (or
    adds one with `+`); `make <target>` is a Makefile target."""
    group = typer.main.get_command(app)
    if argv[:1] == ["torchrun"] and "stages.cli" in argv:
        argv = ["netvlad", *argv[argv.index("stages.cli") + 1:]]
    if argv[:2] == ["netvlad", "launch"]:
        argv = ["netvlad", *argv[4:]] if argv[2] == "--nproc-per-node" else argv
    if argv[:1] == ["netvlad"]:
        name, args = argv[1], argv[2:]
        assert name in group.commands, f"{where}: no command `netvlad {name}`"
        ctx = group.context_class(group, info_name="netvlad")
        command = group.get_command(ctx, name)
        try:
            command.make_context(name, list(args), parent=ctx)  # a renamed, unknown or missing option raises
        except Exception as e:
            raise AssertionError(f"{where}: {e}") from e
    elif argv[:3] == ["dvc", "exp", "run"]:
        keys = _params_keys()
        for i, word in enumerate(argv):
            if word == "-S":
                key = argv[i + 1].split("=", 1)[0]
                assert key.startswith("+") or key in keys, f"{where}: `-S {key}` is no params.yaml key"
    elif argv[:1] == ["make"]:
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        for word in argv[1:]:
            if "=" not in word:
                assert word in targets, f"{where}: no make target {word}"


def test_every_shell_command_of_the_pages_exists_as_written():
    blocks = shell_blocks()
    checked = 0
    for block in blocks:
        for command in block.commands:
            argv = shlex.split(command)
            _check_command(argv, f"{block.page}: {command[:60]}")
            checked += argv[0] in ("netvlad", "torchrun", "dvc", "make")
    assert checked >= 40, checked


def test_a_renamed_option_in_a_page_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nnetvlad train --init-model m.pt --learning-rate 0.1\n```\n")
    with pytest.raises(AssertionError, match="learning-rate"):
        for block in shell_blocks([page]):
            for command in block.commands:
                _check_command(shlex.split(command), "page")


def test_every_how_to_block_runs_in_a_test_or_says_what_it_needs():
    pages = {p.stem for p in (REPO / "docs" / "how-to").glob("*.md")}
    assert pages == set(HOW_TO_ORDER)
    for block in shell_blocks(sorted((REPO / "docs" / "how-to").glob("*.md"))):
        assert not block.title or block.title.startswith(NEEDS), f"{block.page}: title {block.title!r}"


def runnable_how_to_blocks() -> list[Block]:
    files = [REPO / "docs" / "how-to" / f"{name}.md" for name in HOW_TO_ORDER]
    return [b for b in shell_blocks(files) if not b.title.startswith(NEEDS)]


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    """The tiny pipeline, reproduced and committed on branch main, as a user's checkout after `make demo`: with the
    Makefile and this environment as its .venv (installed: the stamp is newer than pyproject.toml). Its database
    views are 4 m apart instead of 8, so its train split has enough places of 4 images (27) for the places recipe's
    16 per batch."""
    repo = make_tiny_pipeline(tmp_path_factory.mktemp("city"), ("Makefile", "pyproject.toml", "README.md"),
                              params={"download": {"db-spacing-m": 4.0}})  # places: 16 of 4 images in a batch
    venv = repo / ".venv"  # this environment seen from the checkout: its folders, its pyvenv.cfg, a fresh stamp
    venv.mkdir()
    for name in ("bin", "lib", "include"):
        if (BIN.parent / name).exists():
            (venv / name).symlink_to(BIN.parent / name)
    if (BIN.parent / "pyvenv.cfg").is_file():
        shutil.copy(BIN.parent / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / ".installed").touch()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["branch", "-M", "main"], ["add", "-A"], ["commit", "-qm", "make demo"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    return repo


@pytest.mark.slow
def test_the_how_to_commands_run_on_the_built_in_city(city):
    """Each how-to page's shell blocks (those not marked as needing a dataset, a GPU or a remote), in page order,
    as written, in a tiny city's checkout; `make report … MAX_DROP=…` may end in the gate's failure (its report then
    says so), every other command must succeed."""
    env = {**os.environ, "PATH": f"{city / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(city),
           "DVC_NO_ANALYTICS": "1", "NO_MKDOCS_2_WARNING": "1"}
    ran = []
    for block in runnable_how_to_blocks():
        for command in block.commands:
            proc = subprocess.run(["bash", "-c", command], cwd=city, env=env, capture_output=True, text=True)
            gate = command.startswith("make report") and "MAX_DROP=" in command
            if gate and proc.returncode != 0:
                assert "**Fails**" in (city / "report.md").read_text(), proc.stderr[-2000:]
            else:
                assert proc.returncode == 0, f"{block.page}: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            ran.append(command)
    assert (city / "matches.csv").is_file() and (city / "matches.html").is_file() and (city / "netvlad.onnx").is_file()
    assert (city / "report.md").is_file()
    exps = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=city, env=env, capture_output=True,
                          text=True, check=True).stdout
    for name in ("lr-0.02", "places", "dinov2-try"):
        assert f'"{name}"' in exps, name
    # The keys of every metrics file the runs wrote (both recipes, a transformer) are described for the reference.
    from netvlad_core.evaluation import METRIC_KEYS
    from netvlad_core.training.live import METRIC_KEYS as TRAIN_KEYS

    reference = _reference_module()
    found = [r for e in json.loads(exps) for g in (e.get("experiments") or []) for r in g["revs"]]
    assert found
    for rev in found:
        for path, data in rev["data"]["metrics"].items():
            described = TRAIN_KEYS if path.endswith("train/metrics.json") else METRIC_KEYS
            if path.startswith("metrics/test_") or path.endswith("train/metrics.json"):
                keys = reference._flat(data["data"])
                assert not reference.undescribed_keys(keys, described), (rev.get("name"), path, keys)
    print("\n".join(ran))

