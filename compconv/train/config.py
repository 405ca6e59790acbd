"""Typed, validated configuration of a training run (no Hydra needed: built from any nested mapping).

Unknown keys and invalid values raise :class:`ConfigError` naming the key and what is allowed, so
a bad command line fails at start-up, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from ..options import CompConvOptions


class ConfigError(ValueError):
    pass


def _check_choice(path: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{path}={value!r} is invalid; choose one of {list(choices)}")


def _check_positive(path: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    """A timm model name (``resnet50``, ``resnet50_compconv128``...) and its options.

    ``compconv`` overrides the CompConv options of a CompConv model (e.g. ``{"tail": "dense"}``);
    it must be null for a baseline.
    """

    name: str = "resnet50_compconv128"
    compconv: Optional[dict] = None
    drop_path_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)

    def validate(self, path: str) -> None:
        if self.compconv is not None:
            try:
                CompConvOptions.from_mapping(self.compconv)
            except ValueError as error:
                raise ConfigError(f"{path}.compconv: {error}") from error
        _check_positive(f"{path}.drop_path_rate", self.drop_path_rate, allow_zero=True)


@dataclass
class DataConfig:
    """Dataset and loader settings; see ``configs/data/*.yaml`` for each dataset's defaults."""

    name: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    img_size: int = 32
    in_chans: int = 1
    num_classes: Optional[int] = 10
    mean: list = field(default_factory=lambda: [0.2860])
    std: list = field(default_factory=lambda: [0.3530])
    batch_size: int = 128
    eval_batch_size: int = 256
    workers: int = 0
    prefetch_factor: int = 4
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    skip_bad: bool = False
    crop_padding: int = 4
    hflip: float = 0.5
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    color_jitter: Optional[float] = None

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.name", self.name, ("fashion_mnist", "imagenet", "imagefolder"))
        for key in ("img_size", "in_chans", "batch_size", "eval_batch_size", "num_classes", "train_subset", "val_subset"):
            _check_positive(f"{path}.{key}", getattr(self, key))
        _check_positive(f"{path}.workers", self.workers, allow_zero=True)
        _check_positive(f"{path}.prefetch_factor", self.prefetch_factor)
        if len(self.mean) != len(self.std):
            raise ConfigError(f"{path}.mean and {path}.std must have the same length")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"{path}.crop_pct={self.crop_pct} must be in (0, 1]")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"{path}.hflip={self.hflip} must be a probability")


@dataclass
class OptimConfig:
    """Optimizer. ``lr`` is for ``lr_base_batch`` images; it is scaled linearly to the global batch
    when ``lr_base_batch`` is set (e.g. 0.1 x batch/256)."""

    name: str = "sgd"
    lr: float = 0.1
    lr_base_batch: Optional[int] = None
    momentum: float = 0.9
    nesterov: bool = False
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    wd_on_norm_and_bias: bool = False

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.name", self.name, ("sgd", "adamw"))
        _check_positive(f"{path}.lr", self.lr)
        _check_positive(f"{path}.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive(f"{path}.lr_base_batch", self.lr_base_batch)


@dataclass
class SchedConfig:
    """Per-step schedule: linear warmup, then cosine to ``min_lr_factor`` x lr, multistep or constant."""

    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.0
    milestones: list = field(default_factory=list)
    gamma: float = 0.1

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.name", self.name, ("cosine", "multistep", "constant"))
        _check_positive(f"{path}.warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.name == "multistep" and not self.milestones:
            raise ConfigError(f"{path}.milestones must list epochs when {path}.name=multistep")


@dataclass
class TrainerConfig:
    """Loop settings. ``resume``: ``auto`` (continue from ``<run_dir>/last.pt`` if present),
    ``never``, or a checkpoint path. ``amp``: ``auto`` = bf16 on CUDA, off on CPU."""

    epochs: int = 2
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    clip_grad: Optional[float] = None
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None
    resume: str = "auto"
    eval_only: bool = False
    max_train_steps: Optional[int] = None
    max_eval_steps: Optional[int] = None
    progress: bool = True
    deterministic: bool = False
    log_interval: int = 50
    sync_bn: bool = False
    sync_debug: bool = False

    def validate(self, path: str) -> None:
        _check_positive(f"{path}.epochs", self.epochs)
        _check_choice(f"{path}.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice(f"{path}.amp", self.amp, ("auto", "off", "bf16", "fp16"))
        _check_positive(f"{path}.clip_grad", self.clip_grad)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{path}.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"{path}.ema_decay={self.ema_decay} must be in (0, 1) or null")
        _check_positive(f"{path}.max_train_steps", self.max_train_steps)
        _check_positive(f"{path}.max_eval_steps", self.max_eval_steps)
        _check_positive(f"{path}.log_interval", self.log_interval)


@dataclass
class LoggerConfig:
    """``wandb`` (offline unless ``mode=online`` or the WANDB_MODE environment variable says so) or ``none``."""

    name: str = "wandb"
    project: str = "compconv"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None
    tags: list = field(default_factory=list)

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.name", self.name, ("wandb", "none"))
        _check_choice(f"{path}.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class RunConfig:
    """Fields, validation and (de)serialisation shared by the run configs of every entry point."""

    #: dataset names that belong to another entry point, and what to use instead
    other_task_datasets: ClassVar[dict[str, str]] = {}

    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    experiment: Optional[str] = None
    command: Optional[str] = None

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Builds and validates a config from nested mappings (e.g. ``OmegaConf.to_container(cfg)``)."""
        data = values.get("data", {})
        name = data.get("name") if isinstance(data, Mapping) else None
        if name in cls.other_task_datasets:
            raise ConfigError(f"data={name} is a {cls.other_task_datasets[name]}")
        config = _build(cls, values, "")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """A whole classification run."""

    other_task_datasets: ClassVar[dict[str, str]] = {
        name: "detection dataset: use train_det.py" for name in ("coco", "fmnist_det")}

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (list, dict, str, bool):
        return isinstance(value, (tuple, list) if hint is list else hint)
    return True


def _build(cls: type, values: Mapping[str, Any], path: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint, key = hints[name], f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
            continue
        if not _accepts(hint, value):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected {hint}")
        if hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)):
            value = float(value) if value is not None else None
        kwargs[name] = list(value) if isinstance(value, tuple) else value
    return cls(**kwargs)
