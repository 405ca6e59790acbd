"""One schema: every config composes into its entry point's dataclasses, group files hold only differences,
every registered model is a ``model=`` option, and bad keys or values are named."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import compconv
from compconv import CompConvOptions
from entrypoints import describe_config_error, register_configs
from compconv.detection import DetTrainConfig
from compconv.detection.config import DetDataConfig, DetHeadConfig
from compconv.train import ConfigError, TrainConfig
from compconv.train.config import DataConfig, LoggerConfig, OptimConfig, SchedConfig, TrainerConfig
from entrypoints import model_options
from helpers import ROOT, run_script

CONFIGS = ROOT / "configs"
SCHEMAS = {"train_cls": TrainConfig, "train_det": DetTrainConfig}
FILE_GROUPS = ["data", "optim", "sched", "trainer", "logger", "launcher", "experiment", "head", "debug"]
DETECTION_ONLY = {("data", "coco"), ("data", "fmnist_det"), ("experiment", "coco_frcnn_1x"),
                  ("experiment", "coco_frcnn_2x"), ("experiment", "fmnist_det_study")}
CLASSIFICATION_ONLY = {("data", "fashion_mnist"), ("data", "imagenet"), ("data", "imagefolder"),
                       ("experiment", "imagenet_r50"), ("experiment", "fmnist_study")}
NEEDS_ROOT = {"imagenet", "imagefolder", "imagenet_r50", "coco", "coco_frcnn_1x", "coco_frcnn_2x"}
GROUP_SCHEMA = {"optim": OptimConfig, "sched": SchedConfig, "trainer": TrainerConfig, "logger": LoggerConfig,
                "head": DetHeadConfig}

for _entry, _schema in SCHEMAS.items():
    register_configs(_entry, _schema)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(entry: str, overrides: list[str], hydra_node: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(entry, overrides=overrides, return_hydra_config=hydra_node)


def _build(entry: str, overrides: list[str]):
    """What the entry point does: compose, resolve, merge into the schema, instantiate the dataclasses."""
    cfg = _compose(entry, ["run_dir=/tmp/x", *overrides])
    values = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SCHEMAS[entry]), values))


def _cases():
    for group in FILE_GROUPS:
        for option in _options(group):
            if group != "head" and (group, option) not in DETECTION_ONLY:
                yield "train_cls", group, option
            if (group, option) not in CLASSIFICATION_ONLY:
                yield "train_det", group, option


@pytest.mark.parametrize("entry, group, option", list(_cases()))
def test_every_config_composes_and_validates(entry, group, option):
    overrides = [f"{group}={option}"] + (["data.root=/data"] if option in NEEDS_ROOT else [])
    config = _build(entry, overrides)
    assert isinstance(config, SCHEMAS[entry])
    if group == "launcher" and option == "slurm":
        launcher = _compose(entry, overrides, hydra_node=True).hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0


@pytest.mark.parametrize("entry", list(SCHEMAS))
def test_the_defaults_are_the_schemas(entry):
    """With no overrides, a run's config is the dataclasses' defaults, except what the entry point's own file changes."""
    config = _build(entry, [])
    expected = SCHEMAS[entry]()
    differing = {f.name for f in dataclasses.fields(expected) if getattr(config, f.name) != getattr(expected, f.name)}
    # the model= option spells out the registered model's CompConv options, which the schema leaves implicit
    assert config.model.name == expected.model.name and config.model.compconv == CompConvOptions(c0=128).as_dict()
    assert differing - {"model"} == ({"run_dir"} if entry == "train_cls" else {"run_dir", "optim", "sched", "trainer", "head"})


@pytest.mark.parametrize("group, option", [(g, o) for g in ["data", *GROUP_SCHEMA] for o in _options(g)])
def test_group_files_hold_only_differences(group, option):
    values = yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text()) or {}
    values.pop("defaults", None)
    schema = GROUP_SCHEMA.get(group) or (DetDataConfig if option in ("coco", "fmnist_det") else DataConfig)
    defaults = dataclasses.asdict(schema())
    assert set(values) <= set(defaults), f"{option}.yaml has keys the schema lacks"
    repeated = [k for k, v in values.items() if k != "name" and v == defaults[k]]
    assert not repeated, f"{group}/{option}.yaml repeats the schema's defaults for {repeated}"


def test_every_registered_model_and_its_base_is_an_option():
    names = compconv.models.registered_model_names()
    options = model_options()
    assert set(names) <= set(options) and {"resnet50", "resnet18", "vgg16", "vgg16_bn", "resnet101"} <= set(options)
    assert not (CONFIGS / "model").exists()  # generated from the registry, no file per model
    for name in ("resnet50_compconv64", "resnet50_ghost", "vgg16"):
        config = _build("train_cls", [f"model={name}"])
        assert config.model.name == name
        assert (config.model.compconv or {}).get("c0") == (64 if name.endswith("64") else None)
    config = _build("train_cls", ["model=resnet50_compconv128", "model.compconv.c0=256"])
    assert config.model.compconv["c0"] == 256 and config.model.compconv["tail"] == "depthwise"
    det = _build("train_det", ["model=resnet18_compconv128", "model.backbone_checkpoint=/x/last.pt"])
    assert det.model.name == "resnet18_compconv128" and det.model.backbone_checkpoint == "/x/last.pt"


