"""A sweep's spec: everything `python -m tune.sweep` checked before Ray starts, typed, and saved as
STORAGE/NAME/sweep.json, which `--resume` reads back to continue the sweep with what it started with."""
import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from moco_ray import config

SPEC_FILE = "sweep.json"


@dataclass(frozen=True)
class Space:
    """One hyperparameter's search space, parsed from the command line."""
    kind: str            # grid | choice | uniform | loguniform
    values: tuple = ()   # grid, choice
    lo: float = 0.0      # uniform, loguniform
    hi: float = 0.0

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(self.lo, self.hi)

    def points(self):
        """Values to validate: every listed value, or a range's two ends."""
        return list(self.values) if self.values else [self.lo, self.hi]

    def size(self):
        return len(self.values) if self.kind == "grid" else 1

    @classmethod
    def from_dict(cls, d):
        return cls(d["kind"], tuple(d.get("values", ())), d.get("lo", 0.0), d.get("hi", 0.0))


@dataclass(frozen=True)
class SweepSpec:
    """One sweep. The flags as given (config, set, tau, m, K, search, ...) are what a continuation
    (--resume auto) must repeat; the parsed spaces and configs are what the trials run."""
    name: str
    storage_path: str                    # a path or URI
    experiment_path: str                 # storage_path / name: Tune's experiment, the trials' runs
    config: str                          # --config
    set: Tuple[str, ...]                 # --set
    cfg: config.Config                   # the base config with its data resolved: what every trial trains
    user_cfg: config.Config              # the base config as given: what best_config.yaml starts from
    tau: Optional[str]                   # --tau, --m, --K as given
    m: Optional[str]
    K: Optional[str]
    tau_space: Space
    m_space: Space
    K_space: Optional[Space]             # None: every trial keeps the config's K
    search: str                          # grid | random
    num_samples: int
    trials: int                          # num_samples x the grid's size
    scheduler: str                       # asha | fifo
    grace_period: Optional[int]          # None: the first kNN epoch
    reduction_factor: float
    max_concurrent: Optional[int]        # None: as many as the cluster holds
    workers: Union[int, Tuple[int, int]]  # per trial: N, or (MIN, MAX)
    max_failures: int
    metric: str                          # a key of rank 0's reports (tune.sweep.METRICS)
    mode: str                            # max | min
    use_gpu_flag: str                    # --use-gpu: auto | true | false
    use_gpu: Optional[bool] = None       # decided once connected (check_cluster), then kept by a resume
    started_ms: Optional[int] = None     # when the sweep first started: the placement groups it may release
    resume: bool = False                 # this invocation continues the stored sweep (not saved)

    def to_json(self):
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resume"}
        d.update(set=list(self.set), cfg=self.cfg.to_dict(), user_cfg=self.user_cfg.to_dict(),
                 tau_space=self.tau_space.__dict__, m_space=self.m_space.__dict__,
                 K_space=self.K_space.__dict__ if self.K_space else None,
                 workers=list(self.workers) if isinstance(self.workers, tuple) else self.workers)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.update(set=tuple(d.get("set") or ()),
                 cfg=config.apply_overrides(config.Config(), d["cfg"]),
                 user_cfg=config.apply_overrides(config.Config(), d["user_cfg"]),
                 tau_space=Space.from_dict(d["tau_space"]), m_space=Space.from_dict(d["m_space"]),
                 K_space=Space.from_dict(d["K_space"]) if d.get("K_space") else None,
                 workers=tuple(d["workers"]) if isinstance(d["workers"], list) else d["workers"])
        return cls(**d)

    def save(self, path):
        """Into the sweep's directory (a storage Location)."""
        (path / SPEC_FILE).write_text(self.to_json())

    @classmethod
    def load(cls, path):
        """The spec stored in the sweep's directory (a storage Location), None when there is none."""
        return cls.from_json((path / SPEC_FILE).read_text()) if (path / SPEC_FILE).is_file() else None
