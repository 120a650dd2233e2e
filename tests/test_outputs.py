"""Outputs never replace inputs, and an output path that cannot be written is one line.

One mechanism (:class:`netvlad_core.io.FileLedger`) for every command: the files a command reads are recorded (an
audit hook on Python's ``open``; ``note_read`` for h5py and subprocesses), its declared outputs are refused when they
are one of them, and the shared atomic writer refuses to replace a file the command read.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from netvlad_core.errors import NetVLADError
from netvlad_core.io import (
    atomic_path,
    distinct_paths,
    note_read,
    open_h5_for_reading,
    tracked_files,
    write_json,
)
from stages.cli import app
from tests.test_evaluation import evaluate_cli, place_features, utm_split
from tests.test_import import legacy_save, netvlad_tensors, vgg16_encoder


def test_atomic_writer_refuses_a_folder_a_file_where_a_folder_goes_and_a_parent_that_is_a_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(NetVLADError, match=r"folder: is a folder; give the path of the output file"):
        write_json(tmp_path / "folder", {"a": 1})
    (tmp_path / "file").write_text("x")
    with pytest.raises(NetVLADError, match=r"out\.json: cannot be created, .*file is a file, not a folder"):
        write_json(tmp_path / "file" / "sub" / "out.json", {"a": 1})
    with pytest.raises(NetVLADError, match=r"file: is a file; give the path of the output folder"):
        with atomic_path(tmp_path / "file", is_dir=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and (tmp_path / "file").read_text() == "x"
    assert not any((tmp_path / "folder").iterdir())


def test_a_command_cannot_replace_a_file_it_read_through_any_name(tmp_path):
    source = tmp_path / "in.json"
    write_json(source, {"v": 1})
    (tmp_path / "link.json").symlink_to(source)
    os.link(source, tmp_path / "hard.json")
    for name in ("in.json", "link.json", "hard.json"):
        with tracked_files():
            json.loads(source.read_text())  # read through Python's open: recorded by the audit hook
            with pytest.raises(NetVLADError, match=r"is a file this command reads"):
                write_json(tmp_path / name, {"v": 2})
    assert json.loads(source.read_text()) == {"v": 1}
    with tracked_files():  # a checkpoint resumed from and rewritten by design
        json.loads(source.read_text())
        write_json(source, {"v": 3}, replaces_input=True)
    assert json.loads(source.read_text()) == {"v": 3}
    write_json(source, {"v": 4})  # outside a command nothing is tracked
    with tracked_files():
        pass
    write_json(source, {"v": 5})


def test_reads_outside_python_open_and_outputs_declared_before_they_are_read(tmp_path):
    import h5py

    with h5py.File(tmp_path / "features.h5", "w") as h5:
        h5.create_dataset("db", data=np.zeros((2, 2)))
    with tracked_files():
        open_h5_for_reading(tmp_path / "features.h5").close()
        with pytest.raises(NetVLADError, match=r"features\.h5: the output --out is a file this command reads "
                                               r"\(an HDF5 input\)"):
            distinct_paths({}, {"--out": tmp_path / "features.h5"})
    with tracked_files():
        note_read(tmp_path / "params.yaml", "read by dvc")  # need not exist: a path another revision has
        with pytest.raises(NetVLADError, match=r"params\.yaml: an output is a file this command reads \(read by dvc"):
            write_json(tmp_path / "params.yaml", {})
    side = tmp_path / "flags.json"
    side.write_text("{}")
    with tracked_files():
        distinct_paths({}, {"--out": side})
        with pytest.raises(NetVLADError, match=r"flags\.json: read as an input and given as the output --out"):
            side.read_text()  # a side file found later: refused at the read, before any work on it
    assert side.read_text() == "{}"
    with tracked_files():  # a folder output holding a file the command read
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "a.txt").write_text("a")
        (tmp_path / "run" / "a.txt").read_text()
        with pytest.raises(NetVLADError, match=r"run: an output folder that holds .*a\.txt"):
            with atomic_path(tmp_path / "run", is_dir=True):
                pass
    assert (tmp_path / "run" / "a.txt").read_text() == "a"


def pytorch_netvlad_run(tmp_path):
    run_dir = tmp_path / "run"
    state = {f"encoder.{k}": v for k, v in vgg16_encoder().items()} | {f"pool.{k}": v
                                                                        for k, v in netvlad_tensors(4).items()}
    legacy_save({"state_dict": state}, run_dir / "checkpoints" / "model_best.pth.tar")
    (run_dir / "flags.json").write_text(json.dumps({"num_clusters": 4, "arch": "vgg16", "pooling": "netvlad"}))
    return run_dir


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_import_refuses_to_write_over_the_runs_flags_json(tmp_path):
    run_dir = pytorch_netvlad_run(tmp_path)
    flags = (run_dir / "flags.json").read_bytes()
    result = CliRunner().invoke(app, ["import", str(run_dir), "--out", str(run_dir / "flags.json"),
                                      "--input-height", "48", "--input-width", "64", "--no-progress"])
    assert "flags.json" in one_error_line(result)
    assert (run_dir / "flags.json").read_bytes() == flags
    result = CliRunner().invoke(app, ["import", str(run_dir), "--out", str(tmp_path / "model.pt"),
                                      "--input-height", "48", "--input-width", "64", "--no-progress"])
    assert result.exit_code == 0, result.output


def test_every_output_option_of_evaluate_refuses_a_folder_and_a_path_under_a_file(tmp_path):
    split_dir, split = utm_split(tmp_path)
    place_features(split, tmp_path / "feats.h5")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    for option in ("--metrics", "--plot", "--per-query", "--settings", "--retrievals"):
        for target, why in ((tmp_path / "a_folder", "is a folder"),
                            (tmp_path / "a_file" / "out.json", "a_file is a file, not a folder")):
            result, out = evaluate_cli(tmp_path, split_dir, option, str(target))
            line = one_error_line(result)
            assert line.startswith(f"error: {target}: ") and why in line, (option, line)
            assert not out.exists() or not any(out.iterdir())
    assert (tmp_path / "a_file").read_text() == "x" and not any((tmp_path / "a_folder").iterdir())
    result, _ = evaluate_cli(tmp_path, split_dir, "--metrics", str(split_dir / "split.json"))  # an input of evaluate
    assert "split.json" in one_error_line(result)


def test_export_refuses_an_output_folder_before_any_work(tmp_path):
    from netvlad_core.models import ModelConfig, build_model, save_model

    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)
    save_model(tmp_path / "model.pt", build_model(cfg), cfg)
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")])
    assert one_error_line(result).startswith(f"error: {tmp_path / 'out'}: is a folder")


def test_the_images_of_a_split_are_inputs_of_a_command_that_loads_it(tmp_path):
    """Loader processes open the images, out of the ledger's sight: loading the split declares them."""
    from netvlad_core.datasets.manifest import load_split
    from tests.conftest import make_split

    split_dir = make_split(tmp_path, num_db=3, num_q=2)
    with tracked_files():
        split = load_split(split_dir)
        image = split.db_files()[1]
        with pytest.raises(NetVLADError, match=rf"{image.name}: the output --out is a file this command reads \(an "
                                               rf"image of {split_dir}\)"):
            distinct_paths({}, {"--out": image})
        with pytest.raises(NetVLADError, match=r"an output folder that holds"):
            with atomic_path(split.image_root, is_dir=True):
                pass
        distinct_paths({}, {"--out": split.image_root / "not_an_image.h5"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny split, a model file and a descriptor sample: valid inputs for every command that writes a file."""
    from netvlad_core.models import ModelConfig, build_model, save_model
    from tests.conftest import make_split
    from tests.test_reliability import unit_rows, write_sample

    tmp = tmp_path_factory.mktemp("inputs")
    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)
    save_model(tmp / "model.pt", build_model(cfg), cfg)
    (tmp / "a_folder").mkdir()
    (tmp / "a_file").write_text("x")
    return {"split": make_split(tmp, num_db=6, num_q=3), "model": tmp / "model.pt",
            "sample": write_sample(tmp / "sample.h5", unit_rows(50, 256)), "tmp": tmp}


COMMANDS = {  # command → (its arguments but the output, the output option)
    "sample": (lambda i: ["sample", "--split-dir", i["split"], "--backbone", "resnet18_layer3", "--weights", "none",
                          "--input-height", "48", "--input-width", "64"], "--out"),
    "kmeans": (lambda i: ["kmeans", "--descriptors", i["sample"], "--num-clusters", "4", "--model-out",
                          i["tmp"] / "km_model.pt"], "--centroids-out"),
    "train": (lambda i: ["train", "--init-model", i["model"], "--train-split", i["split"], "--val-split", i["split"],
                         "--live-dir", i["tmp"] / "live", "--checkpoint-dir", i["tmp"] / "ckpt"], "--out"),
    "features": (lambda i: ["features", "--model", i["model"], "--split-dir", i["split"]], "--out"),
    "pca": (lambda i: ["pca", "--model", i["model"], "--split-dir", i["split"]], "--out"),
    "export": (lambda i: ["export", "--model", i["model"]], "--out"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_an_output_file_that_is_a_folder_or_under_a_file(inputs, command):
    args, option = COMMANDS[command]
    for target, why in ((inputs["tmp"] / "a_folder", "is a folder"),
                        (inputs["tmp"] / "a_file" / "out.h5", "a_file is a file, not a folder")):
        result = CliRunner().invoke(app, [*map(str, args(inputs)), option, str(target)])
        line = one_error_line(result)
        assert line.startswith(f"error: {target}: ") and why in line, (command, line)
    assert not any((inputs["tmp"] / "a_folder").iterdir()) and (inputs["tmp"] / "a_file").read_text() == "x"


@pytest.mark.parametrize("option", ["--live-dir", "--checkpoint-dir"])
def test_train_refuses_an_output_folder_that_is_a_file(inputs, option):
    args = {"--live-dir": str(inputs["tmp"] / "live"), "--checkpoint-dir": str(inputs["tmp"] / "ckpt"),
            option: str(inputs["tmp"] / "a_file")}
    result = CliRunner().invoke(app, ["train", "--init-model", str(inputs["model"]), "--train-split",
                                      str(inputs["split"]), "--val-split", str(inputs["split"]), "--out",
                                      str(inputs["tmp"] / "trained.pt"), *[x for kv in args.items() for x in kv]])
    assert one_error_line(result) == f"error: {inputs['tmp'] / 'a_file'}: is a file; give the path of the output folder"
    assert not (inputs["tmp"] / "trained.pt").exists()
