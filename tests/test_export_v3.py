"""Export and linear-evaluation loading of checkpoints of every method and backbone (v2+, v3, a timm
ViT), outside Ray: the checkpoint written by the functions the workers call (worker.build_model,
train_state.moco_state, checkpoint.save), tiny models at 16-32 px."""
import pytest
import torch
import torchvision

from moco_ray import checkpoint, config as C, export, precision, train_state
from moco_ray.lincls import build_classifier, frozen_part, random_init_export
from moco_ray.worker import backbone_of, build_model

TIMM_VIT = "timm:vit_tiny_patch16_224"


def pretrain_checkpoint(path, steps=2, **overrides):
    """A rank-0 checkpoint of the demo-v3 preset (tiny sizes, overrides applied; a ResNet at the
    stock width and stem, so that its exports load into the stock models) after `steps` SGD steps
    on random images (v3 only: the momentum encoder then differs from the query's base); returns
    (checkpoint directory, model)."""
    cfg = C.for_device(C.apply_overrides(C.preset("demo-v3"), {"small_stem": False, "width": 64, **overrides}),
                       cuda=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps if cfg.method == "v3" else 0):
        x1, x2 = torch.randn(2, 8, 3, cfg.res, cfg.res)
        loss, _ = model(x1, x2, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {**train_state.moco_state(model, optimizer, precision.grad_scaler("fp32", "cpu")),
             "progress": {"step": steps, "epoch": 1}, "config": cfg.to_dict()}
    path.mkdir()
    queue = model.queue.state_dict() if model.queue is not None else None
    checkpoint.save(path, 0, 1, state, queue, {"step": steps})
    return path, model.eval()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stripped(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def authors_keys(checkpoint_file, linear_keyword):
    """moco-v3's main_lincls.py (linear_keyword fc for a ResNet, head for a ViT) and
    convert_to_deit.py (head): keep module.base_encoder.* except the head, strip the prefix."""
    state_dict = torch.load(checkpoint_file, map_location="cpu")["state_dict"]
    for k in list(state_dict.keys()):
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.%s" % linear_keyword):
            state_dict[k[len("module.base_encoder."):]] = state_dict[k]
        del state_dict[k]
    return state_dict


@pytest.mark.parametrize("method", ["moco", "v2plus", "v3"])
def test_any_method_exports_its_backbone_to_torchvision(tmp_path, method):
    ckpt, model = pretrain_checkpoint(tmp_path / "checkpoint_000000002", method=method)
    out = tmp_path / "encoder.pt"
    assert export.main([str(ckpt), "--out", str(out)]) == 0
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict(torch.load(out), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    base = getattr(model, "base_encoder", model.encoder_q)
    assert torch.equal(resnet.layer4[1].conv2.weight, base.layer4[1].conv2.weight)


def test_v3_resnet_moco_v3_format_is_what_the_authors_scripts_read(tmp_path):
    ckpt, model = pretrain_checkpoint(tmp_path / "checkpoint_000000002")
    out = tmp_path / "moco_v3.pth.tar"
    assert export.main([str(ckpt), "--out", str(out), "--format", "moco-v3"]) == 0
    saved = torch.load(out)
    assert saved["arch"] == "resnet18" and saved["epoch"] == 1
    state = saved["state_dict"]
    assert same(stripped(state, "module.base_encoder."), model.base_encoder.state_dict())   # projector as fc
    assert same(stripped(state, "module.momentum_encoder."), model.encoder_k.state_dict())
    assert same(stripped(state, "module.predictor."), model.encoder_q.predictor.state_dict())
    assert not torch.equal(state["module.base_encoder.conv1.weight"], state["module.momentum_encoder.conv1.weight"])
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict(authors_keys(out, "fc"), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys


def test_v3_timm_vit_exports_to_timm_and_moco_v3(tmp_path, capsys):
    import timm

    ckpt, model = pretrain_checkpoint(tmp_path / "checkpoint_000000002", arch=TIMM_VIT, res=32, mlp_dim=64)
    base_backbone = model.base_encoder.backbone.state_dict()
    for fmt, keys in [("timm", lambda f: torch.load(f)), ("moco-v3", lambda f: authors_keys(f, "head"))]:
        out = tmp_path / f"{fmt}.pt"
        assert export.main([str(ckpt), "--out", str(out), "--format", fmt]) == 0
        assert "img_size=32" in capsys.readouterr().out or fmt == "moco-v3"
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
        result = vit.load_state_dict(keys(out), strict=False)
        assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys, fmt
        assert same({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}, base_backbone)
    state = torch.load(tmp_path / "moco-v3.pt")["state_dict"]
    assert same(stripped(state, "module.base_encoder.head."), model.base_encoder.fc.state_dict())   # projector
    assert same(stripped(state, "module.predictor."), model.encoder_q.predictor.state_dict())


@pytest.mark.parametrize("fmt", ["torchvision", "moco", "detectron2"])
def test_resnet_formats_refuse_a_timm_backbone_in_one_line(tmp_path, capsys, fmt):
    ckpt, _ = pretrain_checkpoint(tmp_path / "checkpoint_000000000", steps=0, arch=TIMM_VIT, res=32, mlp_dim=64)
    assert export.main([str(ckpt), "--out", str(tmp_path / "x.pt"), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert f"--format {fmt} cannot hold {TIMM_VIT}" in err and err.count("\n") == 1


def test_timm_format_refuses_a_torchvision_resnet(tmp_path, capsys):
    ckpt, _ = pretrain_checkpoint(tmp_path / "checkpoint_000000000", steps=0)
    assert export.main([str(ckpt), "--out", str(tmp_path / "x.pt"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert "--format timm cannot hold resnet18" in err and "use --format torchvision" in err


@pytest.mark.parametrize("arch, res", [("resnet18", 16), (TIMM_VIT, 32)])
def test_linear_evaluation_loads_the_base_backbone_of_a_v3_checkpoint(tmp_path, arch, res):
    ckpt, model = pretrain_checkpoint(tmp_path / "checkpoint_000000002", arch=arch, res=res, mlp_dim=64)
    out = tmp_path / "moco_v3.pt"
    assert export.main([str(ckpt), "--out", str(out), "--format", "moco-v3"]) == 0
    images = torch.randn(4, 3, res, res)
    with torch.no_grad(), backbone_of(model.base_encoder) as backbone:
        expected = backbone(images)
    for source in (ckpt, out):
        pretrained = export.load_pretrained(source)
        assert (pretrained.arch, pretrained.small_stem, pretrained.res) == (arch, False, res)
        assert pretrained.zero_init_residual   # v3 starts every ResNet block as the identity, in either file
        net = build_classifier(pretrained.arch, pretrained.small_stem, 10, pretrained.res).eval()
        with frozen_part(net) as frozen:
            frozen.load_state_dict(pretrained.backbone)   # strict: raises unless every key, nothing else
        assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
        with torch.no_grad(), backbone_of(net) as features:
            assert torch.equal(features(images), expected)


@pytest.mark.parametrize("arch, res, name", [("resnet18", 16, "layer1.0.conv1.weight"),
                                             (TIMM_VIT, 32, "blocks.0.attn.qkv.weight")])
def test_random_baseline_is_readable_with_its_arch_and_size(tmp_path, arch, res, name):
    ckpt, _ = pretrain_checkpoint(tmp_path / "checkpoint_000000000", steps=0, arch=arch, res=res, mlp_dim=64)
    random_init_export(tmp_path / "random_init.pt", ckpt, seed=1)   # the checkpoint: seed 0
    pretrained, random = export.load_pretrained(ckpt), export.load_pretrained(tmp_path / "random_init.pt")
    assert random.arch == arch and random.backbone.keys() == pretrained.backbone.keys()
    assert random.res == res or arch == "resnet18"   # a plain torchvision file: a ResNet pools any size
    assert not torch.equal(random.backbone[name], pretrained.backbone[name])


def test_a_timm_convnet_exports_to_timm_but_not_under_the_authors_head(tmp_path, capsys):
    """convnext's backbone keeps its pre-classifier norm under head.*, where moco-v3's layout puts
    the projector (and their scripts drop it): refused, the timm format holds it."""
    import timm

    ckpt, _ = pretrain_checkpoint(tmp_path / "checkpoint_000000000", steps=0, arch="timm:convnext_atto", res=32,
                                  mlp_dim=64)
    out = tmp_path / "timm.pt"
    assert export.main([str(ckpt), "--out", str(out), "--format", "timm"]) == 0
    result = timm.create_model("convnext_atto", pretrained=False, num_classes=10).load_state_dict(
        torch.load(out), strict=False)
    assert set(result.missing_keys) == {"head.fc.weight", "head.fc.bias"} and not result.unexpected_keys
    capsys.readouterr()
    assert export.main([str(ckpt), "--out", str(tmp_path / "v3.pt"), "--format", "moco-v3"]) == 2
    err = capsys.readouterr().err
    assert "backbone parameters under head.*" in err and err.count("\n") == 1


def test_lincls_refuses_a_vit_at_another_size_before_ray():
    from moco_ray.lincls import check_res

    check_res(export.Pretrained({}, "resnet18", True, 16), 224)   # a ResNet pools any size
    check_res(export.Pretrained({}, "vit_small", False, 32), 32)
    with pytest.raises(C.ConfigError, match="trained at 32 px; use --set res=32"):
        check_res(export.Pretrained({}, "vit_small", False, 32), 224)
