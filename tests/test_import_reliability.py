"""`netvlad import` never gives a silent wrong model: a URL import takes the file the server has now (revalidated
against a real loopback HTTP server whose file changes), a bad download is not kept, credentials are not printed or
recorded, the mean image is said exactly, and every bad input is one line naming the file, with nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netvlad_core.errors import NetVLADError
from netvlad_core.importing import ImportConfig, import_model
from netvlad_core.io import load_state
from netvlad_core.models import load_model
from tests import released_files as rf
from tests.test_import import images, legacy_save, netvlad_tensors, ours, run_cli, vgg16_encoder


def mat_bytes(tmp: Path, seed: int) -> bytes:
    """A tiny MatConvNet NetVLAD struct file (the layout of hloc's Pitts30K_struct.mat), as bytes."""
    rng = np.random.default_rng(seed)
    path = rf.write_matconvnet(tmp / f"served_{seed}.mat", rf.vgg_like_trunk(rng) + rf.vlad_head(rng, 8, 3, 4))
    return path.read_bytes()


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "weights_only=False" not in lines[0] and "set to `False`" not in lines[0]
    return lines[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ URL sources


def test_a_url_import_takes_the_file_the_server_has_now(server, tmp_path):
    """Import, the file changes on the server, import again: the model holds the new file (and an unchanged file is
    revalidated with a conditional request, not downloaded again)."""
    first, second = mat_bytes(tmp_path, 1), mat_bytes(tmp_path, 2)
    server.files["/Pitts30K_struct.mat"] = first
    url = server.url + "/Pitts30K_struct.mat"
    dl = ["--download-dir", str(tmp_path / "dl")]
    assert run_cli(url, "--out", str(tmp_path / "a.pt"), *dl).exit_code == 0
    result = run_cli(url, "--out", str(tmp_path / "b.pt"), *dl)
    assert result.exit_code == 0, result.output
    assert "unchanged on the server" in result.output
    assert server.conditionals[-1][0] == f'"{sha(first)[:16]}"' and len(server.requests) == 2
    server.files["/Pitts30K_struct.mat"] = second
    server.modified["/Pitts30K_struct.mat"] = "Tue, 02 Jan 2024 00:00:00 GMT"
    result = run_cli(url, "--out", str(tmp_path / "c.pt"), *dl)
    assert result.exit_code == 0, result.output
    _, cfg = load_model(tmp_path / "c.pt")
    assert cfg.source == {"format": "matconvnet", "name": url, "sha256": sha(second)}
    (tmp_path / "local.mat").write_bytes(second)
    import_model(str(tmp_path / "local.mat"), tmp_path / "local.pt", cfg=ImportConfig(), progress=False,
                 log=lambda _: None)
    files = images(tmp_path, size=(640, 480), count=1)
    assert np.array_equal(ours(tmp_path / "c.pt", files)[0], ours(tmp_path / "local.pt", files)[0])
    assert not np.array_equal(ours(tmp_path / "a.pt", files)[0], ours(tmp_path / "c.pt", files)[0])


def test_with_sha256_a_cached_copy_of_another_digest_is_downloaded_again(server, tmp_path):
    first, second = mat_bytes(tmp_path, 1), mat_bytes(tmp_path, 2)
    server.files["/m.mat"] = first
    url, dl = server.url + "/m.mat", ["--download-dir", str(tmp_path / "dl")]
    assert run_cli(url, "--out", str(tmp_path / "a.pt"), *dl).exit_code == 0
    server.files["/m.mat"] = second
    result = run_cli(url, "--out", str(tmp_path / "b.pt"), "--sha256", sha(second), *dl)
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "b.pt")[1].source["sha256"] == sha(second)
    assert server.conditionals[-1] == (None, None), "an unconditional download of the pinned file"


def test_an_unreachable_server_and_a_cached_copy(server, tmp_path):
    """Without --sha256 the cached copy is not used unchecked: one line saying so, with the digest to pin; with it,
    the pinned copy is imported offline."""
    first = mat_bytes(tmp_path, 1)
    server.files["/m.mat"] = first
    url, dl = server.url + "/m.mat", ["--download-dir", str(tmp_path / "dl")]
    assert run_cli(url, "--out", str(tmp_path / "a.pt"), *dl).exit_code == 0
    server.shutdown()
    server.server_close()
    line = one_error_line(run_cli(url, "--out", str(tmp_path / "b.pt"), *dl))
    assert line.startswith(f"error: {url}: cannot check whether the cached copy ") and "still current" in line
    assert line.endswith(f"pin it with its sha256 {sha(first)}") and not (tmp_path / "b.pt").exists()
    result = run_cli(url, "--out", str(tmp_path / "b.pt"), "--sha256", sha(first), *dl)
    assert result.exit_code == 0, result.output


def test_an_html_page_served_with_status_200_is_not_cached(server, tmp_path):
    page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"
    server.files["/model_best.pth.tar"], server.content_types["/model_best.pth.tar"] = page, "text/html"
    url, dl = server.url + "/model_best.pth.tar", tmp_path / "dl"
    line = one_error_line(run_cli(url, "--out", str(tmp_path / "m.pt"), "--download-dir", str(dl)))
    assert "not a readable PyTorch checkpoint" in line and "web page" in line
    assert line.endswith(f"(downloaded from {url}; the cached copy was discarded)")
    assert list(dl.iterdir()) == [] and not (tmp_path / "m.pt").exists()
    server.files["/model_best.pth.tar"] = good = mat_bytes(tmp_path, 3)  # the real file, once signed in
    result = run_cli(url, "--out", str(tmp_path / "m.pt"), "--download-dir", str(dl))
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "m.pt")[1].source["sha256"] == sha(good)


