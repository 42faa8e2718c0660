"""data_prep.convert and data_prep.demo on real files: read-back, skipped images, resume, CLI errors."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest_data import beton_rows, id_of, make_tree
from data_prep import manifest as M
from data_prep.convert import convert, main

ROOT = Path(__file__).resolve().parents[1]


def test_convert_and_read_back(tmp_path):
    listed = make_tree(tmp_path / "src", [5, 7, 4])
    (tmp_path / "src" / "c1" / "notes.txt").write_text("not an image")
    s = convert(tmp_path / "src", tmp_path / "out", shards=2, workers=2, progress=False)
    assert (s["images"], s["classes"], s["shards"], s["skipped"]) == (16, 3, 2, [])
    assert s["written_shards"] == [0, 1] and s["bytes"] > 0

    table = pq.read_table(tmp_path / "out" / M.MANIFEST)
    assert table.schema.remove_metadata() == M.SCHEMA
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(16))
    assert [(r["path"], r["label"]) for r in rows] == listed
    assert [r["class_name"] for r in rows] == [f"c{label}" for _, label in listed]
    assert all(r["bytes"] == os.path.getsize(tmp_path / "src" / r["path"]) for r in rows)

    meta = M.read_metadata(tmp_path / "out")
    assert meta["n"] == 16 and meta["classes"] == ["c0", "c1", "c2"]
    assert meta["options"]["max_resolution"] == 256 and meta["options"]["write_mode"] == "jpg"
    assert meta["options"]["src"] == str((tmp_path / "src").absolute())
    assert [m["file"] for m in meta["shards"]] == ["shard-00000.beton", "shard-00001.beton"]
    assert len(M.read_skipped(tmp_path / "out")) == 0

    # every manifest row points at its sample in the shards; pixels survive the JPEG round trip
    man = M.read_manifest(tmp_path / "out")
    shards = [beton_rows(man.shard_path(i)) for i in range(2)]
    for sid, shard, index, label in zip(man.ids, man.shard, man.index, man.labels):
        ids, labels, images = shards[shard]
        assert (ids[index], labels[index]) == (sid, label)
        assert id_of(images[index]) == sid
        assert images[index].shape[:2] in ((20, 24), (24, 20), (18, 18))


def test_raw_mode_and_limits(tmp_path):
    make_tree(tmp_path / "src", [6, 6], ext="jpg", sizes=((40, 60),))
    s = convert(tmp_path / "src", tmp_path / "out", shard_size=3, max_resolution=30, write_mode="raw",
                limit_per_class=4, workers=1, progress=False)
    assert (s["images"], s["shards"]) == (8, 3)
    man = M.read_manifest(tmp_path / "out")
    # ids stay ImageFolder indices of the whole tree: the first 4 of each class
    assert man.ids.tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    ids, _, images = beton_rows(man.shard_path(0))
    assert images[0].shape == (20, 30, 3)          # longer side resized to max_resolution
    assert id_of(images[0]) == ids[0]


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    src = tmp_path / "src"
    make_tree(src, [4, 4, 4], ext="jpg")
    good = (src / "c1" / "000.jpg").read_bytes()
    (src / "c1" / "001.jpg").write_bytes(good[: len(good) // 2])      # truncated
    (src / "c1" / "002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "c2" / "003.jpg").write_bytes(b"")                           # empty
    s = convert(src, tmp_path / "out", shards=2, workers=2, progress=False)
    bad = {"c1/001.jpg": 5, "c1/002.jpg": 6, "c2/003.jpg": 11}
    assert sorted(s["skipped"]) == sorted(bad) and s["images"] == 9

    skipped = M.read_skipped(tmp_path / "out").to_pylist()
    assert {r["path"]: r["id"] for r in skipped} == bad
    assert all(r["reason"] for r in skipped)
    man = M.read_manifest(tmp_path / "out")
    assert man.ids.tolist() == [i for i in range(12) if i not in bad.values()]
    for i in range(2):
        ids, _, images = beton_rows(man.shard_path(i))
        for sid, img in zip(ids, images):
            if sid >= 0:
                assert id_of(img) == sid
    # the skipped images are also named in the CLI summary
    assert main(["--src", str(src), "--out", str(tmp_path / "out"), "--shards", "2"]) == 0


def test_resume_keeps_finished_shards(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, [10, 10, 10])
    first = convert(src, out, shards=3, workers=1, progress=False)
    before = pq.read_table(out / M.MANIFEST)
    shard = [out / M.shard_name(i) for i in range(3)]
    kept_stat = shard[0].stat()

    # an interrupted run: shard 0 finished, shard 1 damaged, shard 2 still .partial, no manifest
    (out / M.MANIFEST).unlink()
    (out / M.SKIPPED).unlink()
    shard[1].write_bytes(shard[1].read_bytes()[:5000])
    os.replace(shard[2], shard[2].with_name(shard[2].name + ".partial"))
    time.sleep(0.01)

    again = convert(src, out, shards=3, workers=1, progress=False)
    assert (again["kept_shards"], again["written_shards"]) == ([0], [1, 2])
    st = shard[0].stat()
    assert (st.st_ino, st.st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns)
    assert pq.read_table(out / M.MANIFEST).equals(before)
    assert again["images"] == first["images"] == 30
    assert not list(out.glob("*.partial"))

    # a finished conversion run again: nothing rewritten
    assert main(["--src", str(src), "--out", str(out), "--shards", "3", "--workers", "1"]) == 0
    assert "3 kept, 0 written" in capsys.readouterr().out


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", "has no class directories"),
    ("class_without_images", "class directory"),
    ("unwritable_out", "cannot write to --out"),
    ("other_options", "different options (max_resolution)"),
    ("foreign_out", "is not empty and holds no conversion"),
    ("bad_value", "--shards must be >= 1"),
    ("bad_cpus", "--cpus-per-shard must be >= 1"),
    ("workers_on_ray", "--workers is for converting in this process"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, case, message):
    src, out = tmp_path / "src", tmp_path / "out"
    args = ["--src", str(src), "--out", str(out), "--workers", "1"]
    if case == "empty":
        src.mkdir()
    elif case == "class_without_images":
        make_tree(src, [2])
        (src / "c9").mkdir()
        (src / "c9" / "readme.txt").write_text("no images here")
    elif case == "unwritable_out":
        make_tree(src, [2])
        (tmp_path / "file").write_text("")
        args[3] = str(tmp_path / "file" / "out")
    elif case == "other_options":
        make_tree(src, [2])
        assert main(args) == 0
        capsys.readouterr()
        args += ["--max-resolution", "128"]
    elif case == "foreign_out":
        make_tree(src, [2])
        out.mkdir()
        (out / "something.txt").write_text("")
    elif case == "bad_value":
        make_tree(src, [2])
        args += ["--shards", "0"]
    elif case == "bad_cpus":
        make_tree(src, [2])
        args += ["--cpus-per-shard", "0"]
    elif case == "workers_on_ray":
        make_tree(src, [2])
        args += ["--address", "auto"]
    assert main(args) == 2
    assert message in _error_line(capsys)
    if case == "other_options":
        assert main(args + ["--overwrite"]) == 0
        assert M.read_metadata(out)["options"]["max_resolution"] == 128


def test_cli_usage_error_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "data_prep.convert", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--src" in p.stderr and "Traceback" not in p.stderr


def test_demo_end_to_end(tmp_path):
    from data_prep.demo import build_demo
    from moco_ray.data import dataset_info

    paths = build_demo(tmp_path / "digits", "digits", size=16)
    train, val = dataset_info(paths["train"]), dataset_info(paths["val"])
    assert train["n"] + val["n"] == 1797 and abs(val["n"] - 0.2 * 1797) < 2
    assert train["classes"] == val["classes"] == [str(d) for d in range(10)] == paths["classes"]
    assert Path(paths["train"]).is_absolute()
    labels = M.read_manifest(paths["val"]).labels
    assert np.bincount(labels, minlength=10).min() >= 30          # stratified: every digit held out
    _, _, images = beton_rows(M.read_manifest(paths["train"]).shard_path(0))
    assert images[0].shape == (16, 16, 3) and images[0].std() > 10  # a digit, not a blank

    t = time.perf_counter()
    assert build_demo(tmp_path / "digits", "digits", size=16) == paths
    assert time.perf_counter() - t < 1.0


def test_glyph_scenes_split_by_face_and_show_only_their_glyph():
    """The default embedded dataset: the train faces and the val faces share no face, every digit of
    every face has SCENES_PER_GLYPH[split] scenes, each white on black, never blank, and its ink
    inside the evaluation's center crop."""
    from data_prep.demo import FACES, SCENES_PER_GLYPH, split_images

    assert not set(FACES[0]) & set(FACES[1])
    splits = split_images("glyphs", 32, 0.2, 0)
    for (images, labels), faces, per in zip(splits.values(), FACES, SCENES_PER_GLYPH.values()):
        assert images.shape == (len(faces) * 10 * per, 32, 32, 3)
        assert np.array_equal(np.bincount(labels), [len(faces) * per] * 10)
        assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
        assert images.reshape(len(images), -1).max(1).min() > 128           # never blank
        assert images[:, :2].max() == images[:, -2:].max() == 0             # nothing in the cropped margin
        assert images[:, :, :2].max() == images[:, :, -2:].max() == 0
    assert len(splits["train"][1]) >= 5000