@pytest.mark.slow
@pytest.mark.parametrize("entry, experiment", [("train_cls", e) for e in ("imagenet_r50", "fmnist_study")] +
                         [("train_det", e) for e in ("coco_frcnn_1x", "coco_frcnn_2x", "fmnist_det_study")])
def test_experiments_print_with_cfg_job(entry, experiment):
    proc = run_script(f"{entry}.py", None, f"experiment={experiment}", "data.root=/data", "--cfg", "job")
    job = yaml.safe_load(proc.stdout)
    assert job["experiment"] == experiment


def test_every_experiment_is_covered():
    assert set(_options("experiment")) == {"imagenet_r50", "fmnist_study", "coco_frcnn_1x", "coco_frcnn_2x",
                                           "fmnist_det_study"}


def test_the_detection_study_names_each_run_by_model_start_seed_and_schedule():
    checkpoint = "model.backbone_checkpoint=/runs/${model.name}_s${seed}_e16/last.pt"
    for overrides, subdir in ((["model=resnet18_compconv128", "seed=2", checkpoint], "resnet18_compconv128_pre_s2_e12"),
                              (["model=resnet18", "seed=0"], "resnet18_scratch_s0_e12")):
        cfg = _compose("train_det", ["experiment=fmnist_det_study", *overrides], hydra_node=True)
        assert cfg.hydra.sweep.subdir == subdir
    config = _build("train_det", ["experiment=fmnist_det_study", "model=resnet18", "seed=1", checkpoint])
    assert config.model.backbone_checkpoint == "/runs/resnet18_s1_e16/last.pt"
    assert config.data.generate["test_images"] == 1000 and config.head.box_representation_size == 256


def test_recipes():
    cfg = _build("train_cls", ["experiment=imagenet_r50", "data.root=/data"])
    assert (cfg.trainer.epochs, cfg.optim.lr, cfg.optim.lr_base_batch, cfg.optim.weight_decay) == (100, 0.1, 256, 1e-4)
    assert (cfg.sched.name, cfg.sched.warmup_epochs, cfg.trainer.label_smoothing) == ("cosine", 5, 0.1)
    assert (cfg.data.img_size, cfg.data.num_classes, cfg.data.eval_batch_size, cfg.optim.name) == (224, 1000, 256, "momentum")
    det = _build("train_det", ["experiment=coco_frcnn_1x", "data.root=/data"])
    assert (det.trainer.epochs, det.sched.milestones, det.optim.lr, det.optim.lr_base_batch) == (12, [8, 11], 0.02, 16)
    assert (det.data.min_size, det.data.max_size, det.head.rpn_post_nms_top_n_test) == (800, 1333, 1000)
    assert (det.sched.warmup_epochs, det.sched.warmup_start_factor, det.data.batch_size) == (0.25, 0.001, 2)
    det2 = _build("train_det", ["experiment=coco_frcnn_2x", "data.root=/data"])
    assert (det2.trainer.epochs, det2.sched.milestones) == (26, [16, 22])


def _composition_error(entry: str, overrides: list[str]) -> str:
    with pytest.raises(Exception) as info:
        _build(entry, overrides)
    return describe_config_error(info.value)


def test_config_errors_name_the_key():
    assert _composition_error("train_cls", ["optim.lrr=1"]).startswith("unknown config key optim.lrr")
    assert _composition_error("train_cls", ["+trainer.speed=1"]).startswith("unknown config key trainer.speed")
    assert _composition_error("train_cls", ["trainer.epochs=two"]).startswith("trainer.epochs: Value 'two'")
    assert _composition_error("train_cls", ["model=resnet5"]).startswith("model=resnet5 is not an option; choose one of")
    assert _composition_error("train_cls", ["data=coco"]) == "data=coco is a detection dataset: use train_det.py"
    assert _composition_error("train_det", ["data=imagenet"]).endswith("is a classification dataset: use train_cls.py")
    with pytest.raises(ConfigError, match="optim.name='lion2' is invalid"):
        OptimConfig(name="lion2")
    with pytest.raises(ConfigError, match="milestones"):
        SchedConfig(name="multistep")
    with pytest.raises(ConfigError, match="missing required value data.root"):
        DataConfig(name="imagenet")
    with pytest.raises(ConfigError, match="trainer.amp='fp8' is invalid"):
        _build("train_cls", ["trainer.amp=fp8"])


@pytest.mark.parametrize("entry", ["train_cls", "train_det"])
def test_hydra_settings_live_once_in_configs_hydra(entry):
    text = (CONFIGS / f"{entry}.yaml").read_text()
    assert "\nhydra:" not in text and "- hydra: default" in text
    node = _compose(entry, ["debug=default"], hydra_node=True).hydra
    assert node.callbacks.run_dir_lock._target_ == "entrypoints.RunDirLock"
    assert node.run.dir.startswith("outputs/debug/") and node.job.chdir is False
