"""One source of truth: every stage option is a config-dataclass field (its default and help written once there),
every params.yaml key is an option of the stages that read it, and params.yaml holds the library defaults except
where a comment marks a demo override."""

from __future__ import annotations

import dataclasses
import re
import typing

import click
import pytest
import typer
import yaml
from ruamel.yaml import YAML

from netvlad_core.config import option_name, parse_unset
from stages._options import config_fields
from stages.cli import STAGES, app
from tests.conftest import REPO

COMMAND = typer.main.get_command(app)


def stage_command(name: str) -> click.Command:
    return COMMAND.commands[name]


def groups_of(name: str) -> dict:
    module = __import__(f"stages.{dict(STAGES)[name]}", fromlist=["main"])
    return getattr(module.main, "__config_groups__", {})


def field_default(field: dataclasses.Field):
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return list(value) if isinstance(value, tuple) else value


def dvc_stage_commands() -> dict[str, str]:
    """{stage command name: its cmd in dvc.yaml} (foreach stages once)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for spec in stages.values():
        cmd = " ".join((spec.get("do") or spec)["cmd"].split())
        words = cmd.split()
        words = words[words.index("netvlad") + 1:]
        if words[0] == "launch":
            words = words[3:]
        out[words[0]] = cmd
    return out


@pytest.mark.parametrize("name", [name for name, _ in STAGES])
def test_every_config_field_is_one_option_with_the_fields_default(name):
    params = {p.name: p for p in stage_command(name).params}
    declared = [o for p in stage_command(name).params for o in p.opts]
    assert len(declared) == len(set(declared)), f"{name}: an option is declared twice"
    groups = groups_of(name)
    assert groups, f"{name}: its options are not derived from config dataclasses (stages._options.stage)"
    for arg, group in groups.items():
        for field in config_fields(group):
            param = params[f"{arg}__{field.name}"]
            assert param.opts[0] == f"--{option_name(field)}"
            default = param.default
            if typing.get_origin(typing.get_type_hints(group.cls)[field.name]) in (typing.Union, getattr(
                    __import__("types"), "UnionType")):
                default = parse_unset(default)
            assert default == field_default(field), (name, field.name)
            assert field.metadata["help"] in (param.help or "")
            if group.params:
                assert f"(params.yaml: {group.params}.{option_name(field)})" in param.help


def test_no_stage_declares_a_typer_option_default_of_its_own():
    """Apart from paths and switches of a command's own (inputs, outputs, --json), every option with a default
    comes from a config dataclass: no `typer.Option(<value>, …)` in stages/ except for those."""
    for path in (REPO / "stages").glob("*.py"):
        if path.name == "_options.py":  # the derivation itself
            continue
        text = path.read_text()
        for match in re.finditer(r"typer\.Option\(\s*([^.,\s][^,]*),", text):
            value = match.group(1).strip()
            assert value in ("None", "False", "1"), f"{path.name}: typer.Option({value}, …) writes a default"


def _params_with_comments():
    with open(REPO / "params.yaml") as f:
        return YAML().load(f)


def _comment(node, key) -> str:
    tokens = node.ca.items.get(key) or []
    return " ".join(t.value for t in tokens if t is not None and hasattr(t, "value"))


def _same(value, default) -> bool:
    """Whether a params.yaml value is the option's default (DVC passes values as text; unset words are None)."""
    value = parse_unset(value) if isinstance(value, str) else value
    default = parse_unset(default) if isinstance(default, str) else default
    if isinstance(value, (list, tuple)) or isinstance(default, (list, tuple)):
        return list(value or []) == list(default or [])
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    return value == default


def _expanded_groups(cmd: str) -> list[str]:
    return [g for g in re.findall(r"\$\{([\w.-]+)\}", cmd) if not g.startswith("dist.") and not g == "item"
            and not g.startswith("item.") and not g == "key"]  # item.<name>: a matrix stage's own values


def test_every_params_key_is_an_option_of_the_stage_that_reads_it_and_equals_its_default():
    params = _params_with_comments()
    seen_groups = set()
    for name, cmd in dvc_stage_commands().items():
        options = {o: p for p in stage_command(name).params for o in p.opts}
        for dotted in _expanded_groups(cmd):
            node = params
            for part in dotted.split("."):
                node = node[part]
            seen_groups.add(dotted)
            items = node.items() if isinstance(node, dict) else [(dotted.split(".")[-1], node)]
            parent = params
            for part in dotted.split(".")[:-1]:
                parent = parent[part]
            for key, value in items:
                assert f"--{key}" in options, f"params.yaml {dotted}.{key} is no option of `netvlad {name}`"
                param = options[f"--{key}"]
                comment = _comment(node if isinstance(node, dict) else parent, key)
                if not _same(value, param.default):
                    assert "demo" in comment, (f"params.yaml {dotted}.{key}: {value!r} differs from the library "
                                               f"default {param.default!r} without a 'demo' comment")
    foreach = {m.group(1) for m in re.finditer(r"foreach: \$\{([\w.-]+)\}", (REPO / "dvc.yaml").read_text())}
    top = {k for k in params if k != "dist"}
    assert top <= {g.split(".")[0] for g in seen_groups} | foreach, "a params.yaml group that no stage reads"


def test_each_released_model_entry_is_the_options_of_import():
    """params.yaml `models` entries expand into `netvlad import` options (dvc.yaml passes `${item}`): every key of an
    entry, and of the example in the comment above the group, is an option of the command."""
    import io

    options = {o for p in stage_command("import").params for o in p.opts}
    text = (REPO / "params.yaml").read_text()
    block = text[text.index("# Released models"):text.index("\nmodels:")]
    example = "\n".join(line[len("#"):] for line in block.splitlines() if line.startswith("#   "))
    entries = dict(yaml.safe_load(io.StringIO(example)))
    entries.update(_params_with_comments()["models"] or {})
    assert entries, "no example entry"
    for name, entry in entries.items():
        assert "src" in entry, name
        for key in entry:
            assert f"--{key}" in options, f"params.yaml models.{name}.{key} is no option of `netvlad import`"
    assert "netvlad import --out artifacts/imported/${key}.pt ${item}" in (REPO / "dvc.yaml").read_text()


@pytest.mark.parametrize("name", ["features", "train", "evaluate"])
def test_a_key_left_out_gets_the_library_default(name):
    """Parsing a command line with only the required paths gives each config the dataclass's own defaults."""
    command = stage_command(name)
    required = [a for p in command.params if p.required for a in (p.opts[0], "x")]
    ctx = command.make_context(name, list(required))
    for arg, group in groups_of(name).items():
        built = {f.name: ctx.params[f"{arg}__{f.name}"] for f in config_fields(group)}
        defaults = {f.name: field_default(f) for f in config_fields(group)}
        assert {k: parse_unset(v) if isinstance(v, str) and defaults[k] is None else v for k, v in built.items()} \
            == defaults


def test_train_help_shows_each_option_once_with_default_and_params_key():
    from typer.testing import CliRunner

    text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).output
    for option in ("--lr", "--epochs", "--margin", "--num-negatives-sampled", "--trainable-blocks", "--workers"):
        assert len(re.findall(rf"{option}\b(?![-\w])", text)) == 1, (option, text)
    assert "(params.yaml: train.lr)" in text and "(params.yaml: mining.num-negatives-sampled)" in text
    assert "[default: 0.0001]" in text and "[default: 1000]" in text
