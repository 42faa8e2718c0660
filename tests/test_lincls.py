"""Linear evaluation: the classifier and its checks without Ray; the protocol end to end on a real
local Ray (2 gloo workers, the digits as FFCV files), resumed from its checkpoint."""
from pathlib import Path

import pytest
import torch

from moco_ray import checkpoint, config as C
from moco_ray.lincls import build_classifier, changed_tensors, correct_counts, main
from moco_ray.model import build_encoder
from moco_ray.progress import read_metrics
from moco_ray.queue import KeyQueue


def test_only_the_new_fc_is_trained_and_it_starts_as_the_paper():
    torch.manual_seed(0)
    net = build_classifier("resnet50", small_stem=False, num_classes=1000)
    trained = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trained == ["fc.weight", "fc.bias"]
    assert net.fc.weight.shape == (1000, 2048) and torch.all(net.fc.bias == 0)
    assert abs(net.fc.weight.std().item() - 0.01) < 5e-4 and abs(net.fc.weight.mean().item()) < 5e-4


def test_sanity_check_sees_a_changed_weight_or_bn_statistic():
    backbone = build_encoder("resnet18", 10, mlp=False, small_stem=True)
    backbone.fc = torch.nn.Identity()
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert changed_tensors(backbone, reference) == []
    backbone.train()
    backbone(torch.randn(4, 3, 16, 16))   # train mode: BN running statistics move
    changed = changed_tensors(backbone, reference)
    assert "bn1.running_mean" in changed and "layer4.1.bn2.num_batches_tracked" in changed
    assert not any(name.endswith("weight") for name in changed)
    backbone.load_state_dict(reference)
    with torch.no_grad():
        backbone.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-6
    assert changed_tensors(backbone, reference) == ["layer2.0.conv1.weight"]


def test_top1_and_top5_counts():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 5, 1, 1, 1, 1]])
    labels = torch.tensor([0, 0, 1])
    assert correct_counts(logits, labels) == [2, 2]            # row 1: label 0 is the last of six
    assert correct_counts(logits[:, :3], torch.tensor([2, 0, 2]), (1, 5)) == [0, 3]   # top-5 of 3 classes


def test_lincls_presets_are_the_papers_protocol():
    cfg = C.preset("imagenet", C.LinclsConfig)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.lr_steps, cfg.schedule) == \
        (30.0, 0.9, 0.0, 100, (60, 80), "step")
    assert (cfg.batch_size, cfg.res, cfg.crop_min) == (256, 224, 0.08)
    demo = C.preset("demo", C.LinclsConfig)
    assert demo.random_baseline and demo.pixel_baseline and demo.lr == 30.0 and demo.crop_min == 0.08


