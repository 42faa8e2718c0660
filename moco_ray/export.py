"""python -m moco_ray.export CKPT --out FILE --format torchvision|moco|detectron2|moco-v3|timm

The query encoder of a pretraining checkpoint of any method (v1, v2, v2+, v3: for v3 its base encoder,
backbone + projector, without the predictor), in the layout another ecosystem loads as it is:

    torchvision  the backbone as a torchvision state_dict: loads into torchvision.models.resnet50()
                 (or resnet18, ..., or vit_b_16(image_size=res)) with only the head (fc.* for a
                 ResNet, heads.head.* for a ViT) missing
    moco         the authors' v1/v2 checkpoint layout, {"state_dict": {"module.encoder_q.<key>": tensor},
                 "arch", "epoch"}, head included as module.encoder_q.fc.*: their main_lincls.py
                 --pretrained FILE and detection/convert-pretrain-to-detectron2.py read it unchanged (ResNets)
    detectron2   the pickle that a detectron2 R50-C4/FPN config loads with MODEL.WEIGHTS:
                 {"model": {name: numpy array}, "__author__": "moco_ray", "matching_heuristics": True},
                 backbone only, under detectron2's ResNet names (stem.conv1, stem.conv1.norm,
                 res2..res5, convN.norm, shortcut, shortcut.norm) (ResNets)
    moco-v3      the authors' v3 checkpoint layout (their builder.py's names), {"state_dict":
                 {"module.base_encoder.<key>", "module.momentum_encoder.<key>", "module.predictor.<key>"},
                 "arch", "epoch", "res", "small_stem"}, the projector as the base encoder's head
                 (fc.* of a ResNet, head.* of a timm model): their main_lincls.py --pretrained FILE and
                 convert_to_deit.py read it unchanged (ResNets, vit_small/vit_base and timm models)
    timm         the backbone as a timm state_dict: loads into timm.create_model(NAME, num_classes=N)
                 with only the classifier missing (timm:NAME, vit_small, vit_base; a ViT trained at
                 res != 224 needs img_size=res, and vit_small is moco-v3's, num_heads=12)

CKPT is a checkpoint directory (RUN_DIR/checkpoint_...) or a run directory (its newest valid
checkpoint). load_backbone() reads any of these back (and the torchvision/moco/moco-v3 files): it
is what `moco_ray.lincls --pretrained` uses.
"""
import argparse
import pickle
import re
import io
import sys
from typing import NamedTuple

import torch

from moco_ray import checkpoint, encoders, storage
from moco_ray.config import ConfigError

FORMATS = ("torchvision", "moco", "detectron2", "moco-v3", "timm")
MOCO_PREFIX = "module.encoder_q."
V3_PREFIX = "module.base_encoder."
# What each format holds, by the backbone family (moco_ray.encoders.kind)
FAMILIES = {"torchvision": ("resnet", "vit"), "moco": ("resnet",), "detectron2": ("resnet",),
            "moco-v3": ("resnet", "timm"), "timm": ("timm",)}
# The head of moco-v3's base encoder (builder.py) and of the classifier their main_lincls.py builds
V3_HEAD = {"resnet": "fc", "timm": "head", "vit": "heads.head"}


class ExportError(ValueError):
    """Bad input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# Reading a pretraining checkpoint
# ----------------------------------------------------------------------------------------------------

def location(path):
    """The storage.Location of a path or URI (moco_ray.storage); ExportError when none can be built."""
    try:
        return storage.at(path, "checkpoint")
    except ConfigError as e:
        raise ExportError(str(e)) from None


def find_checkpoint(path):
    """A checkpoint directory, or the newest valid checkpoint of a run directory (a path or URI)."""
    path = location(path)
    if not path.exists():
        raise ExportError(f"{path}: no such checkpoint or run directory")
    if (path / checkpoint.MANIFEST).exists() or not checkpoint.in_run(path):
        return path   # a checkpoint, or nothing: verify() says which
    newest = checkpoint.newest_valid(path)
    if newest is None:
        raise ExportError(f"{path}: no valid checkpoint in this run directory")
    return newest


def read_state(path):
    """The state dict of a pretraining checkpoint (encoder_q, encoder_k, config, progress, ...)."""
    path = find_checkpoint(path)
    try:
        checkpoint.verify(path)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    with (path / checkpoint.STATE).open_input() as f:
        state = torch.load(f, map_location="cpu", weights_only=False)
    if "encoder_q" not in state:
        raise ExportError(f"{path}: not a pretraining checkpoint (no encoder_q)")
    return state


def read_checkpoint(path):
    """(encoder_q state_dict with the head, config dict, epoch) of a pretraining checkpoint."""
    state = read_state(path)
    return state["encoder_q"], state["config"], state.get("progress", {}).get("epoch", 0)


def backbone_state_dict(ckpt_dir):
    """(backbone state_dict, config dict) of a pretraining checkpoint of any method: the keys of
    the backbone's own model (torchvision's or timm's), no head."""
    encoder, cfg, _ = read_checkpoint(ckpt_dir)
    return split_head(base_encoder(encoder, cfg), cfg["arch"])[0], cfg


