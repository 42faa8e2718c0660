"""python -m moco_ray.lincls: linear classification on frozen features, the MoCo paper's protocol (the
authors' main_lincls.py), on Ray Train with the loop, order, checkpoints and metrics of pretraining.

    python -m moco_ray.lincls --pretrained RUN_DIR                # demo: the glyphs, 2 CPU workers
    python -m moco_ray.lincls --config imagenet --pretrained CKPT --num-workers 8:16 \\
        --set data=/data/in1k-ffcv/train --set val_data=/data/in1k-ffcv/val

The protocol: the backbone of the pretrained query encoder, frozen and in eval mode for the whole run
(its BatchNorm statistics never change); a new linear layer on the pooled features (weights
N(0, 0.01), bias 0) is the only trained tensor. SGD momentum 0.9, weight decay 0, lr 30 per 256
images scaled to the effective batch, 100 epochs, lr / 10 at epochs 60 and 80 (preset `imagenet`).
Training views: RandomResizedCrop(res, scale (0.08, 1)) and a horizontal flip; validation: resize to
res / 0.875 and center crop. After the first epoch and at the end every backbone tensor must equal
the pretrained one (the authors' sanity check); a difference stops the run with an error (not
retried: a retry would train from the same checkpoint into the same difference).

--pretrained: a pretraining checkpoint directory, a run directory (its newest valid checkpoint), or
a `torchvision`, `moco` or `moco-v3` export (moco_ray.export): any method's backbone, ResNet, ViT
or timm model (a ViT's features are its class token, as moco-v3's main_lincls.py). With
random_baseline (preset demo) the same protocol then runs on a randomly initialised encoder of the
same architecture (run NAME-random), with pixel_baseline (preset demo) on the flattened input pixels
(run NAME-pixels: 3 x res x res features), and every top-1 is printed at the end.
"""
import argparse
import contextlib
import sys
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F

from moco_ray import config, export, launch, precision, train_state
from moco_ray.metrics import EVENT, Event
from moco_ray.worker import Loop, _ray_train, backbone_of


def lincls_func(loop_config):
    """Runs on every Ray Train worker."""
    LinclsLoop(config.apply_overrides(config.LinclsConfig(), loop_config["cfg"]), loop_config.get("run_log"),
               loop_config.get("run_dir")).run()


def build_classifier(arch, small_stem, num_classes, res=224, width=64):
    """The pretraining's backbone with a new linear layer `fc` on its pooled features (a ViT's class
    token, as moco-v3's main_lincls.py): N(0, 0.01) weights and zero bias, the only parameters that
    require a gradient. A torchvision ResNet is moco_ray.model.build_encoder's (its fc the layer);
    any other backbone moco_ray.encoders' (res: the size its position embedding was built for)
    wrapped as encoders.Encoder(backbone, fc)."""
    from moco_ray import encoders
    from moco_ray.model import build_encoder

    if encoders.kind(arch) == "resnet":
        net = build_encoder(arch, num_classes, mlp=False, small_stem=small_stem, width=width)
    else:
        backbone, features = encoders.build_backbone(arch, res, small_stem)
        net = encoders.Encoder(backbone, torch.nn.Linear(features, num_classes))
    net.requires_grad_(False)
    net.fc.requires_grad_(True)
    return init_fc(net)


