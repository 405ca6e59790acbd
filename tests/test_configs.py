"""Every config composes into a valid run config of its entry point; experiments compose with --cfg job."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import compconv
from compconv.detection import DetTrainConfig
from compconv.train import ConfigError, TrainConfig
from helpers import ROOT, run_script

CONFIGS = ROOT / "configs"
GROUPS = ["model", "data", "optim", "sched", "trainer", "logger", "launcher", "experiment", "head"]
DETECTION_ONLY = {("data", "coco"), ("data", "fmnist_det"), ("experiment", "coco_frcnn_1x"),
                  ("experiment", "coco_frcnn_2x")}
CLASSIFICATION_ONLY = {("data", "fashion_mnist"), ("data", "imagenet"), ("data", "imagefolder"),
                       ("experiment", "imagenet_r50"), ("experiment", "fmnist_study")}
NEEDS_ROOT = {"imagenet", "imagefolder", "imagenet_r50", "coco", "coco_frcnn_1x", "coco_frcnn_2x"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def _cases():
    for group in GROUPS:
        for option in _options(group):
            if group != "head" and (group, option) not in DETECTION_ONLY:
                yield "train_cls", group, option
            if (group, option) not in CLASSIFICATION_ONLY:
                yield "train_det", group, option


@pytest.mark.parametrize("entry, group, option", list(_cases()))
def test_every_config_composes_and_validates(entry, group, option):
    overrides = [f"{group}={option}"] + (["data.root=/data"] if option in NEEDS_ROOT else [])
    cfg = _compose(entry, overrides)
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra")
    values["run_dir"] = "/tmp/x"
    config = (TrainConfig if entry == "train_cls" else DetTrainConfig).from_dict(values)
    if group == "model":
        assert config.model.name == option
    if group == "launcher" and option == "slurm":
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


def test_every_registered_model_has_a_config():
    assert set(compconv.models.registered_model_names()) <= set(_options("model"))


@pytest.mark.slow
@pytest.mark.parametrize("entry, experiment", [("train_cls", e) for e in ("imagenet_r50", "fmnist_study")] +
                         [("train_det", e) for e in ("coco_frcnn_1x", "coco_frcnn_2x")])
def test_experiments_print_with_cfg_job(entry, experiment):
    proc = run_script(f"{entry}.py", None, f"experiment={experiment}", "data.root=/data", "--cfg", "job")
    job = yaml.safe_load(proc.stdout)
    assert job["experiment"] == experiment


def test_every_experiment_is_covered():
    assert set(_options("experiment")) == {"imagenet_r50", "fmnist_study", "coco_frcnn_1x", "coco_frcnn_2x"}


def test_recipes():
    cfg = _compose("train_cls", ["experiment=imagenet_r50", "data.root=/data"])
    assert (cfg.trainer.epochs, cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.weight_decay) == (100, 0.1, 256, 1e-4)
    assert (cfg.sched.name, cfg.trainer.label_smoothing, cfg.data.img_size) == ("cosine", 0.1, 224)
    det = _compose("train_det", ["experiment=coco_frcnn_1x", "data.root=/data"])
    assert (det.trainer.epochs, list(det.sched.milestones), det.optim.lr, det.optim.lr_base_batch) == (12, [8, 11], 0.02, 16)
    assert (det.data.min_size, det.data.max_size, det.head.rpn_post_nms_top_n_test) == (800, 1333, 1000)
    det2 = _compose("train_det", ["experiment=coco_frcnn_2x", "data.root=/data"])
    assert (det2.trainer.epochs, list(det2.sched.milestones)) == (26, [16, 22])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.lrr'\]"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="trainer.epochs='two' has the wrong type"):
        TrainConfig.from_dict({"trainer": {"epochs": "two"}})
    with pytest.raises(ConfigError, match="optim.name='lion' is invalid"):
        TrainConfig.from_dict({"optim": {"name": "lion"}})
    with pytest.raises(ConfigError, match="milestones"):
        TrainConfig.from_dict({"sched": {"name": "multistep"}})
    with pytest.raises(ConfigError, match="detection dataset"):
        TrainConfig.from_dict({"data": {"name": "coco"}})
