"""The one image decoder (`netvlad_core.datasets.images.load_image`): EXIF orientation, high bit depths scaled (not
clipped), alpha composited over the normalisation mean, images smaller than the stride and decompression bombs
refused per file, and errors raised in DataLoader workers reaching the user as the same one line as without workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netvlad_core.datasets.images import ImageFiles, load_image
from netvlad_core.datasets.manifest import load_split
from netvlad_core.errors import NetVLADError
from netvlad_core.features import FeatureConfig, extract_split_features, image_loader
from netvlad_core.models import ModelConfig
from tests.conftest import REPO, TINY_MODEL_CONFIG, TinyModel, make_split

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKGROUND = [round(255 * m) for m in MEAN]  # (124, 116, 104): where alpha is 0


def _pixels(path: Path, height: int, width: int, **kw) -> np.ndarray:
    """load_image's tensor back in 0..255 pixel units, (height, width, 3) float64."""
    t = load_image(path, height, width, MEAN, STD, **kw).double()
    return (t * torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
            + torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)).mul(255).permute(1, 2, 0).numpy()


def _exact(path: Path, height: int, width: int) -> np.ndarray:
    """Integer pixel values (the decoder works in 8 bit; un-normalising is exact up to float32 rounding)."""
    px = _pixels(path, height, width)
    np.testing.assert_allclose(px, np.rint(px), atol=1e-3)
    return np.rint(px).astype(np.int64)


# ------------------------------------------------------------------------------------------- high bit depth

def test_16bit_grayscale_png_equals_its_8bit_version(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(24, 32)).astype(np.uint16)
    values[0, :6] = [0, 128, 129, 385, 65406, 65535]  # near rounding boundaries: v/257 = 0.498, 0.502, 1.498, 254.498
    p16, p8 = tmp_path / "g16.png", tmp_path / "g8.png"
    Image.fromarray(values).save(p16)
    with Image.open(p16) as im:
        assert im.mode == "I;16", "the test must really use a 16-bit PNG"
        np.testing.assert_array_equal(np.asarray(im), values)
    eight = ((values.astype(np.int64) + 128) // 257).astype(np.uint8)  # round(v / 257), v/257 never ends in .5
    np.testing.assert_array_equal(eight, np.rint(values / 257.0))
    Image.fromarray(eight).save(p8)
    assert Image.open(p8).mode == "L"
    # the same 8-bit image exactly (tolerance 0): the decoder quantises to round(v / 257), then resizes in 8 bit
    for h, w in ((24, 32), (12, 20), (48, 64)):
        torch.testing.assert_close(load_image(p16, h, w, MEAN, STD), load_image(p8, h, w, MEAN, STD), rtol=0, atol=0)
    assert list(_exact(p16, 24, 32)[0, :6, 0]) == [0, 0, 1, 1, 254, 255]


def test_16bit_big_endian_tiff_is_scaled_too(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "g16b.tif"
    Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes()).save(p)
    assert Image.open(p).mode == "I;16B"
    px = _exact(p, 1, 4)
    assert px[0, :, 0].tolist() == [0, 1, 128, 255] and (px[..., 0] == px[..., 2]).all()


def test_32bit_int_tiff(tmp_path):
    small = tmp_path / "i16range.tif"  # values within 0..65535: the 16-bit range
    Image.fromarray(np.array([[0, 257, 65535, 1000]], np.int32)).save(small)
    assert Image.open(small).mode == "I"
    assert _exact(small, 1, 4)[0, :, 1].tolist() == [0, 1, 255, 4]  # 1000 / 257 = 3.89
    big = tmp_path / "i32range.tif"  # beyond 65535: the int32 range 0..2^31-1, negatives as 0
    Image.fromarray(np.array([[0, 2 ** 31 - 1, 2 ** 30, 70000, -5]], np.int32)).save(big)
    assert Image.open(big).mode == "I"
    assert _exact(big, 1, 5)[0, :, 0].tolist() == [0, 255, 128, 0, 0]


def test_float_tiff(tmp_path):
    unit = tmp_path / "f01.tif"  # max <= 1: the range 0..1
    Image.fromarray(np.array([[0.0, 0.2, 0.5, 1.0, -0.1]], np.float32)).save(unit)
    assert Image.open(unit).mode == "F"
    assert _exact(unit, 1, 5)[0, :, 0].tolist() == [0, 51, 128, 255, 0]
    byte = tmp_path / "f255.tif"  # max > 1: the range 0..255, clipped
    Image.fromarray(np.array([[0.0, 12.4, 200.6, 300.0, -3.0]], np.float32)).save(byte)
    assert _exact(byte, 1, 5)[0, :, 2].tolist() == [0, 12, 201, 255, 0]


# --------------------------------------------------------------------------------------------------- alpha etc.

def test_la_is_composited_over_the_normalisation_mean(tmp_path):
    p = tmp_path / "la.png"
    Image.fromarray(np.array([[[200, 0], [200, 255], [100, 128]]], np.uint8), "LA").save(p)
    assert Image.open(p).mode == "LA"
    px = _exact(p, 1, 3)
    assert px[0, 0].tolist() == BACKGROUND  # fully transparent: the mean colour, which normalises to ~0
    assert px[0, 1].tolist() == [200, 200, 200]  # opaque: itself
    # half transparent: (100·128 + bg·127) / 255 = 111.95, 107.97, 101.99 for bg = 124, 116, 104
    assert px[0, 2].tolist() == [112, 108, 102]
    assert np.abs(load_image(p, 1, 3, MEAN, STD)[:, 0, 0].numpy()).max() < 0.5 / 255 / min(STD) + 1e-6


def test_rgba_and_palette_transparency_agree(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.array([[[10, 20, 30, 0], [255, 0, 0, 255], [0, 255, 0, 255]]], np.uint8), "RGBA").save(rgba)
    pal = tmp_path / "p.png"
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    p.putdata([0, 1, 2])
    p.save(pal, transparency=0)
    with Image.open(pal) as im:
        assert im.mode == "P" and im.info.get("transparency") == 0
    expected = [BACKGROUND, [255, 0, 0], [0, 255, 0]]
    assert _exact(rgba, 1, 3)[0].tolist() == expected
    assert _exact(pal, 1, 3)[0].tolist() == expected
    opaque = tmp_path / "p_opaque.png"  # a palette image without transparency: the palette colours
    p.save(opaque)
    assert _exact(opaque, 1, 3)[0].tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0]]


