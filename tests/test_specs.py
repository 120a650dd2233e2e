"""dbStruct .mat files, the dataset catalogue, VG folders, image checks and ground truth."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from netvlad_core.datasets.manifest import Split, load_ground_truth, load_split, write_split
from netvlad_core.datasets.official import (
    check_images,
    dbstruct_to_split,
    get_dataset,
    load_splits,
    parse_vg_name,
    prepare_dataset,
    vg_split,
)
from netvlad_core.datasets.specs import DBStruct, read_dbstruct, write_dbstruct
from netvlad_core.errors import NetVLADError

DB_FNS = ["000/000000_pitch1_yaw1.jpg", "000/000000_pitch1_yaw2.jpg", "001/001000_pitch2_yaw7.jpg"]
Q_FNS = ["000/000000_pitch1_yaw1.jpg", "003/003001_pitch1_yaw11.jpg"]
UTM_DB = np.array([[584000.5, 584010.25, 584100.0], [4477000.0, 4477003.5, 4477050.75]])  # 2×N, as MATLAB stores it
UTM_Q = np.array([[584001.0, 584099.0], [4477001.0, 4477049.0]])


def cell(names: list[str]) -> np.ndarray:
    """A MATLAB N×1 cell array of char arrays, as scipy writes it."""
    c = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        c[i, 0] = np.array(n)
    return c


def save_struct(path, fields: list[tuple[str, object]]) -> None:
    """A 1×1 MATLAB struct written by hand: scipy turns a dict into a struct, fields in insertion order."""
    savemat(path, {"dbStruct": dict(fields)})


def pitts_fields(num_type=np.int64) -> list[tuple[str, object]]:
    return [
        ("whichSet", "test"),
        ("dbImageFns", cell(DB_FNS)),
        ("utmDb", UTM_DB),
        ("qImageFns", cell(Q_FNS)),
        ("utmQ", UTM_Q),
        ("numImages", num_type(3)),
        ("numQueries", num_type(2)),
        ("posDistThr", 25.0),
        ("posDistSqThr", 625.0),
        ("nonTrivPosDistSqThr", 100.0),
    ]


@pytest.mark.parametrize("num_type", [np.int64, np.int32, np.uint16, np.float64], ids=lambda t: t.__name__)
def test_read_matlab_struct_with_int_or_double_counts(tmp_path, num_type):
    path = tmp_path / "pitts30k_test.mat"
    save_struct(path, pitts_fields(num_type))
    raw = loadmat(path)["dbStruct"]
    assert raw.shape == (1, 1) and raw.dtype.names[1] == "dbImageFns"  # really a struct with a cell field
    spec = read_dbstruct(path)
    assert spec.which_set == "test"
    assert spec.db_image_fns == DB_FNS and spec.q_image_fns == Q_FNS
    np.testing.assert_array_equal(spec.utm_db, UTM_DB.T)
    np.testing.assert_array_equal(spec.utm_q, UTM_Q.T)
    assert (spec.num_images, spec.num_queries) == (3, 2)
    assert (spec.pos_dist_thr, spec.pos_dist_sq_thr, spec.non_triv_pos_dist_sq_thr) == (25.0, 625.0, 100.0)
    assert spec.db_timestamps is None


def test_write_dbstruct_round_trip_matches_hand_written_file(tmp_path):
    hand = tmp_path / "hand.mat"
    save_struct(hand, pitts_fields())
    ours = write_dbstruct(tmp_path / "ours.mat", read_dbstruct(hand))
    a, b = read_dbstruct(hand), read_dbstruct(ours)
    assert a.db_image_fns == b.db_image_fns and a.q_image_fns == b.q_image_fns and a.which_set == b.which_set
    np.testing.assert_array_equal(a.utm_db, b.utm_db)
    np.testing.assert_array_equal(a.utm_q, b.utm_q)
    # the written file has the authors' field order and MATLAB shapes
    raw = loadmat(ours)["dbStruct"]
    assert raw.dtype.names[:3] == ("whichSet", "dbImageFns", "utmDb")
    assert raw.item()[2].shape == (2, 3) and raw.item()[1].shape == (3, 1)


def test_tokyo_tm_layout_with_timestamps(tmp_path):
    path = tmp_path / "tokyoTM_val.mat"
    fields = pitts_fields()
    fields.insert(3, ("dbTimeStamp", np.array([[201101, 201101, 201305]], dtype=np.float64)))
    fields.insert(6, ("qTimeStamp", np.array([[201204, 201305]], dtype=np.float64)))
    save_struct(path, fields)
    spec = read_dbstruct(path)
    np.testing.assert_array_equal(spec.db_timestamps, [201101, 201101, 201305])
    np.testing.assert_array_equal(spec.q_timestamps, [201204, 201305])
    assert spec.q_image_fns == Q_FNS
    np.testing.assert_array_equal(spec.utm_q, UTM_Q.T)
    split = dbstruct_to_split(spec, "tokyoTM", "val", tmp_path)
    assert split.q_paths == Q_FNS  # TokyoTM queries sit next to the database images (qPath = dbPath)
    assert split.extra["require_different_timestamp"] is True
    np.testing.assert_array_equal(split.q_timestamps, [201204, 201305])
    # timestamps survive the manifest
    write_split(split, tmp_path / "out" / "val")
    back = load_split(tmp_path / "out" / "val")
    np.testing.assert_array_equal(back.db_timestamps, [201101, 201101, 201305])


def test_mat_without_dbstruct_or_with_too_few_fields(tmp_path):
    other = tmp_path / "other.mat"
    savemat(other, {"somethingElse": np.eye(2)})
    with pytest.raises(NetVLADError, match=r"other\.mat: no 'dbStruct' variable \(found: somethingElse\)"):
        read_dbstruct(other)
    few = tmp_path / "few.mat"
    save_struct(few, pitts_fields()[:8])
    with pytest.raises(NetVLADError, match=r"few\.mat: dbStruct has 8 fields, expected 10"):
        read_dbstruct(few)
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(NetVLADError, match="garbage.mat"):
        read_dbstruct(garbage)


def with_field(fields: list[tuple[str, object]], name: str, value) -> list[tuple[str, object]]:
    return [(n, value if n == name else v) for n, v in fields]


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("posDistThr", float("nan"), "must be a finite distance above 0, got nan"),
        ("posDistThr", float("inf"), "must be a finite distance above 0, got inf"),
        ("posDistThr", 0.0, "must be a finite distance above 0, got 0.0"),
        ("posDistThr", -25.0, "must be a finite distance above 0, got -25.0"),
        ("posDistSqThr", float("nan"), "must be a finite distance above 0, got nan"),
        ("posDistSqThr", 25.0, r"is 25\.0 but dbStruct\.posDistThr² is 625\.0"),  # the distance, not its square
        ("posDistSqThr", 625.0 * (1 + 1e-6), r"is 625\.000624\d* but dbStruct\.posDistThr² is 625\.0"),
        ("nonTrivPosDistSqThr", float("-inf"), "must be a finite distance above 0, got -inf"),
        ("nonTrivPosDistSqThr", 0.0, "must be a finite distance above 0, got 0.0"),
        ("nonTrivPosDistSqThr", 900.0, r"is 900\.0 \(training positives within 30 m\), more than"),
    ],
)
def test_bad_thresholds_in_a_dbstruct_are_refused(tmp_path, field, value, problem):
    path = tmp_path / "pitts30k_test.mat"
    save_struct(path, with_field(pitts_fields(), field, value))
    with pytest.raises(NetVLADError, match=rf"^{re.escape(str(path))}: dbStruct\.{field} {problem}") as info:
        read_dbstruct(path)
    assert "\n" not in str(info.value)


def test_consistent_thresholds_are_accepted(tmp_path):
    path = tmp_path / "a.mat"
    save_struct(path, with_field(pitts_fields(), "posDistSqThr", 625.0 * (1 + 1e-12)))  # float rounding
    assert read_dbstruct(path).pos_dist_sq_thr == pytest.approx(625.0)
    other = [("posDistThr", 30.0), ("posDistSqThr", 900.0), ("nonTrivPosDistSqThr", 900.0)]  # not the official values
    fields = pitts_fields()
    for name, value in other:
        fields = with_field(fields, name, value)
    save_struct(path, fields)
    spec = read_dbstruct(path)
    assert (spec.pos_dist_thr, spec.pos_dist_sq_thr, spec.non_triv_pos_dist_sq_thr) == (30.0, 900.0, 900.0)


def test_download_cli_refuses_a_spec_with_bad_thresholds_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    spec_dir, images = tmp_path / "spec", tmp_path / "images"
    spec_dir.mkdir()
    for name in DB_FNS + ["queries_real/" + q for q in Q_FNS]:
        tiny_jpeg(images / name)
    save_struct(spec_dir / "pitts30k_test.mat", with_field(pitts_fields(), "posDistSqThr", 600.0))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["download", "--dataset", "pitts30k", "--spec", str(spec_dir), "--image-root",
                                      str(images), "--out", str(tmp_path / "dataset"), "--split", "test"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {spec_dir / 'pitts30k_test.mat'}: dbStruct.posDistSqThr is 600.0 but dbStruct.posDistThr² is 625.0 "
        f"(dbStruct.posDistThr = 25.0)"]
    assert result.stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_split_json_is_strict_json(tmp_path):
    from netvlad_core.io import read_json, write_json

    split = Split("fake", "test", tmp_path, ["a.jpg"], np.zeros((1, 2)), ["q.jpg"], np.zeros((1, 2)))
    split_dir = write_split(split, tmp_path / "split")
    meta = split_dir / "split.json"
    text = meta.read_text()
    for constant in ("NaN", "Infinity", "-Infinity"):
        meta.write_text(text.replace('"pos_dist_thr": 25.0', f'"pos_dist_thr": {constant}'))
        assert constant in meta.read_text()
        with pytest.raises(NetVLADError) as info:
            load_split(split_dir)
        assert str(info.value) == f"{meta}: not valid JSON ({constant} is not a JSON number)"
    with pytest.raises(NetVLADError, match=rf"^{re.escape(str(tmp_path / 'bad.json'))}: cannot write NaN or infinity"):
        write_json(tmp_path / "bad.json", {"pos_dist_thr": float("nan")})
    assert not (tmp_path / "bad.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no temporary left either
    write_json(tmp_path / "good.json", {"x": 4477000.123456789})
    assert read_json(tmp_path / "good.json") == {"x": 4477000.123456789}


def test_dbstruct_to_split_conventions(tmp_path):
    spec = DBStruct("test", DB_FNS, UTM_DB.T, Q_FNS, UTM_Q.T)
    pitts = dbstruct_to_split(spec, "pitts30k", "test", tmp_path)
    assert pitts.db_paths == DB_FNS
    assert pitts.q_paths == ["queries_real/" + f for f in Q_FNS]
    assert (pitts.dataset, pitts.name, pitts.pos_dist_thr, pitts.train_pos_dist_thr) == ("pitts30k", "test", 25.0, 10.0)
    tokyo = dbstruct_to_split(spec, "TOKYO247", "test", tmp_path)  # names are case-insensitive
    assert tokyo.dataset == "tokyo247"
    assert tokyo.db_paths == [f[:-4] + ".png" for f in DB_FNS]
    assert tokyo.q_paths == ["queries_real/" + f for f in Q_FNS]  # queries keep their .jpg
    assert tokyo.extra["views_per_panorama"] == 12
    bad = DBStruct("test", ["../../etc/passwd"], [[0.0, 0.0]], [], np.zeros((0, 2)))
    with pytest.raises(NetVLADError, match="not a relative path inside the image root"):
        dbstruct_to_split(bad, "pitts30k", "test", tmp_path)
    with pytest.raises(NetVLADError, match=r"unknown dataset 'paris' \(valid: pitts30k, pitts250k, tokyoTM, tokyo247"):
        get_dataset("paris")


def test_tokyo247_database_is_png_on_disk(tmp_path):
    (tmp_path / "spec").mkdir()
    save_struct(tmp_path / "spec" / "tokyo247.mat", pitts_fields())
    images = tmp_path / "tokyo"
    for p in DB_FNS:
        tiny_jpeg(images / p)  # the listed .jpg exists, but the real .png does not yet
    for p in Q_FNS:
        tiny_jpeg(images / "queries_real" / p)
    with pytest.raises(NetVLADError, match=r"3 of 5 images missing, first: 000/000000_pitch1_yaw1\.png"):
        load_splits("tokyo247", spec_dir=tmp_path / "spec", image_root=images)
    for p in DB_FNS:
        Image.new("RGB", (8, 6)).save(images / (p[:-4] + ".png"))
    (split,) = load_splits("tokyo247", spec_dir=tmp_path / "spec", image_root=images)
    assert split.name == "test" and split.db_paths[2] == "001/001000_pitch2_yaw7.png"


def test_catalogue_splits():
    assert get_dataset("pitts250k").split_files == (
        ("train", "pitts250k_train.mat"), ("val", "pitts250k_val.mat"), ("test", "pitts250k_test.mat"))
    assert get_dataset("tokyotm").split_names == ("train", "val")
    assert get_dataset("tokyo247").split_files == (("test", "tokyo247.mat"),)
    assert get_dataset("synthetic").split_files[0] == ("train", "synthetic_train.mat")
    assert get_dataset("vg").folder_format


# ----------------------------------------------------------------------------------------------- VG folders


def tiny_jpeg(path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 255 - value, 40)).save(path, format="JPEG")


def vg_name(east: float, north: float, full: bool = True) -> str:
    if not full:
        return f"@{east}@{north}@.jpg"
    return f"@{east}@{north}@17@T@40.4433@-79.9521@pano{int(east)}@03@090@0@0@2.5@201604@note@.jpg"


@pytest.mark.parametrize("with_images_dir", [True, False])
def test_vg_folder_parser(tmp_path, with_images_dir):
    root = tmp_path / "pitts30k_vg"
    base = root / "images" if with_images_dir else root
    db = [(584000.5, 4477000.25), (584030.0, 4477010.0), (584500.0, 4477500.0)]
    q = [(584001.0, 4477001.0), (584499.0, 4477499.0)]
    for i, (e, n) in enumerate(db):
        tiny_jpeg(base / "test" / "database" / ("sub" if i == 2 else "") / vg_name(e, n, full=i != 1))
    for e, n in q:
        tiny_jpeg(base / "test" / "queries" / vg_name(e, n))
    (base / "test" / "database" / "README.txt").write_text("not an image, ignored")
    for role in ("database", "queries"):
        tiny_jpeg(base / "val" / role / vg_name(1.0, 2.0))

    split = vg_split(root, "test")
    assert split.image_root == base / "test"
    assert split.num_db == 3 and split.num_queries == 2
    by_path = dict(zip(split.db_paths, split.db_utm.tolist()))
    assert by_path["database/" + vg_name(*db[0])] == list(db[0])
    assert by_path["database/" + vg_name(*db[1], full=False)] == list(db[1])
    assert by_path["database/sub/" + vg_name(*db[2])] == list(db[2])
    assert sorted(map(tuple, split.q_utm.tolist())) == sorted(q)
    assert all(p.startswith("queries/") for p in split.q_paths)
    check_images(split)  # every listed file exists
    assert [s.name for s in load_splits("vg", spec_dir=None, image_root=root)] == ["val", "test"]

    assert parse_vg_name("@-12.5@7@.png") == (-12.5, 7.0)
    with pytest.raises(NetVLADError, match="not a VG benchmark file name"):
        parse_vg_name("/x/photo_001.jpg")
    with pytest.raises(NetVLADError, match="UTM east/north fields are not numbers"):
        parse_vg_name("/x/@east@north@17@T@.jpg")
    tiny_jpeg(base / "test" / "queries" / "IMG_0001.jpg")
    with pytest.raises(NetVLADError, match=r"IMG_0001\.jpg: not a VG benchmark file name"):
        vg_split(root, "test")


def test_prepare_dataset_vg(tmp_path):
    root = tmp_path / "st_lucia"
    for split in ("val", "test"):
        for role, offset in (("database", 0.0), ("queries", 3.0)):
            for i in range(4):
                tiny_jpeg(root / "images" / split / role / vg_name(300000.0 + 40 * i + offset, 6900000.0))
    out = tmp_path / "data" / "st_lucia"
    assert prepare_dataset("vg", out, image_root=root, progress=False) == [out / "val", out / "test"]
    split = load_split(out / "test")
    assert (split.num_db, split.num_queries, split.image_root) == (4, 4, (root / "images" / "test").resolve())
    assert [p.tolist() for p in load_ground_truth(out / "test").positives] == [[0], [1], [2], [3]]
    with pytest.raises(NetVLADError, match="no spec file is used"):
        prepare_dataset("vg", out, spec="x.tar.gz", image_root=root)
    with pytest.raises(NetVLADError, match="no train/val/test folders"):
        prepare_dataset("vg", tmp_path / "o2", image_root=tmp_path / "data")
    assert not (tmp_path / "o2").exists()


def test_check_images_names_count_and_first_missing(tmp_path):
    root = tmp_path / "images"
    db = [f"{d:03d}/{d:03d}{i:03d}_pitch1_yaw1.jpg" for d in range(2) for i in range(5)]
    q = [f"queries_real/000/{i:06d}_pitch1_yaw1.jpg" for i in range(3)]
    for p in db + q:
        tiny_jpeg(root / p)
    split = Split("pitts30k", "test", root, db, np.zeros((10, 2)), q, np.zeros((3, 2)))
    check_images(split)
    (root / db[3]).unlink()
    (root / q[1]).unlink()
    with pytest.raises(NetVLADError) as err:
        check_images(split)
    msg = str(err.value)
    assert msg.startswith(f"{root}: 2 of 13 images missing, first: {db[3]}, {q[1]}")
    assert "\n" not in msg


# ----------------------------------------------------------------------------------------------- ground truth


def test_ground_truth_matches_brute_force(tmp_path):
    rng = np.random.default_rng(7)
    db = rng.uniform(0, 120, size=(80, 2)) + [584000, 4477000]
    q = rng.uniform(0, 120, size=(25, 2)) + [584000, 4477000]
    db[0], q[0] = [584000.0, 4477000.0], [584025.0, 4477000.0]  # exactly 25 m apart: a positive (<=)
    split = Split("pitts30k", "val", tmp_path / "images", [f"{i}.jpg" for i in range(80)], db,
                  [f"q{i}.jpg" for i in range(25)], q, pos_dist_thr=25.0, non_triv_pos_dist_sq_thr=100.0)
    write_split(split, tmp_path / "val")
    gt = load_ground_truth(tmp_path / "val")
    for i in range(len(q)):
        d = np.sqrt(((db - q[i]) ** 2).sum(axis=1))
        for radius, got in ((25.0, gt.positives[i]), (10.0, gt.train_positives[i])):
            want = [j for j in sorted(range(len(db)), key=lambda j: (d[j], j)) if d[j] <= radius]
            assert got.tolist() == want
    assert 0 in gt.positives[0].tolist() and 0 not in gt.train_positives[0].tolist()
    assert sum(len(p) for p in gt.positives) > sum(len(p) for p in gt.train_positives) > 0
