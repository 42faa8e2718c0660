"""python -m moco_ray.export CKPT --out FILE --format torchvision|moco|detectron2

The query encoder of a pretraining checkpoint, in the layout another ecosystem loads as it is:

    torchvision  the backbone as a torchvision ResNet state_dict: loads into
                 torchvision.models.resnet50() (or resnet18) with only fc.weight and fc.bias missing
    moco         the authors' checkpoint layout, {"state_dict": {"module.encoder_q.<key>": tensor},
                 "arch", "epoch"}, head included as module.encoder_q.fc.*: their main_lincls.py
                 --pretrained FILE and detection/convert-pretrain-to-detectron2.py read it unchanged
    detectron2   the pickle that a detectron2 R50-C4/FPN config loads with MODEL.WEIGHTS:
                 {"model": {name: numpy array}, "__author__": "moco_ray", "matching_heuristics": True},
                 backbone only, under detectron2's ResNet names (stem.conv1, stem.conv1.norm,
                 res2..res5, convN.norm, shortcut, shortcut.norm)

CKPT is a checkpoint directory (RUN_DIR/checkpoint_...) or a run directory (its newest valid
checkpoint). load_backbone() reads any of these back (and the torchvision/moco files): it is what
`moco_ray.lincls --pretrained` uses.
"""
import argparse
import pickle
import re
import io
import sys

import torch

from moco_ray import checkpoint, storage
from moco_ray.config import ConfigError

FORMATS = ("torchvision", "moco", "detectron2")
MOCO_PREFIX = "module.encoder_q."


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


def read_checkpoint(path):
    """(encoder_q state_dict with the head, config dict, epoch) of a pretraining checkpoint."""
    path = find_checkpoint(path)
    try:
        checkpoint.verify(path)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    with (path / checkpoint.STATE).open_input() as f:
        state = torch.load(f, map_location="cpu", weights_only=False)
    if "encoder_q" not in state:
        raise ExportError(f"{path}: not a pretraining checkpoint (no encoder_q)")
    return state["encoder_q"], state["config"], state.get("progress", {}).get("epoch", 0)


def backbone_state_dict(ckpt_dir):
    """(torchvision backbone state_dict, config dict) of a pretraining checkpoint."""
    encoder, cfg, _ = read_checkpoint(ckpt_dir)
    return strip_head(encoder), cfg


def strip_head(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


# ----------------------------------------------------------------------------------------------------
# The three layouts
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


def layout(fmt, encoder, cfg, epoch):
    """`encoder` (encoder_q's state_dict, head included) as the object `fmt` stores, and its tensors."""
    if fmt == "torchvision":
        obj = strip_head(encoder)
        return obj, obj
    if fmt == "moco":
        obj = to_moco(encoder, cfg["arch"], epoch)
        return obj, obj["state_dict"]
    if fmt == "detectron2":
        obj = to_detectron2(strip_head(encoder))
        return obj, obj["model"]
    raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def write(path, fmt, encoder, cfg, epoch):
    """Write the export to a path or URI (one atomic write); returns the number of tensors in it."""
    obj, tensors = layout(fmt, encoder, cfg, epoch)
    buffer = io.BytesIO()
    if fmt == "detectron2":   # detectron2's checkpointer reads a .pkl with pickle, not torch.load
        pickle.dump(obj, buffer)
    else:
        torch.save(obj, buffer)
    location(path).write_bytes(buffer.getvalue())
    return len(tensors)


# ----------------------------------------------------------------------------------------------------
# Reading any of them back (moco_ray.lincls --pretrained)
# ----------------------------------------------------------------------------------------------------

def infer_arch(backbone):
    """(arch, small_stem) of a torchvision ResNet state_dict: bottleneck blocks have conv3."""
    if "conv1.weight" not in backbone:
        raise ExportError("not a ResNet state_dict (no conv1.weight)")
    arch = "resnet50" if "layer1.0.conv3.weight" in backbone else "resnet18"
    return arch, backbone["conv1.weight"].shape[-1] == 3


def load_backbone(path):
    """(torchvision backbone state_dict, arch, small_stem) from a pretraining checkpoint or run
    directory, a `torchvision` export, or a `moco` export (the authors' key handling: keep
    module.encoder_q.* except the head, strip the prefix)."""
    path = location(path)
    if not path.is_file():
        backbone, cfg = backbone_state_dict(path)
        return backbone, cfg["arch"], bool(cfg.get("small_stem"))
    try:
        with path.open_input() as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not a torchvision or moco export ({type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = {k[len(MOCO_PREFIX):]: v for k, v in obj["state_dict"].items() if k.startswith(MOCO_PREFIX)}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path}: not a torchvision or moco export")
    backbone = strip_head(obj)
    try:
        return (backbone, *infer_arch(backbone))
    except ExportError as e:
        raise ExportError(f"{path}: {e}") from None


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
        encoder, cfg, epoch = read_checkpoint(args.checkpoint)
        count = write(args.out, args.format, encoder, cfg, epoch)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = " (small 3x3 stem: conv1 differs from the stock model)" if cfg.get("small_stem") else ""
    print(f"wrote {count} tensors of {cfg['arch']} ({args.format}) to {args.out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
