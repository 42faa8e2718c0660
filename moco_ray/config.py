"""The one typed config: flat dataclasses with the paper's names (Config: pretraining; LinclsConfig: linear
evaluation, moco_ray.lincls; both extend TrainOptions, their shared fields, and RunOptions, the
bookkeeping), presets, --set parsing, validation.

Everything a run needs that is not placement (workers, GPUs, storage) lives here, so the driver,
the per-worker loop, the sweep and the checkpoint all read the same object.
"""
import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """Bad user input: printed as one line by the CLIs, before Ray starts."""


@dataclass
class RunOptions:
    """The bookkeeping fields of every run, pretraining (Config) and linear evaluation (LinclsConfig)."""
    report_every: int = 10        # steps between the metric records rank 0 sends to the driver; 0 = none
    # Saves between the start and the end (the last save always happens): after every
    # checkpoint_every_steps steps and every checkpoint_every_s seconds, epoch ends included; 0 turns
    # either off. 10 minutes by default: a save costs C = 2-4 s at W=64 (353 MiB, the gather, Ray's
    # report barrier), and Young's optimal interval sqrt(2 C MTBF) is 7-12 min for a 64-GPU job failing
    # every 8 to 24 hours; 0.5 % of the time saving, 5 minutes replayed per failure on average.
    checkpoint_every_steps: int = 0
    checkpoint_every_s: float = 600.0
    keep_checkpoints: int = 3
    metrics_port: int = 9400      # worker serves on metrics_port + local_rank; 0 = off
    sample_log: str = ""          # directory where workers log the sample ids they consume (audit)
    log_to: str = ""              # trackers that get the run's records: any of tensorboard,mlflow,wandb
    #                               (moco_ray.trackers)
    mlflow_uri: str = ""          # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///STORAGE/mlflow.db

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class TrainOptions(RunOptions):
    """The fields of every training run, pretraining (Config) and linear evaluation (LinclsConfig):
    its data and loader, the SGD schedule, the numerics. The defaults are pretraining's (the MoCo
    paper's); LinclsConfig sets its own protocol's defaults on the fields where the two differ."""
    data: str = ""                # training split: manifest dir or ImageFolder tree; "" = the embedded dataset
    #                               (data_prep.demo)
    res: int = 224                # crop size (linear evaluation's val: resize to res / 0.875, center crop)
    crop_min: float = 0.2         # smallest RandomResizedCrop area (the paper's 0.2)
    loader_workers: int = 4       # decode threads per training worker
    batch_size: int = 256         # global B, kept across resizes
    lr: float = 0.03              # per 256 images
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 200
    warmup_epochs: int = 0        # linear lr warmup from 0 (moco-v3: 10 for ResNet-50, 40 for ViT)
    schedule: str = "cosine"      # cosine | step
    lr_steps: tuple = (120, 160)  # epochs at which the step schedule divides lr by 10
    seed: int = 0
    max_steps: int = 0            # stop after this many optimizer steps; 0 = run all epochs
    precision: str = "auto"       # fp32 | bf16 | fp16 (autocast of the encoders, or of lincls's frozen
    #                               backbone); auto = bf16 on CUDA, fp32 on CPU
    channels_last: str = "auto"   # true | false; auto = true on CUDA


