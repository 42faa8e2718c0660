"""Run directories: start a run, or continue it, with one command.

    --resume          continue the run --name (it must exist)
    --resume auto     continue the run --name if it exists, start it otherwise: a job that is retried
                      blindly (a RayJob's backoffLimit, a rescheduled head) continues where it stopped

A run directory records the config it runs with (RUN_DIR/run_config.json); a continuation with a
different config is refused, naming the keys that differ, unless --allow-change names them (for
example more epochs). The CLIs that keep runs (moco_ray.train, moco_ray.lincls) share this.

STORAGE is a local path or a URI (moco_ray.storage); on an object store a run "exists" when any
object has its prefix, and the record is one PUT.
"""
import json
import logging
import time

from moco_ray import storage
from moco_ray.config import ConfigError

log = logging.getLogger("moco_ray")

CONFIG_FILE = "run_config.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


def add_arguments(parser, what="run", allow_change=True):
    """--resume [auto] and --allow-change, for any CLI whose runs live in STORAGE/NAME (a sweep's
    continuation changes nothing: allow_change=False)."""
    parser.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                        metavar="auto",
                        help=f"continue the {what} --name (default: the newest {what}); `--resume auto`: "
                             f"continue it if it exists, start it otherwise")
    if allow_change:
        parser.add_argument("--allow-change", action="append", default=[], metavar="KEY[,KEY]",
                            help="config keys a continuation may change, e.g. --allow-change epochs")


def allowed_changes(values):
    """The keys of --allow-change (repeatable, comma-separated)."""
    return {k.strip() for v in values for k in v.split(",") if k.strip()}


def resolve(storage_path, name, resume, default_name, what="run", marker=None):
    """(name, continuing) for --name/--resume; ConfigError when the combination cannot work.
    marker: a file that every directory of this kind holds (a sweep's spec); --resume without
    --name then continues the newest directory that holds one."""
    storage_path = storage.at(storage_path)
    if resume == "auto":
        if not name:
            raise ConfigError(f"--resume auto needs --name: the {what} to continue or to start")
        return name, (storage_path / name).is_dir()
    if name:
        exists = (storage_path / name).exists()
        if exists and not resume:
            raise ConfigError(f"{what} {name!r} already exists in {storage_path}; pass --resume "
                              f"to continue it (or --resume auto), or another --name")
        if resume and not exists:
            raise ConfigError(f"--resume: no {what} {name!r} in {storage_path}")
        return name, bool(resume)
    if resume:
        runs = sorted(_started_runs(storage_path, marker))
        if not runs:
            raise ConfigError(f"--resume: no {what}s in {storage_path}")
        return runs[-1][1], True
    return default_name or time.strftime("run-%Y%m%d-%H%M%S"), False


def _started_runs(storage_path, marker=None):
    """(when it started, name) of every run directory in storage_path; with a marker, of every
    directory that holds that file, by the file's time."""
    for name, info in storage_path.children():
        if info.type != storage.pafs.FileType.Directory:
            continue
        if marker is None:
            yield _started(storage_path / name, info), name
            continue
        found = (storage_path / name / marker).info()
        if found.type == storage.pafs.FileType.File:
            yield found.mtime.timestamp(), name


def _started(run_dir, info):
    """When the run last started (its recorded config's time; an object store's prefix has none),
    else the directory's time, else 0 (seconds since the epoch)."""
    config = (run_dir / CONFIG_FILE).info()
    when = config.mtime if config.type == storage.pafs.FileType.File else info.mtime
    return when.timestamp() if when is not None else 0.0


def plain(config):
    """A config (or value) as JSON gives it back (tuples become lists), so that two compare."""
    return json.loads(json.dumps(config, default=str))


def recorded_config(run_dir):
    path = storage.at(run_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # torn by a kill while it was written: as if never written
        log.warning("%s is unreadable; not checking the config of the continuation", path)
        return None


def check_config(run_dir, config, allowed=()):
    """ConfigError naming the keys in which `config` (a dict) differs from the one the run recorded
    (the keys in `allowed` may differ). A run without a record (started by an older version) is not
    checked, nor a key the record lacks: the run started before the key existed, so no value of it
    was recorded to keep."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        return
    config = plain(config)
    config = {k: v for k, v in config.items() if k in recorded or k in allowed}
    unknown = set(allowed) - set(config)
    if unknown:
        raise ConfigError(f"--allow-change: unknown config key(s) {', '.join(sorted(unknown))}")
    differ = sorted(k for k in set(config) | set(recorded)
                    if k not in allowed and config.get(k) != recorded.get(k))
    if differ:
        changes = ", ".join(f"{k} {recorded.get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise ConfigError(f"run {storage.at(run_dir).name!r} runs with another config: {changes}; pass "
                          f"--allow-change {','.join(differ)} if that is intended")


def record_config(run_dir, config):
    """Record the config the run runs with (atomically: a kill leaves the old record or the new)."""
    run_dir = storage.at(run_dir)
    run_dir.makedirs()
    (run_dir / CONFIG_FILE).write_text(json.dumps(plain(config), indent=1, sort_keys=True))


def set_aside_torn_ray_snapshot(run_dir):
    """Ray Train rewrites its checkpoint list in place; a driver killed in the middle leaves it torn,
    and Ray would then refuse the run. The checkpoints are found without it (moco_ray.checkpoint
    scans the run directory), so a torn one is moved aside. Returns whether it was."""
    path = storage.at(run_dir) / RAY_SNAPSHOT
    try:
        data = path.read_bytes()
        json.loads(data)
        return False
    except FileNotFoundError:
        return False
    except ValueError:   # no rename on an object store: copy, then delete
        (path.parent / (path.name + ".torn")).write_bytes(data)
        path.delete()
        log.warning("%s was torn (a killed driver); moved aside", path)
        return True
