"""An input path that is not a regular file gets its own one-line message (never 'file not found' for a folder,
never a hang on a FIFO or /dev/zero, never a traceback for a symbolic-link loop or a folder that is a file)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.test_outputs import inputs, one_error_line  # noqa: F401  (the module fixture)


@pytest.fixture
def odd_paths(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain").write_text("x")
    return {"a FIFO": (tmp_path / "fifo", "is a FIFO (named pipe), not a regular"),
            "a device": ("/dev/zero", "is a character device, not a"),
            "a symlink loop": (tmp_path / "loop_a", "a symlink loop"),
            "a folder": (tmp_path / "folder", "is a folder, not a"),
            "a path under a file": (tmp_path / "plain" / "model.pt", "(" + str(tmp_path / "plain") + " is a file, "
                                    "not a folder)")}


@pytest.mark.parametrize("case", ["a FIFO", "a device", "a symlink loop", "a folder", "a path under a file"])
def test_model_features_and_split_inputs_say_what_the_path_is(inputs, odd_paths, case):  # noqa: F811
    path, says = odd_paths[case]
    out = inputs["tmp"] / "never.onnx"
    for args in (["export", "--model", str(path), "--out", str(out)],
                 ["evaluate", "--features", str(path), "--split-dir", str(inputs["split"]), "--model-name", "m",
                  "--metrics", str(out.with_suffix(".json")), "--plot", str(out.with_suffix(".csv")),
                  "--per-query", str(out.with_suffix(".q.csv"))]):
        line = one_error_line(CliRunner().invoke(app, args))
        assert line.startswith(f"error: {path}: ") and says in line, (args[0], line)
    split_args = ["features", "--model", str(inputs["model"]), "--split-dir", str(path), "--out", str(out)]
    line = one_error_line(CliRunner().invoke(app, split_args))
    assert line.startswith(f"error: {path}/split.json: ") or line.startswith(f"error: {path}: "), line
    assert not out.exists() and not out.with_suffix(".json").exists()