def test_transparent_colour_of_grey_and_16bit_grey(tmp_path):
    grey = tmp_path / "lt.png"
    Image.fromarray(np.array([[7, 250]], np.uint8)).save(grey, transparency=7)
    assert Image.open(grey).mode == "L"
    assert _exact(grey, 1, 2)[0].tolist() == [BACKGROUND, [250, 250, 250]]
    deep = tmp_path / "g16t.png"
    Image.fromarray(np.array([[7, 65000]], np.uint16)).save(deep, transparency=7)
    with Image.open(deep) as im:
        assert im.mode == "I;16" and im.info["transparency"] == 7
    assert _exact(deep, 1, 2)[0].tolist() == [BACKGROUND, [253, 253, 253]]  # 65000 / 257 = 252.9


def test_cmyk_bilevel_and_grey(tmp_path):
    cmyk = tmp_path / "c.tif"
    c = Image.new("CMYK", (3, 1))
    c.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    c.save(cmyk)
    assert Image.open(cmyk).mode == "CMYK"
    assert _exact(cmyk, 1, 3)[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]  # white, cyan, black
    bilevel = tmp_path / "b.png"
    Image.fromarray(np.array([[True, False]])).save(bilevel)
    assert Image.open(bilevel).mode == "1"
    assert _exact(bilevel, 1, 2)[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    grey = tmp_path / "l.png"
    Image.fromarray(np.array([[7, 250]], np.uint8)).save(grey)
    assert _exact(grey, 1, 2)[0].tolist() == [[7, 7, 7], [250, 250, 250]]


# ------------------------------------------------------------------------------------------------------ EXIF

@pytest.mark.parametrize("orientation, stored_as", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_phone_photo_equals_its_upright_copy(tmp_path, orientation, stored_as):
    """A camera that stores the sensor's pixels and an EXIF Orientation tag: 6 = turn 90° clockwise to view, 8 =
    counter-clockwise. The upright copy is written as a JPEG of the same quality; sizes are multiples of 16 so
    the JPEG blocks line up and the difference is JPEG noise only: mean |Δ| < 1 level, max |Δ| <= 12 levels."""
    rng = np.random.default_rng(orientation)
    small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    upright = Image.fromarray(small).resize((64, 48), Image.BILINEAR)  # landscape 64×48
    up_path, rot_path = tmp_path / "upright.jpg", tmp_path / f"rotated{orientation}.jpg"
    upright.save(up_path, quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(stored_as)  # portrait 48×64 pixel data
    stored.save(rot_path, quality=95, exif=exif)
    with Image.open(rot_path) as im:
        assert im.size == (48, 64) and im.getexif()[0x0112] == orientation
    for h, w in ((48, 64), (24, 32)):
        a, b = _pixels(rot_path, h, w), _pixels(up_path, h, w)
        diff = np.abs(a - b)
        assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())
    # and the stored (unrotated) pixels are far from the upright ones: the test can tell
    assert np.abs(np.asarray(stored.resize((64, 48)), np.float64) - np.asarray(upright, np.float64)).mean() > 10


# ------------------------------------------------------------------------------------------- refused images

def test_image_smaller_than_the_stride_is_refused(tmp_path):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (20, 12), (1, 2, 3)).save(p)
    with pytest.raises(NetVLADError) as e:
        load_image(p, 48, 64, MEAN, STD, min_side=16)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "20×12" in msg and "16" in msg and "\n" not in msg
    assert load_image(p, 48, 64, MEAN, STD, min_side=12).shape == (3, 48, 64)  # exactly the stride: fine
    assert load_image(p, 48, 64, MEAN, STD).shape == (3, 48, 64)  # default: no minimum
    with pytest.raises(NetVLADError, match="20×12"):
        ImageFiles([p], 48, 64, min_side=16)[0]
    with pytest.raises(NetVLADError, match="20×12"):
        list(image_loader([p], height=48, width=64, mean=MEAN, std=STD, batch_size=1, num_workers=0, min_side=16))


def test_features_pass_the_models_stride(tiny_split, tmp_path):
    split = load_split(tiny_split)  # 64×48 images
    model = TinyModel()
    model.stride = 49
    with pytest.raises(NetVLADError, match="64×48"):
        extract_split_features(model, TINY_MODEL_CONFIG, split, tmp_path / "f.h5", device=torch.device("cpu"),
                               cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)
    model.stride = 48
    extract_split_features(model, TINY_MODEL_CONFIG, split, tmp_path / "f.h5", device=torch.device("cpu"),
                           cfg=FeatureConfig(batch_size=4, num_workers=0), progress=False)


def test_decompression_bomb_is_a_per_image_error(tmp_path, monkeypatch):
    from netvlad_core.localization import _read_images

    ok, bomb = tmp_path / "ok.png", tmp_path / "bomb.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(ok)  # 64 pixels: under the limit
    Image.new("RGB", (20, 20), (9, 9, 9)).save(bomb)  # 400 pixels: over 2 × MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(NetVLADError) as e:
        load_image(bomb, 8, 8, MEAN, STD)
    assert str(e.value).startswith(f"{bomb}: ") and "\n" not in str(e.value)
    good, failures = _read_images([ok, bomb, ok], 8, 8, MEAN, STD)
    assert [i for i, _ in good] == [0, 2]
    assert [f.image for f in failures] == [str(bomb)] and failures[0].message.startswith(f"{bomb}: ")


# ------------------------------------------------------------------------------------------ worker processes

def _corrupt_split(tmp_path: Path) -> tuple[Path, Path]:
    split_dir = make_split(tmp_path, num_db=10, num_q=3)
    bad = load_split(split_dir).db_files()[5]
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 3])  # a truncated JPEG
    return split_dir, bad


