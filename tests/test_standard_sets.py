"""The standard test sets in VG folder format: published counts (a warning when a folder differs), Nordland's
positives by frames (the VG benchmark's dummy-UTM grid), SF-XL's queries folders, and the MSLS folder conversion."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from netvlad_core.datasets.manifest import load_ground_truth
from netvlad_core.datasets.official import get_dataset, load_splits, prepare_dataset
from netvlad_core.datasets.standard import SETS, Published, StandardSet
from netvlad_core.errors import NetVLADWarning
from tests.conftest import make_jpegs


def downloader_coord(num: float, left: int, right: int) -> str:
    """A coordinate as VPR-datasets-downloader's util.format_coord writes it: the integer part zero-padded to ``left``
    digits, the decimals cut (not rounded) to ``right`` digits."""
    sign = "-" if num < 0 else ""
    integer, decimal = (str(abs(float(num))) + ".").split(".")[:2]
    return f"{sign}{int(integer):0{left - len(sign)}d}.{decimal[:right]:<0{right}}"


def nordland_folder(root, frames: int, *, spacing: float = 25 / 10.5):
    """A Nordland test split named as download_nordland.py names it: ``@0@<north>@@@@@<frame>@@@@@@@@.jpg``."""
    names = [f"@0@{downloader_coord(i * spacing, 5, 1)}@@@@@{i}@@@@@@@@.jpg" for i in range(frames)]
    for role in ("database", "queries"):
        make_jpegs(root / "images" / "test" / role, names, size=(16, 12))
    return root


def test_nordland_positives_are_the_frames_within_ten(tmp_path):
    root = nordland_folder(tmp_path / "nordland", 40)
    with pytest.warns(NetVLADWarning, match="27,592 and 27,592"):  # 40 frames, not the published 27,592
        out = prepare_dataset("nordland", tmp_path / "out", image_root=root, progress=False)
    assert out == [tmp_path / "out" / "test"]
    positives = load_ground_truth(out[0]).positives
    for q in range(40):  # query frame q (file order = frame order here: names sort by north)
        assert sorted(positives[q].tolist()) == list(range(max(0, q - 10), min(40, q + 11))), q
    extra = json.loads((out[0] / "split.json").read_text())["extra"]
    assert extra["frame_grid"] is True and "±10" in extra["positives"]
    assert extra["published_counts"] == {"num_db": 27592, "num_queries": 27592}


def test_nordland_off_the_frame_grid_warns(tmp_path):
    root = nordland_folder(tmp_path / "nordland", 12, spacing=3.0)  # 3 m apart: positives would be ±8 frames
    with pytest.warns(NetVLADWarning) as caught:
        (split,) = load_splits("nordland", spec_dir=None, image_root=root)
    assert any("off the VG benchmark's frame grid" in str(w.message) for w in caught)
    assert split.extra["frame_grid"] is False


def vg_name(east: float, north: float, note: str = "") -> str:
    return f"@{east:.2f}@{north:.2f}@17@T@@@@@@@@@@{note}@.jpg"


def test_published_counts_warn_only_when_different(tmp_path, monkeypatch):
    root = tmp_path / "p30k"
    make_jpegs(root / "images" / "test" / "database", [vg_name(500000 + 5 * i, 4000000) for i in range(6)])
    make_jpegs(root / "images" / "test" / "queries", [vg_name(500001 + 5 * i, 4000000) for i in range(3)])
    with pytest.warns(NetVLADWarning, match=r"pitts30k-vg test: 6 database images and 3 queries .* 10,000 and 6,816"):
        load_splits("pitts30k-vg", spec_dir=None, image_root=root)
    monkeypatch.setitem(SETS, "pitts30k-vg", StandardSet("pitts30k-vg", "", "", (Published("test", 6, 3),)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same folder against matching counts: no warning
        (split,) = load_splits("pitts30k-vg", spec_dir=None, image_root=root)
    assert split.extra["published_counts"] == {"num_db": 6, "num_queries": 3}


def test_sf_xl_reads_queries_v1_by_default_and_another_on_request(tmp_path):
    root = tmp_path / "sf_xl" / "processed"
    make_jpegs(root / "test" / "database", [vg_name(550000 + 5 * i, 4180000) for i in range(5)])
    make_jpegs(root / "test" / "queries_v1", [vg_name(550001, 4180000)])
    make_jpegs(root / "test" / "queries_night", [vg_name(550011, 4180000), vg_name(550016, 4180000)])
    with pytest.warns(NetVLADWarning, match="1,000 queries"):
        (v1,) = load_splits("sf-xl", spec_dir=None, image_root=root)
    assert v1.num_queries == 1 and v1.q_paths[0].startswith("queries_v1/")
    (night,) = load_splits("sf-xl", spec_dir=None, image_root=root, queries_folder="queries_night")
    assert night.num_queries == 2 and "published_counts" not in night.extra  # no published figure to check
    np.testing.assert_allclose(night.q_utm[:, 0], [550011, 550016])


def test_the_msls_folder_conversion_is_named_as_such(tmp_path):
    root = tmp_path / "msls"
    make_jpegs(root / "images" / "val" / "database", [vg_name(723000 + 5 * i, 6175000, "day_forward_cph")
                                                      for i in range(4)])
    make_jpegs(root / "images" / "val" / "queries", [vg_name(723001, 6175000, "night_sideways_cph")])
    for name in ("vg", "msls-vg"):
        with pytest.warns(NetVLADWarning, match="VG folder conversion of MSLS.*not the official MSLS protocol"):
            (split,) = load_splits(name, spec_dir=None, image_root=root)
        assert split.extra["msls_vg_conversion"] is True
    assert get_dataset("msls-vg").benchmark_split == "val" and get_dataset("nordland").benchmark_split == "test"
