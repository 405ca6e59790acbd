"""Every config composes into a valid TrainConfig; experiments compose with --cfg job; SLURM launcher composes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import compconv
from compconv.train import ConfigError, TrainConfig
from helpers import ROOT, run_script

CONFIGS = ROOT / "configs"
GROUPS = ["model", "data", "optim", "sched", "trainer", "logger", "launcher", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train_cls", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    cfg = _compose(overrides + ["data.root=/data"] if option in ("imagenet", "imagefolder", "imagenet_r50") else overrides)
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra")
    values["run_dir"] = "/tmp/x"
    config = TrainConfig.from_dict(values)
    if group == "model":
        assert config.model.name == option
    if group == "launcher" and option == "slurm":
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


def test_every_registered_model_has_a_config():
    assert set(compconv.models.registered_model_names()) <= set(_options("model"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiments_print_with_cfg_job(experiment):
    proc = run_script("train_cls.py", None, f"experiment={experiment}", "data.root=/data", "--cfg", "job")
    job = yaml.safe_load(proc.stdout)
    assert job["experiment"] == experiment


def test_imagenet_recipe_values():
    cfg = _compose(["experiment=imagenet_r50", "data.root=/data"])
    assert (cfg.trainer.epochs, cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.weight_decay) == (100, 0.1, 256, 1e-4)
    assert (cfg.sched.name, cfg.trainer.label_smoothing, cfg.data.img_size) == ("cosine", 0.1, 224)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.lrr'\]"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="trainer.epochs='two' has the wrong type"):
        TrainConfig.from_dict({"trainer": {"epochs": "two"}})
    with pytest.raises(ConfigError, match="optim.name='lion' is invalid"):
        TrainConfig.from_dict({"optim": {"name": "lion"}})
    with pytest.raises(ConfigError, match="milestones"):
        TrainConfig.from_dict({"sched": {"name": "multistep"}})