def test_a_transfer_cut_short_without_content_length_is_not_cached(server, tmp_path):
    full = mat_bytes(tmp_path, 4)
    server.files["/m.mat"] = full
    server.cut_without_length.add("/m.mat")  # half the bytes, no Content-Length, connection closed: looks complete
    url, dl = server.url + "/m.mat", tmp_path / "dl"
    line = one_error_line(run_cli(url, "--out", str(tmp_path / "m.pt"), "--download-dir", str(dl)))
    assert "not a readable MAT file" in line and line.endswith("the cached copy was discarded)")
    assert list(dl.iterdir()) == []
    server.cut_without_length.discard("/m.mat")
    result = run_cli(url, "--out", str(tmp_path / "m.pt"), "--download-dir", str(dl))
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "m.pt")[1].source["sha256"] == sha(full)


def test_no_error_repeats_torchs_advice_to_load_with_weights_only_false(tmp_path):
    page = tmp_path / "model.pth"
    page.write_bytes(b"<html><body>404 Not Found</body></html>")
    with pytest.raises(NetVLADError) as err:
        load_state(page)
    message = str(err.value)
    assert message.startswith(f"{page}: not a loadable weights-only checkpoint (neither torch's zip format nor a "
                              f"pickle of tensors") and "web page" in message
    assert "weights_only" not in message.replace("weights-only", "") and "\n" not in message
    line = one_error_line(run_cli(str(page), "--out", str(tmp_path / "m.pt")))
    assert line.startswith(f"error: {page}: not a readable PyTorch checkpoint")


def test_a_signed_url_is_requested_in_full_but_printed_and_recorded_without_credentials(server, tmp_path):
    data = mat_bytes(tmp_path, 5)
    query = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123abcd"
    server.files["/bucket/Pitts30K_struct.mat?" + query] = data
    url = f"http://reader:hunter2@127.0.0.1:{server.server_address[1]}/bucket/Pitts30K_struct.mat?{query}"
    out = tmp_path / "m.pt"
    result = run_cli(url, "--out", str(out), "--download-dir", str(tmp_path / "dl"))
    assert result.exit_code == 0, result.output
    assert server.requests[-1][0] == "/bucket/Pitts30K_struct.mat?" + query and server.auth[-1].startswith("Basic ")
    _, cfg = load_model(out)
    assert cfg.source["name"] == server.url + "/bucket/Pitts30K_struct.mat" and cfg.source["sha256"] == sha(data)
    stored = out.read_bytes() + b"".join(p.read_bytes() for p in (tmp_path / "dl").iterdir() if p.suffix == ".json")
    for secret in ("hunter2", "0123abcd", "AKIAEXAMPLE", "reader"):
        assert secret not in result.output and secret.encode() not in stored, secret


