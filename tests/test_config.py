import dataclasses

import pytest

from moco_ray import config as C
from moco_ray.launch import parse_workers
from moco_ray.train import main


def test_presets_follow_the_papers():
    v1, v2 = C.preset("moco-v1"), C.preset("moco-v2")
    assert (v1.K, v1.m, v1.dim, v1.T, v1.mlp, v1.aug, v1.schedule) == (65536, 0.999, 128, 0.07, False, "v1", "step")
    assert (v2.T, v2.mlp, v2.aug, v2.schedule) == (0.2, True, "v2", "cosine")
    assert (v2.lr, v2.momentum, v2.weight_decay, v2.epochs, v2.batch_size) == (0.03, 0.9, 1e-4, 200, 256)
    assert not v1.head_bn and not v2.head_bn and v1.crop_min == v2.crop_min == 0.2  # the paper's heads and crops
    assert C.preset("demo").arch == "resnet18"


def test_set_coerces_types():
    cfg = C.apply_overrides(C.preset("moco-v2"), ["T=0.1", "K=1024", "mlp=false", "lr_steps=3,5", "arch=resnet18"])
    assert (cfg.T, cfg.K, cfg.mlp, cfg.lr_steps, cfg.arch) == (0.1, 1024, False, (3, 5), "resnet18")