def strip_head(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def base_encoder(encoder, cfg):
    """encoder_q's backbone with its head as `fc.*`, whatever the method: v3's query encoder keeps
    it under base.* beside its predictor.* (moco_ray.step_v3.QueryEncoder)."""
    if cfg.get("method") != "v3":
        return encoder
    return {k[len("base."):]: v for k, v in encoder.items() if k.startswith("base.")}


def family(arch):
    try:
        return encoders.kind(arch)
    except ValueError as e:
        raise ExportError(str(e)) from None


def split_head(base, arch):
    """(backbone, head) state dicts of a base encoder: the head is its `fc`; a torchvision ResNet
    keeps its own layout, any other backbone is an encoders.Encoder with it under backbone.*."""
    head = {k[len("fc."):]: v for k, v in base.items() if k.startswith("fc.")}
    if family(arch) == "resnet":
        return strip_head(base), head
    return {k[len("backbone."):]: v for k, v in base.items() if k.startswith("backbone.")}, head


# ----------------------------------------------------------------------------------------------------
# The layouts
# ----------------------------------------------------------------------------------------------------

def to_moco(encoder, arch, epoch):
    """The authors' layout: their main_moco.py saves the DDP-wrapped MoCo model's state_dict."""
    return {"state_dict": {MOCO_PREFIX + k: v for k, v in encoder.items()}, "arch": arch, "epoch": epoch}


def detectron2_name(key):
    """A torchvision ResNet key under detectron2's names: conv1/bn1 -> stem.conv1(.norm), layerN -> res(N+1),
    bnK -> convK.norm, downsample.0/1 -> shortcut(.norm)."""
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m[1]) + 1}", key)
    key = re.sub(r"bn(\d)", r"conv\1.norm", key)
    key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return key if key.startswith("res") else "stem." + key


def to_detectron2(backbone):
    model = {detectron2_name(k): v.detach().cpu().numpy() for k, v in backbone.items()
             if not k.endswith("num_batches_tracked")}   # detectron2's FrozenBN has no such buffer
    return {"model": model, "__author__": "moco_ray", "matching_heuristics": True}


def to_moco_v3(backbone, head, arch, cfg, epoch, momentum=None, predictor=None):
    """The authors' v3 layout: their main_moco.py saves the DDP-wrapped builder's state_dict, the
    projector as the base encoder's head (V3_HEAD). `momentum` (backbone, head) and `predictor`
    are left out when absent. res, small_stem and width let load_backbone rebuild the backbone."""
    name = V3_HEAD[family(arch)]
    clash = [k for k in backbone if k.startswith(name + ".")]
    if clash:
        raise ExportError(f"--format moco-v3: {arch} has backbone parameters under {name}.* ({clash[0]}), "
                          f"where the authors' layout puts the projector; use --format timm")

    def encoder(prefix, parts):
        body, top = parts
        return {**{prefix + k: v for k, v in body.items()}, **{f"{prefix}{name}.{k}": v for k, v in top.items()}}

    state = encoder(V3_PREFIX, (backbone, head))
    if momentum is not None:
        state.update(encoder("module.momentum_encoder.", momentum))
    state.update({"module.predictor." + k: v for k, v in (predictor or {}).items()})
    return {"state_dict": state, "arch": arch, "epoch": epoch, "res": cfg.get("res", 224),
            "small_stem": bool(cfg.get("small_stem")), "width": cfg.get("width", 64)}


def check_family(fmt, arch):
    fam = family(arch)
    if fam not in FAMILIES[fmt]:
        hint = {"resnet": "torchvision", "vit": "torchvision", "timm": "timm or moco-v3"}[fam]
        raise ExportError(f"--format {fmt} cannot hold {arch} (a {fam} backbone); use --format {hint}")


def layout(fmt, encoder, cfg, epoch, encoder_k=None):
    """`encoder` (encoder_q's state_dict, head included; encoder_k's for moco-v3's momentum encoder)
    as the object `fmt` stores, and its tensors."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    arch = cfg["arch"]
    check_family(fmt, arch)
    base = base_encoder(encoder, cfg)
    backbone, head = split_head(base, arch)
    if fmt in ("torchvision", "timm"):
        return backbone, backbone
    if fmt == "moco":
        obj = to_moco(base, arch, epoch)
        return obj, obj["state_dict"]
    if fmt == "detectron2":
        obj = to_detectron2(backbone)
        return obj, obj["model"]
    predictor = {k[len("predictor."):]: v for k, v in encoder.items() if k.startswith("predictor.")}
    momentum = split_head(encoder_k, arch) if encoder_k is not None else None
    obj = to_moco_v3(backbone, head, arch, cfg, epoch, momentum, predictor if cfg.get("method") == "v3" else None)
    return obj, obj["state_dict"]


def write(path, fmt, encoder, cfg, epoch, encoder_k=None):
    """Write the export to a path or URI (one atomic write); returns the number of tensors in it."""
    obj, tensors = layout(fmt, encoder, cfg, epoch, encoder_k)
    save(path, obj, pickled=fmt == "detectron2")   # detectron2's checkpointer reads a .pkl with pickle
    return len(tensors)


def save(path, obj, pickled=False):
    """torch.save (or pickle.dump) of obj to a path or URI, in one atomic write."""
    buffer = io.BytesIO()
    if pickled:
        pickle.dump(obj, buffer)
    else:
        torch.save(obj, buffer)
    location(path).write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------------------------------
# Reading any of them back (moco_ray.lincls --pretrained)
# ----------------------------------------------------------------------------------------------------

def infer_arch(backbone):
    """(arch, small_stem, res, width) of a torchvision ResNet state_dict: bottleneck blocks have
    conv3; the stem's output channels are the width (moco_ray.model.ScaledResNet)."""
    if "conv1.weight" not in backbone:
        raise ExportError("not a ResNet state_dict (no conv1.weight)")
    arch = "resnet50" if "layer1.0.conv3.weight" in backbone else "resnet18"
    return arch, backbone["conv1.weight"].shape[-1] == 3, 224, backbone["conv1.weight"].shape[0]


