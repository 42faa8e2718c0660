"""Checkpoint save/verify/fallback and export, outside Ray: the same code the workers run."""
import os
import re
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


def authors_lincls_keys(checkpoint_file):
    """The key handling of the authors' main_lincls.py for --pretrained: keep module.encoder_q.*
    except the head, strip the prefix, then load_state_dict(strict=False) into a torchvision model."""
    state_dict = torch.load(checkpoint_file, map_location="cpu")["state_dict"]
    for k in list(state_dict.keys()):
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            state_dict[k[len("module.encoder_q."):]] = state_dict[k]
        del state_dict[k]
    return state_dict


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_moco_export_loads_through_the_authors_key_handling(tmp_path, arch):
    ckpt = write_checkpoint(tmp_path / "checkpoint_000000010", arch, 10)
    out = tmp_path / "moco.pth.tar"
    assert export.main([str(ckpt), "--out", str(out), "--format", "moco"]) == 0
    saved = torch.load(out)
    assert saved["arch"] == arch and "epoch" in saved
    assert any(k.startswith("module.encoder_q.fc.") for k in saved["state_dict"])   # the MLP head is there
    model = getattr(torchvision.models, arch)()
    result = model.load_state_dict(authors_lincls_keys(out), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    encoder = torch.load(ckpt / checkpoint.STATE, weights_only=False)["encoder_q"]
    assert torch.equal(model.layer4[1].conv1.weight, encoder["layer4.1.conv1.weight"])


def test_detectron2_export_has_the_backbone_under_detectron2_names(tmp_path):
    import pickle

    import numpy as np

    ckpt = write_checkpoint(tmp_path / "checkpoint_000000010", "resnet50", 10)
    out = tmp_path / "r50.pkl"
    assert export.main([str(ckpt), "--out", str(out), "--format", "detectron2"]) == 0
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "moco_ray" and obj["matching_heuristics"] is True
    model = obj["model"]
    backbone = {k: v for k, v in torchvision.models.resnet50().state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert len(model) == len(backbone) and all(isinstance(v, np.ndarray) for v in model.values())
    encoder = torch.load(ckpt / checkpoint.STATE, weights_only=False)["encoder_q"]
    for ours, theirs in [("conv1.weight", "stem.conv1.weight"), ("bn1.running_var", "stem.conv1.norm.running_var"),
                         ("layer1.0.conv1.weight", "res2.0.conv1.weight"),
                         ("layer1.0.bn3.bias", "res2.0.conv3.norm.bias"),
                         ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
                         ("layer2.0.downsample.1.running_mean", "res3.0.shortcut.norm.running_mean"),
                         ("layer4.2.bn2.weight", "res5.2.conv2.norm.weight")]:
        assert np.array_equal(model[theirs], encoder[ours].numpy()), theirs
    names = set(model)
    assert {export.detectron2_name(k) for k in backbone} == names
    assert not any("fc" in k for k in names)
    assert all(re.fullmatch(r"stem\.conv1(\.norm)?\.\w+|res[2-5]\.\d+\.(conv[1-3](\.norm)?|shortcut(\.norm)?)\.\w+", k)
               for k in names)


@pytest.mark.parametrize("fmt", ["torchvision", "moco"])
def test_load_backbone_reads_checkpoints_run_dirs_and_exports(tmp_path, fmt):
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoint_000000010-000", "resnet18", 10)
    newest = write_checkpoint(run / "checkpoint_000000020-000", "resnet18", 20)
    (run / "checkpoint_000000030-000").mkdir()   # a partial save: skipped
    expected, cfg = export.backbone_state_dict(newest)
    out = tmp_path / f"{fmt}.pt"
    assert export.main([str(run), "--out", str(out), "--format", fmt]) == 0
    for source in (run, newest, out):
        backbone, arch, small_stem = export.load_backbone(source)
        assert (arch, small_stem) == ("resnet18", False)
        assert backbone.keys() == expected.keys() and all(torch.equal(backbone[k], expected[k]) for k in expected)


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx"], "--format 'onnx': choose one of torchvision, moco, detectron2"),
    ([], "no such checkpoint or run directory"),
])
def test_export_bad_format_or_missing_checkpoint_is_one_line(tmp_path, capsys, argv, message):
    ckpt = tmp_path / "missing" if not argv else write_checkpoint(tmp_path / "checkpoint_000000010", "resnet18", 10)
    assert export.main([str(ckpt), "--out", str(tmp_path / "x.pt"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_run_directory_export_takes_the_newest_group_by_number(tmp_path):
    """Worker group 1000 saved step 10 after group 999 did: as strings "-1000" < "-999"."""
    run = tmp_path / "run"
    write_checkpoint(run / checkpoint.dir_name(10, 999), "resnet18", 10, K=64)
    newest = write_checkpoint(run / checkpoint.dir_name(10, 1000), "resnet18", 10, K=64)
    assert export.find_checkpoint(run) == newest