def test_cluttered_scenes_split_by_scan_and_drawn_per_rendering():
    """The cluttered embedded dataset: every scan of a split rendered RENDERINGS[split] times, no scan
    in both splits, and nothing but the digit shared by the renderings of one scan."""
    from data_prep.demo import RENDERINGS, scans, split_images

    splits = split_images("cluttered", 32, 0.2, 0)
    digits = split_images("digits", 32, 0.2, 0)      # the same stratified split of the scans
    for split, (images, labels) in splits.items():
        assert images.shape == (len(digits[split][1]) * RENDERINGS[split], 32, 32, 3)
        assert np.array_equal(labels, np.repeat(digits[split][1], RENDERINGS[split]))
    assert len(splits["train"][1]) >= 5000
    assert sum(len(labels) // RENDERINGS[split] for split, (_, labels) in splits.items()) == len(scans()[1])
    images = splits["train"][0].astype(float)
    corners = images[:, :2, :2].mean(axis=(1, 2))                 # ~ the background colour
    twins = corners.reshape(-1, RENDERINGS["train"], 3)           # the renderings of one scan
    assert np.abs(twins[:, 0] - twins[:, 1]).mean() > 40          # drawn independently per rendering
    assert images.std(axis=(1, 2, 3)).min() > 5                   # never blank
