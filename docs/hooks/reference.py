"""MkDocs hook: the reference pages, generated from the code at every build (never copied into docs/).

- ``reference/commands.md``: every command of the ``netvlad`` app with its usage and options (the click command Typer
  builds, so a renamed option changes the page);
- ``reference/params.md``: every params.yaml key with its default and help (the config dataclass field behind the
  option of the same name) and the commands that read it; a params.yaml key that is no option fails the build;
- ``index.md``: the README, its links into ``docs/`` made relative to the site;
- ``reference/metrics.md``: the keys of the metrics files (``METRIC_KEYS``/``SETTINGS_KEYS`` beside the code that
  writes them) with the committed demo's values; a key in a committed metrics file without a description fails it.

tests/test_docs.py builds the site in strict mode and imports this file for the metrics check of a real run.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # this checkout's code, also when another copy is installed
    sys.path.insert(0, str(REPO))


def _cell(text) -> str:
    """Text for a Markdown table cell: HTML-escaped (help texts say `<model>`), pipes and newlines neutralised."""
    text = html.escape(str(text), quote=False)
    return " ".join(text.replace("|", "\\|").split())


def _default_text(value) -> str:
    if value is None or value == "":
        return "unset"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------------------------------- commands
def commands_page() -> str:
    import typer

    from stages.cli import app

    group = typer.main.get_command(app)  # Typer's own copy of click: classes are compared by what they say they are
    ctx = group.context_class(group, info_name="netvlad")
    out = ["# Commands", "",
           "Every stage is a command of the `netvlad` console script (`netvlad <command> --help` prints the same), "
           "and also runs as `python -m stages.<module>`. This page is generated from the commands themselves at "
           "every build of the site. Options that come from a params.yaml group name their key; see "
           "[params.yaml](params.md).", ""]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sub = command.context_class(command, info_name=name, parent=ctx)
        out += [f"## netvlad {name} {{#{name}}}", ""]
        summary = (command.help or "").strip()
        if summary:
            out += [html.escape(summary, quote=False), ""]
        out += ["```text", " ".join(["netvlad", name, *command.collect_usage_pieces(sub)]), "```", ""]
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        if arguments:
            out += ["Arguments: " + ", ".join(f"`{(a.metavar or a.name).upper()}`" + (" (one or more)" if a.nargs == -1
                                                                                 else "") for a in arguments), ""]
        if not options:
            continue
        out += ["| option | type | default | what it does |", "| --- | --- | --- | --- |"]
        for p in options:
            names = " / ".join(f"`{o}`" for o in (*p.opts, *p.secondary_opts))
            kind = "flag" if p.is_flag else str(p.bare_type())
            default = "required" if p.required else _default_text(p.default)
            if p.multiple:
                kind = kind.removeprefix("list[").removesuffix("]") + " (repeatable)"
            out.append(f"| {names} | {_cell(kind)} | {_cell(default)} | {_cell(p.help or '')} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ params
def _param_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """``{"group.key": (config field, [commands that take it])}`` for every option that names a params.yaml key."""
    from netvlad_core.config import option_name
    from stages._options import config_fields
    from stages.cli import STAGES

    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for command, module in STAGES:
        main = __import__(f"stages.{module}", fromlist=["main"]).main
        for group in getattr(main, "__config_groups__", {}).values():
            if not group.params:
                continue
            for field in config_fields(group):
                key = f"{group.params}.{option_name(field)}"
                fields.setdefault(key, (field, []))[1].append(command)
    return fields


def _field_default(field: dataclasses.Field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


_SPECIAL_GROUPS = {
    "dist": "How many processes `sample`, `train`, `features` and `pca` run as: `nproc-per-node` (1: in the "
            "stage's own process; more: under torchrun, see [several GPUs](../how-to/several-gpus.md)). dvc.yaml "
            "passes it to `netvlad launch --nproc-per-node`.",
    "models": "Released models to import and evaluate beside the pipeline's own: a name per entry, whose keys are "
              "the options of [`netvlad import`](commands.md#import) (`src`, `sha256`, `format`, `input-height`, "
              "`input-width`). Empty by default.",
    "benchmarks": "The benchmark suite: a name per entry, whose keys are the options of "
                  "[`netvlad bench-split`](commands.md#bench-split) (those of `netvlad download` for one split). "
                  "Empty by default; see [the benchmark suite](../how-to/benchmark-suite.md).",
}


def params_page(params_yaml: Path = REPO / "params.yaml") -> str:
    import yaml

    params = yaml.safe_load(params_yaml.read_text())
    fields = _param_fields()
    out = ["# params.yaml", "",
           "Every key of `params.yaml`, with the library default (the config dataclass field it comes from), the "
           "value the committed params.yaml sets where it differs (the demo's settings, marked `# demo` there), "
           "the commands whose option of the same name it sets, and the help text. Generated from the code and "
           "params.yaml at every build of the site; a key that is no command's option fails the build.", ""]

    def walk(node: dict, prefix: str) -> None:
        leaves = {k: v for k, v in node.items() if f"{prefix}{k}" in fields}
        nested = {k: v for k, v in node.items() if k not in leaves}
        if leaves:
            group = prefix.rstrip(".")
            out.extend([f"## {group} {{#{group.replace('.', '-')}}}", "",
                        "| key | default | params.yaml | read by | what it does |",
                        "| --- | --- | --- | --- | --- |"])
            for key, value in leaves.items():
                field, commands = fields[f"{prefix}{key}"]
                default = _field_default(field)
                here = "" if _default_text(value) == _default_text(default) else _default_text(value)
                used = ", ".join(f"[`{c}`](commands.md#{c})" for c in dict.fromkeys(commands))
                out.append(f"| `{key}` | {_cell(_default_text(default))} | {_cell(here)} | {used} | "
                           f"{_cell(field.metadata['help'])} |")
            out.append("")
        for key, value in nested.items():
            if not isinstance(value, dict):
                raise ValueError(f"{params_yaml}: {prefix}{key} is no option of any command")
            walk(value, f"{prefix}{key}.")

    for group, value in params.items():
        if group in _SPECIAL_GROUPS:
            out.extend([f"## {group} {{#{group}}}", "", _SPECIAL_GROUPS[group], ""])
            if group == "dist":
                out.extend(["| key | params.yaml |", "| --- | --- |"]
                           + [f"| `{k}` | {_cell(v)} |" for k, v in (value or {}).items()] + [""])
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{params_yaml}: {group} is no option group")
        walk(value, f"{group}.")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- metrics
def _pattern(described: str) -> re.Pattern:
    """A described key (``recall@N``, ``localised_within_<T>m``) as a regular expression over real keys."""
    text = re.escape(described).replace("N", r"\d+").replace("<T>", r"[\d.]+")
    return re.compile(rf"{text}\Z")


def undescribed_keys(keys, described: dict[str, str]) -> list[str]:
    """The ``keys`` that match no described key (tests/test_docs.py checks a real run's files with it)."""
    patterns = [_pattern(k) for k in described]
    return [k for k in keys if not any(p.match(k) for p in patterns)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "null" if v is None else str(v)


def metrics_file_keys(metrics_dir: Path = REPO / "metrics") -> dict[str, tuple[dict, dict]]:
    """``{title: (described keys, {key: committed value})}`` of each kind of metrics file, the committed values
    read from ``metrics_dir``; raises ValueError naming a committed key that no description covers."""
    from netvlad_core.evaluation import METRIC_KEYS, SETTINGS_KEYS
    from netvlad_core.training.live import METRIC_KEYS as TRAIN_KEYS

    kinds = {"metrics/test_<model>.json": (METRIC_KEYS, "test_trained.json"),
             "metrics/eval_<model>.json": (SETTINGS_KEYS, "eval_trained.json"),
             "metrics/train/metrics.json": (TRAIN_KEYS, "train/metrics.json")}
    out = {}
    for title, (described, example) in kinds.items():
        path = metrics_dir / example
        values = _flat(json.loads(path.read_text())) if path.is_file() else {}
        missing = undescribed_keys(values, described)
        if missing:
            raise ValueError(f"{path}: keys without a description in the code: {', '.join(missing)}")
        out[title] = (described, values)
    return out


def metrics_page(metrics_dir: Path = REPO / "metrics") -> str:
    from netvlad_core.evaluation import METRIC_KEYS

    out = ["# Metrics files", "",
           "What `evaluate`, `train` and the benchmark suite write under `metrics/` (declared in dvc.yaml with "
           "`cache: false`, committed with dvc.lock), each key with its meaning and the committed demo's value "
           "(the `trained` model; `N` stands for any recall N, `<T>` for the split's positive radius). Generated "
           "at every build from the descriptions beside the code that writes the files (`METRIC_KEYS` in "
           "`netvlad_core/evaluation.py` and `netvlad_core/training/live.py`) and from the committed files; a "
           "committed key without a description fails the build.", ""]
    for title, (described, values) in metrics_file_keys(metrics_dir).items():
        anchor = re.sub(r"[^a-z]+", "-", title.split("/")[-1].split("_")[0].split(".")[0].lower()).strip("-")
        out += [f"## `{title}` {{#{anchor}}}", "", "| key | meaning | demo value |", "| --- | --- | --- |"]
        for key, meaning in described.items():
            pattern = _pattern(key)
            shown = [f"{k} = {_value_text(v)}" for k, v in values.items() if pattern.match(k)]
            out.append(f"| `{key}` | {_cell(meaning)} | {_cell('; '.join(shown[:6]) or '—')} |")
        out.append("")
    csvs = [("recall_<model>.csv", "recall_trained.csv", "the recall@N curve `dvc plots` draws"),
            ("per_query_<model>.csv", "per_query_trained.csv",
             "one row per query: its ranking, whether each rank is correct, its position, estimate and error")]
    out += ["## The CSV files {#csv}", "", "| file | what | columns (the committed header) |", "| --- | --- | --- |"]
    for title, example, what in csvs:
        path = metrics_dir / example
        header = path.read_text().splitlines()[0] if path.is_file() else ""
        out.append(f"| `metrics/{title}` | {_cell(what)} | {_cell(', '.join(f'`{c}`' for c in header.split(',')))} |")
    out += ["",
            "## The benchmark suite {#bench}", "",
            f"`metrics/bench/<model>/<benchmark>.json` has the keys of `metrics/test_<model>.json` "
            f"({', '.join(f'`{k}`' for k in METRIC_KEYS)}), with the curve, per-query CSV and settings in "
            "`metrics/bench/<model>/<benchmark>/`; `metrics/bench_table.json` holds `recall_n`, `benchmarks` "
            "(name → its query and database counts) and `models` (model → benchmark → recall@N), which "
            "`metrics/bench_table.md` shows as a table.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------- home
def home_page(readme: Path = REPO / "README.md") -> str:
    """The README as the site's start page: its links into ``docs/`` made relative to the site's root."""
    return re.sub(r"\]\(docs/", "](", readme.read_text())


# ------------------------------------------------------------------------------------------------------- hook
PAGES = {"index.md": home_page, "reference/commands.md": commands_page, "reference/params.md": params_page,
         "reference/metrics.md": metrics_page}
#: Committed pipeline outputs the pages show, copied into the site under these names.
IMAGES = {"images/retrievals_trained.png": REPO / "metrics" / "retrievals_trained.png"}


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, make in PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    for uri, path in IMAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