class Pretrained(NamedTuple):
    """A pretrained backbone: its state dict (the keys of its own model, no head) and what rebuilds
    it with moco_ray.encoders.build_backbone (res: the image size a ViT's position embedding has;
    width and zero_init_residual: a ResNet's, moco_ray.model.resnet)."""
    backbone: dict
    arch: str
    small_stem: bool
    res: int = 224
    width: int = 64
    zero_init_residual: bool = False


def load_pretrained(path):
    """The Pretrained of a pretraining checkpoint or run directory (any method and backbone), a
    `torchvision` or `moco` export of a ResNet, or a `moco-v3` export (the authors' key handling:
    keep module.encoder_q.* / module.base_encoder.* except the head, strip the prefix)."""
    path = location(path)
    if not path.is_file():
        backbone, cfg = backbone_state_dict(path)
        zero_init = encoders.residuals_start_at_zero(cfg.get("method"), cfg.get("zero_init_residual"))
        return Pretrained(backbone, cfg["arch"], bool(cfg.get("small_stem")), cfg.get("res", 224),
                          cfg.get("width", 64), zero_init)
    try:
        with path.open_input() as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not a torchvision, moco or moco-v3 export ({type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "arch" in obj and any(
            k.startswith(V3_PREFIX) for k in obj["state_dict"]):
        head = V3_HEAD[family(obj["arch"])] + "."
        backbone = {k[len(V3_PREFIX):]: v for k, v in obj["state_dict"].items()
                    if k.startswith(V3_PREFIX) and not k.startswith(V3_PREFIX + head)}
        return Pretrained(backbone, obj["arch"], bool(obj.get("small_stem")), obj.get("res", 224),
                          obj.get("width", 64), encoders.residuals_start_at_zero("v3"))
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = {k[len(MOCO_PREFIX):]: v for k, v in obj["state_dict"].items() if k.startswith(MOCO_PREFIX)}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path}: not a torchvision, moco or moco-v3 export")
    backbone = strip_head(obj)
    try:
        return Pretrained(backbone, *infer_arch(backbone))
    except ExportError as e:
        raise ExportError(f"{path}: {e} (other backbones: use the checkpoint or a moco-v3 export)") from None


def load_backbone(path):
    """(backbone state_dict, arch, small_stem) of load_pretrained(path)."""
    return tuple(load_pretrained(path)[:3])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m moco_ray.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoint_...) or a run directory")
    p.add_argument("--out", required=True, help="output file (.pt for torchvision and moco, .pkl for detectron2)")
    p.add_argument("--format", default="torchvision", help=f"{' | '.join(FORMATS)} (default torchvision)")
    args = p.parse_args(argv)
    try:
        if args.format not in FORMATS:
            raise ExportError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
        state = read_state(args.checkpoint)
        cfg, epoch = state["config"], state.get("progress", {}).get("epoch", 0)
        count = write(args.out, args.format, state["encoder_q"], cfg, epoch, state.get("encoder_k"))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} tensors of {cfg['arch']} ({args.format}) to {args.out}{export_note(args.format, cfg)}")
    return 0


def export_note(fmt, cfg):
    """What a user must pass to load the export into the stock model, when anything."""
    arch, res = cfg["arch"], cfg.get("res", 224)
    if encoders.kind(arch) == "resnet" and cfg.get("width", 64) != 64:
        return f" (stages {cfg['width']} channels wide, not 64: moco_ray.model.resnet(..., width={cfg['width']}))"
    if cfg.get("small_stem"):
        return " (small 3x3 stem: conv1 differs from the stock model)"
    if fmt in ("torchvision", "timm") and encoders.is_vit(arch) and res != 224:
        return f" (a ViT at {res} px: build it with {'image_size' if fmt == 'torchvision' else 'img_size'}={res})"
    if fmt == "timm" and arch in encoders.MOCO_VITS and encoders.MOCO_VITS[arch][1]:
        return f" (moco-v3's {arch}: timm.create_model({encoders.MOCO_VITS[arch][0]!r}, num_heads=12))"
    return ""


if __name__ == "__main__":
    sys.exit(main())
