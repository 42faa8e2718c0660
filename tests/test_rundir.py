"""The run's recorded config against a continuation's (rundir.check_config), on a local run directory."""
import pytest

from moco_ray import config as C, rundir


def test_a_key_the_record_predates_is_not_a_change(tmp_path):
    cfg = C.preset("demo")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_every_s", "method")}
    rundir.record_config(tmp_path / "r", old)          # a run started before the two keys existed
    rundir.check_config(tmp_path / "r", cfg.to_dict())
    with pytest.raises(C.ConfigError, match=rf"epochs {cfg.epochs} -> 7; pass --allow-change epochs"):
        rundir.check_config(tmp_path / "r", C.apply_overrides(cfg, {"epochs": 7}).to_dict())