def init_fc(net):
    """The paper's start of the linear layer `net.fc`: N(0, 0.01) weights, zero bias. Returns net."""
    torch.nn.init.normal_(net.fc.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(net.fc.bias)
    return net


PIXELS = "pixels"   # the arch of the pixel baseline: no backbone


def pixel_classifier(num_classes, res):
    """The linear layer on the flattened, normalised input (3 * res * res features): the linear
    protocol's baseline without an encoder, initialised as build_classifier's fc."""
    from moco_ray import encoders

    return init_fc(encoders.Encoder(torch.nn.Flatten(), torch.nn.Linear(3 * res * res, num_classes)))


@contextlib.contextmanager
def frozen_part(net):
    """The classifier without its linear layer: its state_dict keys are load_backbone()'s."""
    from moco_ray.encoders import Encoder

    if isinstance(net, Encoder):
        yield net.backbone
    else:
        with backbone_of(net) as backbone:
            yield backbone


def changed_tensors(backbone, reference):
    """The names of the backbone tensors (parameters and BN buffers) that differ from `reference`."""
    state = backbone.state_dict()
    names = sorted(set(state) | set(reference))
    return [k for k in names if k not in state or k not in reference
            or not torch.equal(state[k].detach().cpu(), reference[k])]


@torch.no_grad()
def correct_counts(logits, labels, ks=(1, 5)):
    """How many rows have their label among the top-k logits, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


@dataclass
class LinclsProgress(train_state.Progress):
    """Linear evaluation's progress: the latest and the best validation top-1/top-5 (%), and the
    epochs after which the sanity check held."""
    top1: Optional[float] = None
    top5: Optional[float] = None
    best_top1: Optional[float] = None
    best_epoch: Optional[int] = None
    sanity_epochs: list = field(default_factory=list)


class LinclsLoop(Loop):
    """The linear classifier on one worker: the frozen backbone, the DDP-wrapped fc, validation
    top-1/top-5 every eval_every epochs, the sanity check."""

    progress_type = LinclsProgress
    loader_options = dict(views=1)   # one RandomResizedCrop + flip view per image

    def build(self):
        cfg = self.cfg
        if cfg.features == "pixels":
            self.arch, self.net = PIXELS, pixel_classifier(self.info["num_classes"], cfg.res)
        else:
            self.arch, self.net = self.pretrained_classifier()
        self.optimizer = torch.optim.SGD(self.net.fc.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scaler = precision.grad_scaler(cfg.precision, self.device.type)
        self.channels_last = cfg.channels_last == "true"

    def pretrained_classifier(self):
        """(arch, the classifier with the pretrained backbone loaded)."""
        reference, arch, small_stem, res, width, _ = export.load_pretrained(self.cfg.pretrained)
        net = build_classifier(arch, small_stem, self.info["num_classes"], res, width)
        with frozen_part(net) as backbone:
            missing, unexpected = backbone.load_state_dict(reference, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{self.cfg.pretrained}: not a {arch} backbone "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return arch, net

    def load_state(self, state, shard):
        self.net.fc.load_state_dict({k[3:]: v for k, v in state["model"].items() if k.startswith("fc.")})
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def state_dict(self):
        """The whole classifier as a torchvision ResNet state_dict (fc included), optimizer, scaler."""
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "arch": self.arch}

    def to_device(self):
        from torch.nn.parallel import DistributedDataParallel

        self.net.to(self.device, memory_format=precision.memory_format(self.channels_last)).eval()
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.fc = DistributedDataParallel(self.net.fc, device_ids=ids)   # the only trained layer

    def features(self, images):
        """Pooled features of the frozen backbone (eval mode, no graph), in fp32 for the fc."""
        images = images.to(memory_format=precision.memory_format(self.channels_last))
        autocast = precision.autocast(self.cfg.precision, self.device.type)
        with torch.no_grad(), backbone_of(self.net) as backbone, autocast:
            return backbone(images).float()

    def step(self, batch, epochs_done):
        """One SGD step of the linear layer on the batch's one view (RandomResizedCrop + flip).
        Returns (loss, stats, lr)."""
        images, labels, _ = batch
        lr = self.set_lr(epochs_done)
        labels = labels.to(self.device, non_blocking=True)
        logits = self.fc(self.features(images))
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if precision.backward_and_step(loss, self.optimizer, self.scaler):
            self.progress.skipped_steps += 1
        return loss, {"acc": 100.0 * correct_counts(logits, labels, (1,))[0] / len(labels)}, lr

    @torch.no_grad()
    def evaluate(self):
        """(top-1, top-5) in % on val_data, over all workers: each rank scores its own slice, every
        sample counted once, and the counts are summed."""
        import torch.distributed as dist

        from moco_ray import data

        loader = data.make_eval_loader(self.cfg.val_data, batch_size=max(self.b, 64), rank=self.rank,
                                       world_size=self.W, res=self.cfg.res, device=self.device)
        counts = torch.zeros(3, dtype=torch.long, device=self.device)   # top-1, top-5, images
        for images, labels, _ in loader:
            logits = self.net.fc(self.features(images.to(self.device)))
            counts += torch.tensor([*correct_counts(logits, labels.to(self.device)), len(labels)],
                                   device=self.device)
        if self.W > 1:
            dist.all_reduce(counts)
        top1, top5, total = counts.tolist()
        return 100.0 * top1 / total, 100.0 * top5 / total

    def sanity_check(self):
        """The authors' check: every backbone tensor equals the pretrained one, on every rank.
        Returns the names that differ on any rank (empty when it holds)."""
        import torch.distributed as dist

        if self.arch == PIXELS:   # no backbone to change
            return []
        reference = export.load_backbone(self.cfg.pretrained)[0]
        with frozen_part(self.net) as backbone:
            changed = changed_tensors(backbone, reference)
        everyone = [changed]
        if self.W > 1:
            everyone = [None] * self.W
            dist.all_gather_object(everyone, changed)
        self.progress.sanity_epochs = [*self.progress.sanity_epochs, self.progress.epoch]
        return sorted({name for names in everyone for name in names})

    def measure_due(self, epoch, last_epoch):
        """The sanity check after the first epoch; top-1/top-5 every eval_every epochs; both at the end."""
        every = self.cfg.eval_every
        return epoch == 1 or last_epoch or bool(every) and epoch % every == 0

    def measure(self):
        p, at_end = self.progress, super().finished()
        self.measured_step = p.step
        if p.epoch == 1 or at_end:
            changed = self.sanity_check()
            if changed:
                self.failure = (f"sanity check failed: {len(changed)} backbone tensors changed by epoch "
                                f"{p.epoch} ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")
                return
        if at_end or self.cfg.eval_every and p.epoch % self.cfg.eval_every == 0:
            p.top1, p.top5 = self.evaluate()
            if p.best_top1 is None or p.top1 > p.best_top1:
                p.best_top1, p.best_epoch = p.top1, p.epoch

    def measures(self):
        p = self.progress
        return {"lincls_top1": p.top1, "lincls_top5": p.top5, "lincls_best_top1": p.best_top1,
                "lincls_best_epoch": p.best_epoch, "sanity_checked_epochs": p.sanity_epochs}

    failure = None   # the sanity check's message once it failed

    def finished(self):
        return self.failure is not None or super().finished()

    def end(self):
        """The end of the run; after a failed sanity check, a "failed" record and no checkpoint (the
        newest one is from before the failure)."""
        if self.measured_step != self.progress.step:
            self.measure()
        if self.failure is None:
            return super().end()
        failed = {EVENT: Event.FAILED, "error": self.failure, "step": self.progress.step,
                  "epoch": self.progress.epoch}
        if self.publisher:
            self.publisher.send(failed)
            self.publisher.drain()
        _ray_train().report(failed)


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="python -m moco_ray.lincls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=None,
                   help="pretraining checkpoint or run directory, or a torchvision/moco export")
    launch.add_run_arguments(p, presets=config.LINCLS_PRESETS)
    return p


RANDOM_INIT = "random_init.pt"   # the random-init baseline's export, in its run directory


def random_init_export(path, pretrained, seed):
    """Write an export of a randomly initialised encoder of the pretrained one's architecture
    (seeded, initialised as pretraining initialises its encoder) to `path`: `torchvision` for a
    ResNet, the moco-v3 layout (which names the arch) for any other backbone."""
    from moco_ray import encoders
    from moco_ray.model import build_encoder

    _, arch, small_stem, res, width, zero_init_residual = export.load_pretrained(pretrained)
    torch.manual_seed(seed)
    if encoders.kind(arch) == "resnet":
        encoder = build_encoder(arch, 128, mlp=False, small_stem=small_stem, zero_init_residual=zero_init_residual,
                                width=width)
        export.write(path, "torchvision", encoder.state_dict(), {"arch": arch}, 0)   # a path or URI
        return
    backbone = encoders.build_backbone(arch, res, small_stem)[0]
    export.save(path, export.to_moco_v3(backbone.state_dict(), {}, arch, {"res": res, "small_stem": small_stem}, 0))


def check_res(pretrained, res):
    """A ViT's position embedding was built for the pretraining's image size: lincls crops the same."""
    from moco_ray.encoders import is_vit

    if is_vit(pretrained.arch) and res != pretrained.res:
        raise config.ConfigError(f"res={res}: the pretrained {pretrained.arch} was trained at {pretrained.res} px; "
                            f"use --set res={pretrained.res}")


def baseline_runs(args, cfg, storage_path, name):
    """[(args, config, name)] of the baselines of run `name` the config asks for (random init:
    NAME-random, pixels: NAME-pixels), each continued with its run if it exists."""
    runs, off = [], {"random_baseline": False, "pixel_baseline": False}
    for wanted, suffix, overrides in (
            (cfg.random_baseline, "-random", {"pretrained": str(storage_path / (name + "-random") / RANDOM_INIT)}),
            (cfg.pixel_baseline, "-pixels", {"features": "pixels"})):
        if wanted:
            b_args = argparse.Namespace(**{**vars(args), "name": name + suffix,
                                           "resume": "auto" if args.resume else None})
            runs.append((b_args, config.apply_overrides(cfg, {**off, **overrides}), name + suffix))
    return runs


def evaluate_encoder(args, run, use_gpu):
    """One linear evaluation (run: a launch.RunPlan): (the run's last record, wall seconds); its error
    when the run failed."""
    from moco_ray.progress import read_metrics

    _, wall = launch.fit(args, run, use_gpu, loop=lincls_func)
    return read_metrics(run.storage_path / run.name)[-1], wall


def summary_lines(name, last, wall):
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return [f"  {name}",
            f"    linear top-1    {fmt(last.get('lincls_top1'))} % (best {fmt(last.get('lincls_best_top1'))} % "
            f"at epoch {last.get('lincls_best_epoch')}), top-5 {fmt(last.get('lincls_top5'))} %",
            f"    epochs          {last.get('epoch')}, sanity check after epochs {last.get('sanity_checked_epochs')}",
            f"    wall time       {wall:.0f} s",
            f"    checkpoint      {last.get('checkpoint')}"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        pretrained = [f"pretrained={args.pretrained}"] if args.pretrained else []
        run = launch.plan(args, config.LinclsConfig, ("data", "val_data"), pretrained, prefix="lincls-")
        # every worker and every restart reads the same checkpoint, whatever the run directory gets later
        cfg = config.apply_overrides(run.cfg, {"pretrained": str(export.find_checkpoint(run.cfg.pretrained))})
        check_res(export.load_pretrained(cfg.pretrained), cfg.res)  # readable, before Ray starts
        baselines = baseline_runs(args, cfg, run.storage_path, run.name)
        for b_args, b_cfg, _ in baselines:
            launch.run_dir_name(b_args, run.storage_path, b_cfg)   # refused now, not after the first run
        use_gpu = launch.connect(args)
        cfg = config.for_device(cfg, cuda=use_gpu)
    except (config.ConfigError, export.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    runs = [(run.name, *evaluate_encoder(args, replace(run, cfg=cfg), use_gpu))]
    for b_args, b_cfg, b_name in baselines if runs[0][1].get(EVENT) != Event.FAILED else ():
        if b_cfg.features == "encoder":
            random_init_export(b_cfg.pretrained, cfg.pretrained, cfg.seed)
        baseline = replace(run, user_cfg=b_cfg, cfg=config.for_device(b_cfg, cuda=use_gpu), name=b_name)
        runs.append((b_name, *evaluate_encoder(b_args, baseline, use_gpu)))
    print("\n[moco_ray] linear evaluation")
    for name, last, wall in runs:
        print("\n".join(summary_lines(name, last, wall)))
    failed = [last["error"] for _, last, _ in runs if last.get(EVENT) == Event.FAILED]
    for error in failed:
        print(f"error: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
