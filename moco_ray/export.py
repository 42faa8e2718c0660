"""python -m moco_ray.export CKPT --out FILE: the query encoder as a torchvision ResNet state_dict.

The MoCo head lives under `fc.*` and is dropped, so the file loads into
torchvision.models.resnet50() (or resnet18) with only `fc.weight` and `fc.bias` missing.
"""
import argparse
import sys
from pathlib import Path

import torch

from moco_ray import checkpoint


def backbone_state_dict(ckpt_dir):
    checkpoint.verify(ckpt_dir)
    state = torch.load(Path(ckpt_dir) / checkpoint.STATE, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["encoder_q"].items() if not k.startswith("fc.")}, state["config"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m moco_ray.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoint_XXXXXXXXX)")
    p.add_argument("--out", required=True, help="output .pt file")
    args = p.parse_args(argv)
    try:
        weights, cfg = backbone_state_dict(args.checkpoint)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, args.out)
    note = " (small 3x3 stem: conv1 differs from the stock model)" if cfg.get("small_stem") else ""
    print(f"wrote {len(weights)} tensors of {cfg['arch']} to {args.out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