def test_a_download_dir_that_is_a_file_is_one_line(server, tmp_path):
    server.files["/m.mat"] = mat_bytes(tmp_path, 1)
    (tmp_path / "dl").write_text("not a folder")
    line = one_error_line(run_cli(server.url + "/m.mat", "--out", str(tmp_path / "m.pt"), "--download-dir",
                                  str(tmp_path / "dl")))
    assert line == f"error: {tmp_path / 'dl'}: not a folder; downloads need a folder there"


# ------------------------------------------------------------------------------------------ the mean image


def test_a_full_mean_image_subtracts_its_first_pixel_and_says_so(tmp_path):
    """caffe-style files hold an H×W×3 mean image: the input is RGB 0-255 minus averageImage(1,1,:) (the NetVLAD
    code's choice), recorded as the model's mean, and import prints one line naming that pixel and the average."""
    rng = np.random.default_rng(11)
    layers = rf.vgg_like_trunk(rng) + rf.vlad_head(rng, 8, 3, 4)
    mean_image = rng.uniform(90, 140, size=(7, 6, 3)).astype(np.float32)
    src = rf.write_matconvnet(tmp_path / "caffe.mat", layers, average_image=mean_image)
    logged: list[str] = []
    import_model(str(src), tmp_path / "m.pt", cfg=ImportConfig(input_height=32, input_width=40), progress=False,
                 log=logged.append)
    _, cfg = load_model(tmp_path / "m.pt")
    corner = mean_image[0, 0].astype(np.float64)
    assert cfg.mean == tuple(corner / 255) and cfg.std == (1 / 255,) * 3
    said = [line for line in logged if "mean image" in line]
    assert len(said) == 1 and "7×6 mean image" in said[0]
    assert ", ".join(f"{v:.4f}" for v in corner) in said[0]
    assert ", ".join(f"{v:.4f}" for v in mean_image.astype(np.float64).mean((0, 1))) in said[0]
    files = images(tmp_path, size=(40, 32), count=1)
    ref = rf.matconvnet_forward(layers, np.asarray(Image.open(files[0]).convert("RGB")), average=corner)
    assert np.abs(ours(tmp_path / "m.pt", files)[0][0] - ref["final"]).max() <= 1e-5
    logged.clear()  # a constant mean image says nothing
    src = rf.write_matconvnet(tmp_path / "vd.mat", layers)
    import_model(str(src), tmp_path / "n.pt", cfg=ImportConfig(input_height=32, input_width=40), progress=False,
                 log=logged.append)
    assert not [line for line in logged if "mean image" in line]


# ------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A pytorch-NetVlad run folder: checkpoints/checkpoint.pth.tar (VGG16, K = 4) and flags.json beside it."""
    root = tmp_path_factory.mktemp("run")
    state = {f"encoder.{k}": v for k, v in vgg16_encoder().items()} | {
        f"pool.{k}": v for k, v in netvlad_tensors(4).items()}
    legacy_save({"state_dict": state}, root / "checkpoints" / "checkpoint.pth.tar")
    return root


@pytest.mark.parametrize("flags, expected", [
    ({"num_clusters": "four"}, 'num_clusters "four"; expected an integer >= 1'),
    ({"num_clusters": None}, "num_clusters null; expected an integer >= 1"),
    ({"num_clusters": 4.9}, "num_clusters 4.9; expected an integer >= 1"),
    ({"pooling": 5}, "pooling 5; expected a string"),
    ({"pooling": None}, "pooling null; expected a string"),
    ({"vladv2": "false"}, 'vladv2 "false"; expected true or false'),
    ({"arch": 16}, "arch 16; expected a string"),
])
def test_flags_of_the_wrong_type_are_one_line(run_dir, tmp_path, flags, expected):
    (run_dir / "flags.json").write_text(json.dumps({"arch": "vgg16", "pooling": "netvlad", **flags}))
    checkpoint = run_dir / "checkpoints" / "checkpoint.pth.tar"
    line = one_error_line(run_cli(str(run_dir), "--out", str(tmp_path / "m.pt")))
    assert line == f"error: {checkpoint}: its {run_dir / 'flags.json'} says {expected}"
    assert not (tmp_path / "m.pt").exists()


