"""Checkpoint save/verify/fallback and export, outside Ray: the same code the workers run."""
import os
import shutil

import pytest
import torch
import torchvision

from moco_ray import checkpoint, export
from moco_ray.model import build_encoder
from moco_ray.queue import KeyQueue


def write_checkpoint(path, arch, step, K=4096, dim=128, world_size=2):
    encoder = build_encoder(arch, dim, mlp=True, small_stem=False)
    state = {"encoder_q": encoder.state_dict(), "encoder_k": encoder.state_dict(), "optimizer": {},
             "progress": {"step": step}, "config": {"arch": arch, "small_stem": False}}
    path.mkdir(parents=True)
    parts = [checkpoint.write_part(path, r, state, KeyQueue(K, dim, r, world_size).state_dict())
             for r in range(world_size)]
    checkpoint.write_manifest(path, parts, {"step": step})
    return path


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_into_torchvision(tmp_path, arch):
    ckpt = write_checkpoint(tmp_path / "checkpoint_000000010", arch, 10)
    out = tmp_path / "encoder.pt"
    assert export.main([str(ckpt), "--out", str(out)]) == 0
    model = getattr(torchvision.models, arch)()
    result = model.load_state_dict(torch.load(out), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


def test_corrupt_or_partial_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    old = write_checkpoint(tmp_path / "checkpoint_000000010", "resnet18", 10)
    new = write_checkpoint(tmp_path / "checkpoint_000000020", "resnet18", 20)
    assert checkpoint.find_valid(new) == new

    with open(new / checkpoint.queue_file(1), "r+b") as f:
        f.seek(100)
        f.write(b"garbage!")
    assert checkpoint.find_valid(new) == old
    assert "checkpoint_000000020" in caplog.text and "corrupt" in caplog.text

    shutil.copytree(old, tmp_path / "checkpoint_000000030")
    os.remove(tmp_path / "checkpoint_000000030" / checkpoint.MANIFEST)
    assert checkpoint.find_valid(tmp_path / "checkpoint_000000030") == old

    os.remove(old / checkpoint.queue_file(0))
    assert checkpoint.find_valid(tmp_path / "checkpoint_000000030") is None


def test_load_reshards_the_queue(tmp_path):
    ckpt = write_checkpoint(tmp_path / "checkpoint_000000010", "resnet18", 10, K=1000, world_size=2)
    shards = [checkpoint.load(ckpt, r, 3, K=1000)[1] for r in range(3)]
    assert [len(s["keys"]) for s in shards] == [334, 333, 333]


def test_export_of_a_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
