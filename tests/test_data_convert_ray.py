"""data_prep.convert with every shard a Ray task, on the shared local Ray instance: the same output
as the in-process path, resume, and a shard that fails twice."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest_data import beton_rows, id_of, make_tree
from data_prep import manifest as M
from data_prep.convert import ShardError, convert, main

SHARDS = 3


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    make_tree(src, [7, 6, 8], ext="jpg")
    (src / "c1" / "002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")   # skipped and listed
    return src


def address(ray):
    return ray.get_runtime_context().gcs_address


def listing(out):
    return sorted(p.name for p in out.iterdir())


def assert_same_conversion(a, b):
    assert listing(a) == listing(b)
    assert pq.read_table(a / M.MANIFEST).equals(pq.read_table(b / M.MANIFEST))
    assert pq.read_table(a / M.MANIFEST).schema.metadata == pq.read_table(b / M.MANIFEST).schema.metadata
    assert pq.read_table(a / M.SKIPPED).equals(pq.read_table(b / M.SKIPPED))
    for i in range(SHARDS):
        (ids_a, labels_a, images_a), (ids_b, labels_b, images_b) = (
            beton_rows(out / M.shard_name(i)) for out in (a, b))
        assert np.array_equal(ids_a, ids_b) and np.array_equal(labels_a, labels_b)
        assert all(np.array_equal(x, y) for x, y in zip(images_a, images_b, strict=True))


def test_ray_tasks_write_what_the_local_path_writes(ray_session, tree, tmp_path):
    local = convert(tree, tmp_path / "local", shards=SHARDS, workers=1, progress=False)
    on_ray = convert(tree, tmp_path / "ray", shards=SHARDS, address=address(ray_session),
                     cpus_per_shard=1, progress=False)
    assert on_ray["written_shards"] == local["written_shards"] == list(range(SHARDS))
    assert on_ray["skipped"] == local["skipped"] == ["c1/002.jpg"]
    assert on_ray["images"] == local["images"] == 20
    assert_same_conversion(tmp_path / "local", tmp_path / "ray")
    man = M.read_manifest(tmp_path / "ray")
    ids, _, images = beton_rows(man.shard_path(1))
    assert all(id_of(img) == sid for sid, img in zip(ids, images) if sid >= 0)

    # resumable: a lost shard is rewritten by one task, the others are kept
    out = tmp_path / "ray"
    kept = (out / M.shard_name(0)).stat()
    (out / M.shard_name(2)).unlink()
    (out / M.MANIFEST).unlink()
    again = convert(tree, out, shards=SHARDS, address=address(ray_session), progress=False)
    assert (again["kept_shards"], again["written_shards"]) == ([0, 1], [2])
    assert (out / M.shard_name(0)).stat().st_mtime_ns == kept.st_mtime_ns
    assert_same_conversion(tmp_path / "local", out)


def test_a_shard_failing_twice_fails_the_conversion_after_the_others(ray_session, tree, tmp_path, capsys):
    out = tmp_path / "out"
    convert(tree, out, shards=SHARDS, workers=1, progress=False)
    for i in range(SHARDS):
        (out / M.shard_name(i)).unlink()
    # shard 1 cannot be renamed into place: a non-empty directory holds its name
    (out / M.shard_name(1)).mkdir()
    (out / M.shard_name(1) / "x").write_text("")
    with pytest.raises(ShardError) as e:
        convert(tree, out, shards=SHARDS, address=address(ray_session), progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith("shard 1 (")
    assert "after 2 attempts" in message and str(out / M.shard_name(1)) in message
    assert "c1/000.jpg" in message                       # its first image (shards of 7)
    for i in (0, 2):                                     # the others were finished
        assert (out / M.shard_name(i)).is_file()
    assert not (out / M.MANIFEST).exists()

    # the CLI: one line, exit 1; once the obstacle is gone, the rerun keeps shards 0 and 2
    args = ["--src", str(tree), "--out", str(out), "--shards", str(SHARDS), "--address", address(ray_session)]
    assert main(args) == 1
    err = capsys.readouterr().err       # the progress bar, then the error on a line of its own
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("python -m data_prep.convert: error: shard 1 (")
    os.remove(out / M.shard_name(1) / "x")
    os.rmdir(out / M.shard_name(1))
    assert main(args) == 0
    assert "2 kept, 1 written" in capsys.readouterr().out