@dataclass
class Config(TrainOptions):
    knn_data: str = ""            # labelled held-out split for the kNN monitor; "" = none (or the embedded val)
    aug: str = "v2"               # v1 | v2 ("aug+") | v3 (moco-v3's asymmetric pair: moco_ray.augment)
    # model (MoCo paper names)
    method: str = "moco"          # moco (v1/v2: by mlp and aug) | v2plus (v2, symmetric loss) | v3
    arch: str = "resnet50"        # torchvision ResNet or ViT, vit_small/vit_base (moco-v3's), timm:NAME
    small_stem: bool = False      # 3x3 conv1, no max-pool: for 32px data
    width: int = 64               # ResNet: channels of the first stage (64 = torchvision's; each stage doubles
    #                               it); like small_stem, other backbones keep their own
    zero_init_residual: bool = False  # ResNet, v1/v2: every block starts as the identity (v3 always does,
    #                               as moco-v3's main_moco.py)
    mlp: bool = True              # v2 MLP head; False = v1 linear head
    head_bn: bool = False         # BN after the MLP's hidden layer (not in the paper; the demo needs it)
    dim: int = 128                # D
    mlp_dim: int = 4096           # v3: hidden width of the projector and predictor MLPs
    stop_grad_conv1: bool = False # ViT: frozen random patch projection (moco-v3)
    K: int = 65536                # queue size
    m: float = 0.999              # key encoder momentum
    m_schedule: str = "constant"  # constant | cosine (m rises to 1 by a half cosine, moco-v3's --moco-m-cos)
    T: float = 0.2                # softmax temperature
    bn: str = "shuffle"           # shuffle | sync | split
    bn_splits: int = 8            # sub-batches for split-BN (W == 1)
    # optimisation
    optimizer: str = "sgd"        # sgd | lars | adamw
    # The most images one worker puts through the encoders at once; 0 = no limit. A local batch
    # b = B // W above it (after a shrink to fewer workers) is taken in equal micro-batches with the
    # same global batch, queue and loss (BN statistics per micro-batch). Size it as the largest b
    # whose step fits in the GPU's memory for the run's arch, res and precision: `python
    # bench/gpu.py --arch A --res R --batch b` on one GPU (resnet50, 224 px, bf16: see docs/design.md).
    max_batch_per_worker: int = 0
    # monitoring and checkpoints
    knn_every: int = 10           # epochs; 0 = never
    knn_k: int = 200
    knn_t: float = 0.1
    knn_chunk: int = 256          # kNN queries scored per round (memory: knn_chunk x bank/W similarities)
    knn_bank_per_class: int = 100  # kNN bank: a fixed seeded subset of at most this many images per class; 0 = all


@dataclass
class LinclsConfig(TrainOptions):
    """Linear classification on frozen features (the paper's protocol, the authors' main_lincls.py).
    The defaults are the paper's ImageNet protocol: the fields below set the ones that differ from
    pretraining's (TrainOptions)."""
    pretrained: str = ""          # pretraining checkpoint dir, run dir (its newest valid checkpoint), or an export
    val_data: str = ""            # labelled validation split; "" = the embedded dataset's val split
    crop_min: float = 0.08        # torchvision's default
    lr: float = 30.0
    weight_decay: float = 0.0
    epochs: int = 100
    schedule: str = "step"
    lr_steps: tuple = (60, 80)
    eval_every: int = 1           # epochs between top-1/top-5 on val_data (and always after the last)
    random_baseline: bool = False # then the same protocol on a randomly initialised encoder (run NAME-random)
    pixel_baseline: bool = False  # then the same protocol on the flattened input pixels (run NAME-pixels)
    features: str = "encoder"     # what the linear layer reads: encoder (the pretrained backbone) | pixels