def test_worker_errors_are_the_same_one_line_error(tmp_path):
    split_dir, bad = _corrupt_split(tmp_path)
    split = load_split(split_dir)
    messages = []
    for workers in (2, 0):
        with pytest.raises(NetVLADError) as e:
            extract_split_features(TinyModel(), TINY_MODEL_CONFIG, split, tmp_path / f"f{workers}.h5",
                                   device=torch.device("cpu"), cfg=FeatureConfig(batch_size=2, num_workers=workers),
                                   progress=False)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{bad}: cannot decode image (") and "\n" not in messages[0]


def test_triplet_loader_worker_errors_are_one_line(tmp_path):
    from netvlad_core.mining import Triplets
    from netvlad_core.training.triplet import TripletBatches

    split_dir, bad = _corrupt_split(tmp_path)
    split = load_split(split_dir)
    model_cfg = ModelConfig(backbone="resnet18_layer3", weights="none", input_height=48, input_width=64,
                            mean=tuple(MEAN), std=tuple(STD))
    good = [[Triplets(query=0, positive=1, negatives=np.array([2, 3]))]]
    broken = good + [[Triplets(query=1, positive=5, negatives=np.array([2]))]]  # db 5 is the corrupt file
    images, counts = next(iter(TripletBatches(good, split, model_cfg).loader(num_workers=0)))
    assert images.shape == (4, 3, 48, 64) and counts.tolist() == [2]
    for workers in (2, 0):
        with pytest.raises(NetVLADError) as e:
            list(TripletBatches(broken, split, model_cfg).loader(num_workers=workers))
        assert str(e.value).startswith(f"{bad}: cannot decode image (") and "\n" not in str(e.value)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("workers", [2, 0])
def test_cli_features_with_workers_prints_one_error_line(tmp_path, workers):
    from netvlad_core.models import ModelConfig, build_model, save_model

    split_dir, bad = _corrupt_split(tmp_path)
    with pytest.raises(NetVLADError) as direct:  # what the decoder itself says about the file
        load_image(bad, 48, 64, MEAN, STD)
    cfg = ModelConfig(backbone="resnet18_layer3", weights="none", num_clusters=4, input_height=48, input_width=64)
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_model(cfg), cfg)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("there before")
    before = _listing(out_dir)
    netvlad = Path(sys.executable).with_name("netvlad")
    proc = subprocess.run([str(netvlad), "features", "--model", str(tmp_path / "model.pt"), "--split-dir",
                           str(split_dir), "--out", str(out_dir / "f.h5"), "--workers", str(workers),
                           "--batch-size", "2", "--device", "cpu", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {direct.value}"]
    assert str(direct.value).startswith(f"{bad}: cannot decode image (")
    # nothing left behind: the failure came before any rows were committed, so not even the partial file
    assert _listing(out_dir) == before