@pytest.mark.parametrize("argv, message", [
    ([], "--pretrained is required"),
    (["--pretrained", "/no/such/checkpoint"], "no such checkpoint or run directory"),
    (["--pretrained", "x", "--set", "lr=0"], "lr=0.0 must be > 0"),
    (["--pretrained", "x", "--set", "K=10"], "unknown config key 'K'"),
    (["--pretrained", "x", "--config", "moco-v2"], "neither a preset (imagenet, moco-v3, moco-v3-vit, demo)"),
    (["--pretrained", "x", "--num-workers", "2:1"], "MIN (2) is larger than MAX (1)"),
])
def test_cli_rejects_bad_input_before_ray_starts(argv, message, capsys, tmp_path):
    import ray

    before = ray.is_initialized()   # an earlier test of the session may have started it
    assert main(argv + ["--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert ray.is_initialized() == before


def pretraining_checkpoint(run_dir, digits, seed=0):
    """A pretraining run directory with one valid checkpoint, written by the real checkpoint module as
    moco_ray.train writes it, of a resnet18 small-stem encoder: random weights, and BatchNorm
    statistics of the digits (as any trained encoder has), so that its frozen features are usable."""
    from moco_ray.data import make_eval_loader

    torch.manual_seed(seed)
    encoder = build_encoder("resnet18", 128, mlp=True, small_stem=True)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # the cumulative average over the batches below
    with torch.no_grad():
        for images, _, _ in make_eval_loader(digits["train"], batch_size=256, rank=0, world_size=1, res=16,
                                             num_workers=1):
            encoder(images)
    state = {"encoder_q": encoder.state_dict(), "encoder_k": encoder.state_dict(), "optimizer": {},
             "progress": {"step": 1, "epoch": 1}, "config": {"arch": "resnet18", "small_stem": True}}
    path = run_dir / checkpoint.dir_name(1, 1)
    path.mkdir(parents=True)
    parts = [checkpoint.write_part(path, r, state, KeyQueue(64, 128, r, 2).state_dict()) for r in range(2)]
    checkpoint.write_manifest(path, parts, {"step": 1})
    return run_dir


@pytest.mark.slow
def test_linear_protocol_end_to_end_and_resume(ray_session, digits, tmp_path, capsys):
    # crop_min=0.5 (the demo pretraining's crops): the features of random weights are not invariant
    # to the protocol's 8% crops of 8x8 digits. lr=0.1: the paper's lr=30 suits MoCo's features; on
    # the larger features of random weights it oscillates, and two epochs ended anywhere in 10-30 %
    # (seeds 0, 1). At 0.1 they end at 45-50 %.
    pretrained = pretraining_checkpoint(tmp_path / "pre", digits)
    args = ["--pretrained", str(pretrained), "--storage-path", str(tmp_path), "--name", "lin",
            "--set", f"data={digits['train']}", "--set", f"val_data={digits['val']}", "--set", "res=16",
            "--set", "batch_size=64", "--set", "loader_workers=1", "--set", "metrics_port=0",
            "--set", "eval_every=1", "--set", "report_every=5", "--set", "checkpoint_every_steps=1000",
            "--set", "random_baseline=false", "--set", "crop_min=0.5", "--set", "lr=0.1"]
    assert main(args + ["--set", "epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "linear top-1" in out and "sanity check after epochs [1, 2]" in out
    rows = read_metrics(tmp_path / "lin")
    end = rows[-1]
    assert end["event"] == "end" and end["epoch"] == 2 and end["sanity_checked_epochs"] == [1, 2]
    assert end["lincls_top1"] > 25, end   # 10 classes, 360 images: 10 +- 1.6 % by chance
    assert end["lincls_top5"] >= end["lincls_top1"] and end["lincls_best_top1"] >= end["lincls_top1"]
    evals = [r for r in rows if r.get("event") == "epoch"]
    assert evals and evals[0]["lincls_top1"] is not None   # top-1 after epoch 1 (eval_every=1)
    checkpoint.verify(end["checkpoint"])
    saved = torch.load(Path(end["checkpoint"]) / checkpoint.STATE, weights_only=False)
    assert saved["model"]["fc.weight"].shape == (10, 512)

    # --resume: the next epoch from the last checkpoint, the backbone still the pretrained one
    assert main(args + ["--resume", "--set", "epochs=3", "--allow-change", "epochs"]) == 0
    rows = read_metrics(tmp_path / "lin")
    start = [r for r in rows if r.get("event") == "start"][-1]
    assert start["resumed_from"] == end["checkpoint"] and start["step"] == end["step"]
    assert rows[-1]["epoch"] == 3 and rows[-1]["step"] == end["step"] * 3 // 2
    assert rows[-1]["sanity_checked_epochs"] == [1, 2, 3]


def test_report_of_a_linear_evaluation_plots_top1_and_names_the_best(tmp_path):
    import json

    from moco_ray import report

    run = tmp_path / "lin"
    run.mkdir()
    records = [{"event": "start", "step": 0, "world_size": 2, "total_steps": 40, "time": 0.0,
                "config": {"eval_every": 2, "epochs": 4}}]
    for step in range(5, 41, 5):
        epoch = step // 10
        top1 = {1: None, 2: 70.0, 3: 70.0, 4: 65.0}.get(epoch)   # evaluated after epochs 2 and 4
        event = "end" if step == 40 else "epoch" if step % 10 == 0 else "step"
        records.append({"event": event, "step": step, "epoch": epoch, "steps_per_epoch": 10, "total_steps": 40,
                        "loss": 1.0, "lr": 7.5, "images_per_s": 100.0, "world_size": 2, "batch_effective": 64,
                        "data_wait_share": 0.1, "lincls_top1": top1, "lincls_top5": top1 and top1 + 20,
                        "time": float(step)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert report.main([str(run)]) == 0
    out = run / "report"
    assert (out / "lincls_top1.png").stat().st_size > 1000 and not (out / "knn_top1.png").exists()
    text = (out / "summary.md").read_text()
    assert "| linear top-1 | 65.00 % at epoch 4 (top-5 85.00 %), best 70.00 % at epoch 2 |" in text
    assert "kNN top-1" not in text and "lincls_top1.png" in text


def test_pixel_baseline_trains_the_same_protocol_on_flattened_pixels(ray_session, digits, tmp_path, capsys):
    """pixel_baseline: after the run, run NAME-pixels trains the same linear layer on the 3 x res x res
    input pixels, and the summary prints its top-1 beside the encoder's."""
    pretrained = pretraining_checkpoint(tmp_path / "pre", digits)
    args = ["--pretrained", str(pretrained), "--storage-path", str(tmp_path), "--name", "lin",
            "--set", f"data={digits['train']}", "--set", f"val_data={digits['val']}", "--set", "res=16",
            "--set", "batch_size=64", "--set", "loader_workers=1", "--set", "metrics_port=0",
            "--set", "report_every=5", "--set", "checkpoint_every_steps=1000", "--set", "random_baseline=false",
            "--set", "pixel_baseline=true", "--set", "crop_min=0.5", "--set", "lr=0.1", "--set", "epochs=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "  lin\n" in out and "  lin-pixels\n" in out
    end = read_metrics(tmp_path / "lin-pixels")[-1]
    assert end["event"] == "end" and end["lincls_top1"] > 25, end   # the plain digits: pixels separate them
    saved = torch.load(Path(end["checkpoint"]) / checkpoint.STATE, weights_only=False)
    assert saved["arch"] == "pixels" and saved["model"]["fc.weight"].shape == (10, 3 * 16 * 16)
    assert set(saved["model"]) == {"fc.weight", "fc.bias"}   # nothing but the linear layer