PRESETS = {
    # kNN monitor (the defaults): a bank of 100 images per class (100,000 on ImageNet, under 8% of an
    # epoch) every 10 epochs
    "moco-v1": dict(mlp=False, T=0.07, aug="v1", schedule="step", lr=0.03, knn_every=10,
                    knn_bank_per_class=100),
    "moco-v2": dict(mlp=True, T=0.2, aug="v2", schedule="cosine", lr=0.03, knn_every=10,
                    knn_bank_per_class=100),
    # v2 with the symmetric loss (the authors' CIFAR demo, solo-learn's mocov2plus), v2's hyperparameters
    "moco-v2plus": dict(method="v2plus", mlp=True, T=0.2, aug="v2", schedule="cosine", lr=0.03,
                        knn_every=10, knn_bank_per_class=100),
    # MoCo v3 as its CONFIG.md: batch 4096, SyncBN, momentum 0.99 rising to 1 by a cosine, lr per
    # 256 images. ResNet-50: 100 epochs with LARS (300 epochs: lr=0.3; 1000: lr=0.3, weight_decay=1.5e-6,
    # m=0.996); ViTs: 300 epochs with AdamW and the frozen patch projection. All three: the asymmetric
    # (BYOL) augmentation pair; crops down to 20% of the image for ResNet-50, 8% (main_moco.py's default) for ViTs.
    "moco-v3-resnet50": dict(method="v3", arch="resnet50", dim=256, mlp_dim=4096, T=1.0, m=0.99,
                             m_schedule="cosine", bn="sync", optimizer="lars", lr=0.6, weight_decay=1e-6,
                             batch_size=4096, epochs=100, warmup_epochs=10, crop_min=0.2, aug="v3",
                             knn_every=10, knn_bank_per_class=100),
    "moco-v3-vit-small": dict(method="v3", arch="vit_small", dim=256, mlp_dim=4096, T=0.2, m=0.99,
                              m_schedule="cosine", bn="sync", optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                              batch_size=4096, epochs=300, warmup_epochs=40, stop_grad_conv1=True,
                              crop_min=0.08, aug="v3", knn_every=10, knn_bank_per_class=100),
    "moco-v3-vit-base": dict(method="v3", arch="vit_base", dim=256, mlp_dim=4096, T=0.2, m=0.99,
                             m_schedule="cosine", bn="sync", optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                             batch_size=4096, epochs=300, warmup_epochs=40, stop_grad_conv1=True,
                             crop_min=0.08, aug="v3", knn_every=10, knn_bank_per_class=100),
    # Tiny and CPU-sized: a ResNet-18 a quarter as wide (width 16: 1/16 of the compute) on 16px
    # crops of the embedded glyphs (data_prep.demo, 6400 train images: 100 steps an epoch), 2 workers.
    # K stays well below the dataset, so an image's own older keys are rare among its negatives.
    # Departures from the paper: a BN in the MLP head (SimCLR's, MoCo v3's: without it the query
    # encoder collapses, every scene sharing one black background), residual blocks that start as
    # the identity (moco-v3's zero_init_residual: the random-init encoder is then a shallow one, and
    # the deep one it becomes is learned), the authors' CIFAR demo's weight decay 5e-4, and T=0.1
    # and lr 0.3 per 256, the best of the 20-epoch runs in docs/results.md (T=0.2, lr 0.12 and 0.8
    # learned less), and K=512, the best of the K ablation (3 seeds), which ended 3-10 kNN points
    # above K=1024 on each of the 3 seeds at 40 epochs. 40 epochs (256k images, ~7 min on 2 idle
    # cores) keep `make demo` near 10 minutes of a fresh clone; the kNN still climbs past them.
    "demo": dict(
        arch="resnet18", width=16, small_stem=True, zero_init_residual=True, res=16, aug="v2", mlp=True,
        head_bn=True, crop_min=0.2, T=0.1, K=512, m=0.99, batch_size=64, lr=0.3, weight_decay=5e-4, epochs=40,
        schedule="cosine", knn_every=10, report_every=10, checkpoint_every_steps=500, checkpoint_every_s=0,
        keep_checkpoints=2, loader_workers=1, metrics_port=0, bn_splits=2, knn_bank_per_class=0,
    ),
}
# The demo's data, sizes and bookkeeping with MoCo v3: per-worker BN (bn=split: SyncBN needs GPUs),
# small MLPs, T=0.2, a short warmup. v2's augmentation, not v3's asymmetric pair: blur and solarize
# on 16 px crops remove what detail there is and cost 18% of the images/s (docs/results.md: 36.1
# against 30.6 kNN after 20 epochs). A v3 step puts both views through both encoders, twice v2's
# compute: bf16 autocast (moco-v3 trains under AMP) takes 29% off it on a CPU with bf16
# instructions (bench/methods.py; train.py warns on one without), and twice the lr (0.6 per 256)
# with a constant m learned faster than 0.3 with the cosine m in the shorter runs (the cosine m
# flattens the curve after 2/3 of them). 32 epochs: about 0.9x `make demo`'s time (docs/results.md).
PRESETS["demo-v3"] = dict(PRESETS["demo"], method="v3", aug="v2", dim=64, mlp_dim=256, T=0.2, m=0.99,
                          m_schedule="constant", bn="split", lr=0.6, warmup_epochs=2, epochs=32, precision="bf16")
# bn_splits=2 (demo): one worker (`tune.sweep --workers-per-trial 1`) normalises 2 sub-batches of
# 32, as each of the 2 shuffle-BN workers of `make demo` does (8 sub-batches of 8 learned more slowly).

LINCLS_PRESETS = {
    "imagenet": {},   # the defaults: 100 epochs, lr 30 per 256, /10 at 60 and 80
    # moco-v3's main_lincls.py: SGD over 90 epochs with a cosine schedule, batch 1024, no weight decay;
    # lr 0.1 per 256 for ResNet-50 and 3 for the ViTs (CONFIG.md), which read their class token.
    "moco-v3": dict(epochs=90, batch_size=1024, lr=0.1, weight_decay=0.0, schedule="cosine"),
    "moco-v3-vit": dict(epochs=90, batch_size=1024, lr=3.0, weight_decay=0.0, schedule="cosine"),
    # The 16px crops of the demo pretraining; 10 epochs, lr / 10 at 60% and 80% of them as the paper's.
    "demo": dict(res=16, batch_size=64, epochs=10, lr_steps=(6, 8), eval_every=2, random_baseline=True,
                 pixel_baseline=True,
                 report_every=5, checkpoint_every_steps=100, checkpoint_every_s=0, keep_checkpoints=2,
                 loader_workers=1, metrics_port=0),
}