def _mat(tmp: Path, name: str, edit) -> Path:
    rng = np.random.default_rng(12)
    layers = rf.vgg_like_trunk(rng) + rf.vlad_head(rng, 8, 3, 4)
    edit(layers)
    return rf.write_matconvnet(tmp / f"{name}.mat", layers)


def _set(index: int, **fields):
    def edit(layers):
        layers[index].update(fields)
    return edit


def _weights(index: int, filters=None, biases=None):
    def edit(layers):
        w, b = layers[index]["weights"][0]
        layers[index]["weights"] = rf.cell([w if filters is None else filters(w), b if biases is None else biases])
    return edit


def _vlad(**fields):
    def edit(layers):
        next(layer for layer in layers if layer["name"] == "vlad:core").update(fields)
    return edit


# layer 0: conv1_1 (3→4), 1: pool1, 2: relu1_1, 3: conv2_1, 4: pool2, 5: relu2_1, 6: conv3_1, 7: preL2, ...
BAD_LAYERS = {
    "fractional stride": (_set(0, stride=np.array([1.5, 1.0])), "layer 1 (conv1_1): stride: expected 1 or 2 integers"),
    "infinite stride": (_set(0, stride=np.array([np.inf, 1.0])), "layer 1 (conv1_1): stride: expected 1 or 2"),
    "NaN pool size": (_set(1, pool=np.array([np.nan, np.nan])), "layer 2 (pool1): pool: expected 1 or 2 integers"),
    "NaN relu leak": (_set(2, leak=np.nan), "layer 3 (relu1_1): leak must be one finite number"),
    "infinite LRN parameter": (lambda layers: layers.insert(3, rf.normalize("norm1", [5, 1, np.inf, 0.75])),
                               "layer 4 (norm1): normalize param must be 4 finite numbers"),
    "NaN LRN parameter": (lambda layers: layers.insert(3, rf.normalize("norm1", [np.nan, 1, 1e-4, 0.75])),
                          "layer 4 (norm1): normalize param must be 4 finite numbers"),
    "3 LRN parameters": (lambda layers: layers.insert(3, rf.normalize("norm1", [5, 1, 1e-4])),
                         "layer 4 (norm1): normalize param must be 4 finite numbers"),
    "5-D filters": (_weights(0, filters=lambda w: w[..., None].repeat(2, axis=4)),
                    "layer 1 (conv1_1): filters: 5-D array"),
    "filters beyond float32": (_weights(3, filters=lambda w: np.full(w.shape, 1e39)),
                               "layer 4 (conv2_1): filters: holds NaN or infinite values (or values beyond float32"),
    "missing biases": (_weights(0, biases=np.zeros(3, np.float32)), "layer 1 (conv1_1): 3 biases for 4 filters"),
    "NaN biases": (_weights(0, biases=np.full(4, np.nan, np.float32)), "layer 1 (conv1_1): biases: holds NaN"),
    "NaN K": (_vlad(K=np.nan), "(vlad:core): says K = nan, its weights have K = 3"),
    "NaN assignment weights": (lambda layers: _vlad(weights=rf.cell([
        np.full((1, 1, 8, 3), np.nan, np.float32), *list(_core(layers)["weights"][0])[1:]]))(layers),
        "(vlad:core): assignment weights: holds NaN"),
    "pooling method": (_set(1, method="median"), "pooling method must be max or avg"),
}


def _core(layers):
    return next(layer for layer in layers if layer["name"] == "vlad:core")