@pytest.mark.parametrize("sets, message", [
    (["nope=1"], "unknown config key 'nope'"),
    (["K=abc"], "K: expected int"),
    (["T=0"], "temperature must be > 0"),
    (["m=1.0"], "momentum must be in [0, 1)"),
    (["K=64", "batch_size=128"], "smaller than the global batch"),
    (["mlp=false"], "head_bn=true needs the MLP head"),
    (["batch_size=1"], "smaller than the 2 workers"),
    (["bn=magic"], "bn='magic'"),
    (["data=/does/not/exist"], "no such dataset"),
    (["checkpoint_every_steps=0"], "checkpoint_every_steps=0 and checkpoint_every_s=0: no checkpoint before the end"),
    (["checkpoint_every_s=-60"], "checkpoint_every_s=-60.0 must be >= 0"),
    (["optimizer=rmsprop"], "optimizer='rmsprop': choose one of sgd, lars, adamw"),
    (["method=v4"], "method='v4'"),
    (["m_schedule=linear"], "m_schedule='linear'"),
    (["warmup_epochs=40"], "warmup_epochs=40 must be fewer than epochs=40"),   # the demo trains 40 epochs
    (["width=0"], "width=0"),
    (["arch=resnet7"], "arch='resnet7': use a torchvision ResNet"),
    (["arch=timm:no_such_net", "method=v3", "bn=split"], "timm 1.0.31 has no model 'no_such_net'"),
    (["arch=vit_b_16"], "method=moco trains torchvision ResNets; use method=v3"),
    (["stop_grad_conv1=true"], "resnet18 has none"),
    (["method=v2plus", "max_batch_per_worker=16"], "micro-batches are built for method=moco"),
])
def test_bad_values_are_one_line_errors(sets, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        C.validate(C.load("demo", sets), max_workers=2)


def test_plain_config_is_safe_at_imagenet_scale():
    """No preset: kNN on a 100-per-class bank every 10 epochs (a full 1.28M bank every epoch is
    hours of a 200-epoch run), checkpoints every 10 minutes rather than by a count of steps."""
    cfg = C.validate(C.Config())
    assert (cfg.knn_every, cfg.knn_bank_per_class) == (10, 100)
    assert (cfg.checkpoint_every_s, cfg.checkpoint_every_steps) == (600, 0)
    assert C.validate(C.LinclsConfig(pretrained="x")).checkpoint_every_s == 600
    # the demos' runs checkpoint by steps alone: the tests that kill and resume them replay the same steps
    assert (C.preset("demo").checkpoint_every_s, C.preset("demo").checkpoint_every_steps) == (0, 500)
    assert (C.preset("demo", C.LinclsConfig).checkpoint_every_s,
            C.preset("demo", C.LinclsConfig).checkpoint_every_steps) == (0, 100)


def test_yaml_config_round_trip(tmp_path):
    cfg = C.apply_overrides(C.preset("moco-v2"), {"T": 0.07, "m": 0.99})
    C.dump(cfg, tmp_path / "best.yaml")
    assert C.load(str(tmp_path / "best.yaml")) == cfg
    (tmp_path / "partial.yaml").write_text("preset: moco-v1\nK: 4096\n")
    assert C.load(str(tmp_path / "partial.yaml")) == C.apply_overrides(C.preset("moco-v1"), {"K": 4096})


@pytest.mark.parametrize("text, expected", [("2", 2), ("1:3", (1, 3)), ("2:2", 2)])
def test_parse_workers(text, expected):
    assert parse_workers(text) == expected


@pytest.mark.parametrize("argv, message", [
    (["--set", "T=-1"], "temperature"),
    (["--num-workers", "3:1"], "MIN (3) is larger than MAX (1)"),
    (["--num-workers", "0:2"], "MIN must be >= 1"),
    (["--num-workers", "1:4", "--set", "batch_size=2", "--set", "K=64"], "smaller than the 4 workers"),
    (["--config", "nope"], "neither a preset"),
    (["--set", "data=/no/such/dir"], "no such dataset"),
])
def test_cli_rejects_bad_input_before_ray_starts(argv, message, capsys, tmp_path):
    import ray

    assert main(argv + ["--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not ray.is_initialized()


@pytest.mark.parametrize("limit, workers", [(2, (2, 2)), (2, (3, 4)), (1, (2, 2))])
def test_a_micro_batch_limit_that_leaves_one_image_is_refused(limit, workers):
    # demo: B=64; with 3 workers b=21 splits into micro-batches of 2 and one of 1; with 2 workers
    # b=32 splits evenly, but a limit of 1 never leaves two
    cfg = C.load("demo", [f"max_batch_per_worker={limit}"])
    if workers == (2, 2) and limit == 2:
        C.validate(cfg, max_workers=2)
        return
    with pytest.raises(C.ConfigError, match=f"max_batch_per_worker={limit}: with .* workers .* one image"):
        C.validate(cfg, max_workers=workers[1], min_workers=workers[0])


def test_the_micro_batch_check_covers_the_smallest_world_size():
    # B=4096 on 4:16 workers: b=1024 after a shrink to 4. A limit of 256 takes it in 4 micro-batches.
    cfg = C.apply_overrides(C.preset("moco-v2"), {"max_batch_per_worker": 256})
    assert C.validate(cfg, max_workers=16, min_workers=4) is cfg
    # demo B=64, limit 2: 4 workers (b=16) fit; a shrink to 3 (b=21) would leave a micro-batch of one
    demo = C.load("demo", ["max_batch_per_worker=2"])
    assert C.validate(demo, max_workers=4) is demo
    with pytest.raises(C.ConfigError, match="with 3 workers the local batch of 21"):
        C.validate(demo, max_workers=4, min_workers=2)


def test_cli_passes_the_smallest_world_size_to_the_micro_batch_check(capsys, tmp_path):
    assert main(["--num-workers", "3:4", "--set", "max_batch_per_worker=2",
                 "--storage-path", str(tmp_path)]) == 2
    assert "with 3 workers the local batch of 21" in capsys.readouterr().err


def test_v3_lincls_presets_follow_main_lincls():
    for name, lr in (("moco-v3", 0.1), ("moco-v3-vit", 3.0)):
        cfg = C.preset(name, C.LinclsConfig)
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.crop_min) == \
            (90, 1024, lr, 0.0, "cosine", 0.08)


def test_v3_presets_follow_config_md():
    r50, vit_s, vit_b = C.preset("moco-v3-resnet50"), C.preset("moco-v3-vit-small"), C.preset("moco-v3-vit-base")
    assert (r50.method, r50.optimizer, r50.lr, r50.weight_decay, r50.T, r50.m, r50.m_schedule) == \
        ("v3", "lars", 0.6, 1e-6, 1.0, 0.99, "cosine")
    assert (r50.dim, r50.mlp_dim, r50.batch_size, r50.epochs, r50.warmup_epochs, r50.crop_min) == \
        (256, 4096, 4096, 100, 10, 0.2)
    for vit, arch in ((vit_s, "vit_small"), (vit_b, "vit_base")):
        assert (vit.arch, vit.optimizer, vit.lr, vit.weight_decay, vit.T, vit.epochs, vit.warmup_epochs) == \
            (arch, "adamw", 1.5e-4, 0.1, 0.2, 300, 40)
        assert vit.stop_grad_conv1 and vit.m_schedule == "cosine" and vit.bn == "sync"
        assert (vit.aug, vit.crop_min) == ("v3", 0.08)
    assert r50.aug == "v3"                    # main_moco.py's augmentation1 / augmentation2 pair
    v2plus = C.preset("moco-v2plus")
    assert v2plus.method == "v2plus" and dataclasses.replace(v2plus, method="moco") == C.preset("moco-v2")
    for name in ("moco-v1", "moco-v2", "demo"):   # the v1/v2 presets keep their behaviour
        cfg = C.preset(name)
        assert (cfg.method, cfg.optimizer, cfg.m_schedule, cfg.warmup_epochs) == ("moco", "sgd", "constant", 0)
    demo_v3 = C.validate(C.preset("demo-v3"), max_workers=2)
    assert (demo_v3.method, demo_v3.bn, demo_v3.arch, demo_v3.res, demo_v3.aug) == ("v3", "split", "resnet18", 16, "v2")
    assert C.validate(C.load("demo-v3", ["bn=shuffle"]), max_workers=2).bn == "shuffle"   # v3's shuffled keys
    C.validate(C.apply_overrides(C.preset("moco-v3-vit-small"), {"arch": "timm:convnext_atto",
                                                                  "stop_grad_conv1": False}))


def test_channels_last_auto_is_off_for_vits():
    assert C.for_device(C.preset("moco-v3-vit-base"), cuda=True).channels_last == "false"
    assert C.for_device(C.preset("moco-v3-resnet50"), cuda=True).channels_last == "true"
    assert C.for_device(C.apply_overrides(C.preset("moco-v3-vit-base"), {"channels_last": "true"}),
                        cuda=True).channels_last == "true"