CHOICES = {"aug": ("v1", "v2", "v3"), "bn": ("shuffle", "sync", "split"), "schedule": ("cosine", "step"),
           "method": ("moco", "v2plus", "v3"), "optimizer": ("sgd", "lars", "adamw"),
           "m_schedule": ("constant", "cosine"), "precision": ("auto", "fp32", "bf16", "fp16"),
           "channels_last": ("auto", "true", "false")}


LINCLS_CHOICES = {**{key: CHOICES[key] for key in ("schedule", "precision", "channels_last")},
                  "features": ("encoder", "pixels")}
PRESETS_OF = {Config: PRESETS, LinclsConfig: LINCLS_PRESETS}


def preset(name, kind=Config):
    presets = PRESETS_OF[kind]
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)} or a .yaml file")
    return kind(**presets[name])


def _coerce(f, value):
    """Parse a --set string (or a YAML scalar) into the field's type."""
    kind = type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{f.name}: expected true/false, got {value!r}")
    if kind is tuple:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        try:
            return tuple(int(v) for v in items)
        except ValueError:
            raise ConfigError(f"{f.name}: expected comma-separated integers, got {value!r}") from None
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None


def apply_overrides(cfg, overrides):
    """overrides: a dict, or a list of 'key=value' strings from --set."""
    if isinstance(overrides, (list, tuple)):
        pairs = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            pairs[key.strip()] = value.strip()
        overrides = pairs
    by_name = {f.name: f for f in fields(type(cfg))}
    changes = {}
    for key, value in overrides.items():
        if key not in by_name:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(by_name)}")
        changes[key] = _coerce(by_name[key], value)
    return dataclasses.replace(cfg, **changes)


def load(spec="demo", overrides=(), kind=Config):
    """A preset name or a YAML file (optionally naming a `preset:` to start from), then --set.
    kind: Config (pretraining) or LinclsConfig (linear evaluation)."""
    presets = PRESETS_OF[kind]
    if spec in presets:
        return apply_overrides(preset(spec, kind), overrides)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--config {spec!r} is neither a preset ({', '.join(presets)}) nor a file")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{spec}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{spec}: expected a mapping of config keys")
    base = preset(doc.pop("preset"), kind) if "preset" in doc else kind()
    return apply_overrides(apply_overrides(base, doc), overrides)


def dump(cfg, path):
    Path(path).write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                          for k, v in cfg.to_dict().items()}, sort_keys=False))


def _check_values(cfg, choices, at_least_one, positive, non_negative):
    """The checks both configs share: choices, bounds, crop_min."""
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: choose one of {', '.join(allowed)}")
    for key in at_least_one:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 1")
    if not 0 < cfg.crop_min <= 1:
        raise ConfigError(f"crop_min={cfg.crop_min} must be in (0, 1]")
    from moco_ray.trackers import check
    check(cfg.log_to)   # known trackers whose libraries are installed
    for key in positive:
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be > 0")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")