@pytest.mark.parametrize("what", list(BAD_LAYERS))
def test_bad_layers_are_one_line_naming_the_file_without_numpy_warnings(tmp_path, what):
    edit, message = BAD_LAYERS[what]
    src = _mat(tmp_path, what.replace(" ", "_"), edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = one_error_line(run_cli(str(src), "--out", str(tmp_path / "m.pt")))
    assert line.startswith(f"error: {src}: ") and message in line, line
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("what, edit, size, message", [
    ("a pad of 100000", _set(0, pad=np.array([100000.0] * 4)), (480, 640),
     "layer 0 (conv1_1): a 640×480 input gives 200638×200478 here, more than twice its size"),
    ("a pool window larger than the image", _set(4, pool=np.array([64.0, 64.0])), (48, 64),
     "layer 4 (pool2): a 64×48 input is 32×24 here, smaller than the layer's 64×64 window"),
    ("max pooling over padding only", _set(1, pad=np.array([2.0, 0, 0, 0])), (48, 64),
     "layer 1 (pool1): padding [2, 0, 0, 0] is not smaller than the 2×2 pooling window"),
])
def test_absurd_geometry_is_refused_at_import_for_the_configured_input_size(tmp_path, what, edit, size, message):
    """Spatial sizes are followed through the layer list for the input size the model will be given: an empty or
    absurdly large output is refused before any memory is asked for (a pad of 100000 asked `features` for 15 TB)."""
    src = _mat(tmp_path, "bad", edit)
    line = one_error_line(run_cli(str(src), "--out", str(tmp_path / "m.pt"), "--input-height", str(size[0]),
                                  "--input-width", str(size[1])))
    assert line.startswith(f"error: {src}: ") and message in line, line
    assert not (tmp_path / "m.pt").exists()


def test_fifo_device_and_symlink_loop_as_src_get_their_own_message(tmp_path):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = {fifo: "is a FIFO (named pipe), not a regular file", Path("/dev/zero"): "is a character device, not a "
             "regular file", tmp_path / "loop_a": "a symlink loop, not a file",
             tmp_path / "dangling": "file not found (a dangling symlink)"}
    for src, message in cases.items():
        results = []
        worker = threading.Thread(target=lambda: results.append(run_cli(str(src), "--out", str(tmp_path / "m.pt"))),
                                  daemon=True)
        worker.start()
        worker.join(timeout=60)
        if worker.is_alive():  # a reader blocked on the FIFO: give it a writer so that the thread ends
            with open(fifo, "wb"):
                pass
            pytest.fail(f"import hung reading {src}")
        assert one_error_line(results[0]) == f"error: {src}: {message}"
    assert not (tmp_path / "m.pt").exists()


def test_a_model_files_layer_list_gets_the_same_checks(tmp_path):
    """The same checks guard a model file's layer list (check_layers, and the geometry for the config's input size
    in ModelConfig.validate, which every model build runs), not only the MAT reader."""
    from netvlad_core.models.build import ModelConfig
    from netvlad_core.models.matconvnet import build_layers

    spec = [{"type": "conv", "in": 3, "out": 4, "kernel": [3, 3]}, {"type": "relu", "leak": float("nan")}]
    with pytest.raises(NetVLADError, match="leak must be a finite number"):
        build_layers(spec)
    spec[1] = {"type": "lrn", "param": [5, 1, float("inf"), 0.75]}
    with pytest.raises(NetVLADError, match="param must be 4 finite numbers"):
        build_layers(spec)
    assert torch.isfinite(build_layers([spec[0]])[0](torch.zeros(1, 3, 8, 8))).all()
    absurd = [{"type": "conv", "in": 3, "out": 4, "kernel": [3, 3], "pad": 100000}]
    with pytest.raises(NetVLADError, match=r"a 640×480 input gives 200638×200478 here, more than twice its size"):
        ModelConfig(backbone="matconvnet", weights="none", layers=absurd, pooling="max").validate()
    with pytest.raises(NetVLADError, match=r"a 40×32 input is 20×16 here, smaller than the layer's 32×32 window"):
        ModelConfig(backbone="matconvnet", weights="none", pooling="max", input_height=32, input_width=40, layers=[
            {"type": "conv", "in": 3, "out": 4, "kernel": [3, 3], "pad": 1, "stride": 2},
            {"type": "pool", "pool": [32, 32]}]).validate()