def _check_checkpoints(cfg):
    """The save intervals: each >= 0 (0 = off), not both off."""
    for key in ("checkpoint_every_steps", "checkpoint_every_s"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0 (0 = off)")
    if not cfg.checkpoint_every_steps and not cfg.checkpoint_every_s:
        raise ConfigError("checkpoint_every_steps=0 and checkpoint_every_s=0: no checkpoint before the end; "
                          "set one of them (checkpoint_every_s=600: every 10 minutes)")


def _check_placement(cfg, max_workers, datasets):
    if max_workers < 1:
        raise ConfigError(f"the number of workers must be >= 1, got {max_workers}")
    if cfg.batch_size < max_workers:
        raise ConfigError(f"batch_size={cfg.batch_size} is smaller than the {max_workers} workers")
    for key in datasets:
        value = getattr(cfg, key)
        if value and not os.path.exists(value):
            raise ConfigError(f"{key}={value!r}: no such dataset directory")


def validate(cfg, max_workers=1, min_workers=None):
    """Impossible values, each as one line, before anything expensive starts. min_workers: the
    fewest workers an elastic run may shrink to (default max_workers)."""
    if isinstance(cfg, LinclsConfig):
        return validate_lincls(cfg, max_workers)
    _check_values(cfg, CHOICES,
                  at_least_one=("dim", "mlp_dim", "K", "batch_size", "epochs", "res", "keep_checkpoints",
                                "bn_splits", "knn_k", "knn_chunk", "loader_workers", "width"),
                  positive=("lr", "knn_t"),
                  non_negative=("weight_decay", "momentum", "max_steps", "knn_every", "metrics_port",
                                "report_every", "knn_bank_per_class", "max_batch_per_worker",
                                "warmup_epochs"))
    _check_checkpoints(cfg)
    if not cfg.T > 0:
        raise ConfigError(f"T={cfg.T}: the temperature must be > 0")
    if not 0 <= cfg.m < 1:
        raise ConfigError(f"m={cfg.m}: the momentum must be in [0, 1)")
    if cfg.head_bn and not cfg.mlp:
        raise ConfigError("head_bn=true needs the MLP head (mlp=true)")
    _check_method(cfg)
    _check_placement(cfg, max_workers, ("data", "knn_data"))
    if cfg.method != "v3" and cfg.K < cfg.batch_size:
        raise ConfigError(f"K={cfg.K} is smaller than the global batch {cfg.batch_size}")
    if cfg.method != "v3" and cfg.K < max_workers:
        raise ConfigError(f"K={cfg.K} cannot be sharded over {max_workers} workers")
    _check_micro_batches(cfg, min_workers or max_workers, max_workers)
    return cfg


def _check_micro_batches(cfg, min_workers, max_workers):
    """A limit that can never fit: at some world size in MIN..MAX a micro-batch would hold a single
    image (no BN statistics; BatchNorm1d in the head refuses it). Micro-batches are as equal as
    possible (moco_ray.step.micro_batches), so any limit >= 3 passes; 2 fails for an odd b > 2."""
    limit = cfg.max_batch_per_worker
    if not limit:
        return
    if cfg.method != "moco":
        raise ConfigError(f"max_batch_per_worker: micro-batches are built for method=moco (v1/v2), not {cfg.method}")
    from moco_ray.step import micro_batches

    for W in range(min_workers, max_workers + 1):
        b = cfg.batch_size // W
        if b > 1 and min(micro_batches(b, limit)) < 2:
            raise ConfigError(f"max_batch_per_worker={limit}: with {W} workers the local batch of {b} "
                              f"splits into micro-batches of one image (no BN statistics); use 0 or >= 3")


def _check_warmup(cfg):
    if cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"warmup_epochs={cfg.warmup_epochs} must be fewer than epochs={cfg.epochs}")


def _check_method(cfg):
    """arch against the method: v1/v2/v2+ train torchvision ResNets, v3 any backbone."""
    from moco_ray import encoders

    try:
        family = encoders.kind(cfg.arch)
        if family == "timm":
            encoders.check_timm_name(cfg.arch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except ImportError:
        raise ConfigError(f"arch={cfg.arch!r} needs timm (pip install timm==1.0.31)") from None
    if cfg.method != "v3" and family != "resnet":
        raise ConfigError(f"arch={cfg.arch!r}: method={cfg.method} trains torchvision ResNets; use method=v3")
    if cfg.stop_grad_conv1 and family == "resnet":
        raise ConfigError(f"stop_grad_conv1 freezes a ViT's patch projection; {cfg.arch} has none")
    _check_warmup(cfg)


def validate_lincls(cfg, max_workers=1):
    """validate() for the linear-evaluation config."""
    _check_values(cfg, LINCLS_CHOICES,
                  at_least_one=("batch_size", "epochs", "res", "keep_checkpoints", "loader_workers"),
                  positive=("lr",),
                  non_negative=("weight_decay", "momentum", "max_steps", "eval_every", "metrics_port",
                                "report_every", "warmup_epochs"))
    _check_checkpoints(cfg)
    _check_warmup(cfg)
    if not cfg.pretrained:
        raise ConfigError("--pretrained is required: a pretraining checkpoint or run directory, or an export")
    _check_placement(cfg, max_workers, ("data", "val_data"))
    return cfg


def for_device(cfg, cuda):
    """The config with its device-dependent "auto" values resolved (the start-up log shows these)."""
    from moco_ray.precision import resolve

    precision, channels_last = resolve(cfg.precision, cfg.channels_last, cuda)
    if cfg.channels_last == "auto" and hasattr(cfg, "arch"):
        from moco_ray.encoders import is_vit

        if is_vit(cfg.arch):   # a ViT has no 4-D activations past its patch embedding
            channels_last = "false"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision=fp16 needs a GPU here; use bf16 or fp32 on the CPU")
    return dataclasses.replace(cfg, precision=precision, channels_last=channels_last)


def describe(cfg):
    """The config as an aligned block for the start-up log."""
    width = max(len(f.name) for f in fields(cfg))
    return "\n".join(f"  {f.name:<{width}} = {getattr(cfg, f.name)}" for f in fields(cfg))
