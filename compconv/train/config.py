"""The schema of a classification run: typed dataclasses holding every default once. The entry points register
them as Hydra structured configs; each checks its values in ``__post_init__`` and raises :class:`ConfigError`
naming the key. Nothing here imports Hydra or OmegaConf.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..options import CompConvOptions


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def check_choice(key: str, value: Any, choices: tuple, hint: str = "") -> None:
    """Raises :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is invalid; choose one of {list(choices)}{hint}")


def check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
    """Raises :class:`ConfigError` if ``value`` is below zero (or zero, unless ``allow_zero``); None passes."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_fraction(key: str, value: float, closed_high: bool = True) -> None:
    """Raises :class:`ConfigError` unless ``0 <= value <= 1`` (``< 1`` when not ``closed_high``)."""
    if not (0 <= value <= 1 if closed_high else 0 <= value < 1):
        raise ConfigError(f"{key}={value} must be in [0, 1{']' if closed_high else ')'}")


@dataclass
class ModelConfig:
    """A timm model name (``resnet50``, ``resnet50_compconv128``...) and its options.

    Attributes:
        name: Any timm model; every model this package registers is also a ``model=`` option.
        compconv: CompConv options of a CompConv model (:class:`compconv.CompConvOptions` fields);
            null for a baseline, or to use the registered model's own options.
        drop_path_rate: Stochastic depth rate.
        kwargs: Further keyword arguments of ``timm.create_model`` (e.g. ``{ghost: {ratio: 3}}``).
    """

    name: str = "resnet50_compconv128"
    compconv: Any = None  # a mapping or null (typed Any: OmegaConf cannot merge a mapping into a null dict node)
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compconv is not None and not isinstance(self.compconv, dict):
            raise ConfigError(f"model.compconv={self.compconv!r} must be a mapping of CompConv options or null")
        if self.compconv is not None:
            try:
                CompConvOptions.from_mapping(self.compconv)
            except ValueError as error:
                raise ConfigError(f"model.compconv: {error}") from error
        check_positive("model.drop_path_rate", self.drop_path_rate, allow_zero=True)


CLASSIFICATION_DATASETS = ("fashion_mnist", "imagenet", "imagefolder")
DETECTION_DATASETS = ("coco", "fmnist_det")


@dataclass
class DataConfig:
    """Classification data and loader; the defaults are Fashion-MNIST's (Debian's ``dataset-fashion-mnist``),
    ``configs/data/*.yaml`` hold the rest. Fashion-MNIST trains with a padded random crop and a flip; ImageNet /
    ImageFolder with RandomResizedCrop and a flip, and evaluates on a centre crop of ``crop_pct``.
    """

    name: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    img_size: int = 32
    in_chans: int = 1
    num_classes: Optional[int] = 10  # null: inferred from the class folders
    mean: list[float] = field(default_factory=lambda: [0.2860])
    std: list[float] = field(default_factory=lambda: [0.3530])
    batch_size: int = 128  # per process
    eval_batch_size: int = 512
    workers: int = 0  # Fashion-MNIST is in-memory uint8: worker processes cost more than they save on 2 cores
    prefetch_factor: int = 4  # batches each worker loads ahead; workers persist across epochs
    train_subset: Optional[int] = None  # first N training images (quick runs)
    val_subset: Optional[int] = None
    # val_split > 0: that many training images (class-stratified, fixed by split_seed) are the validation set of
    # every epoch, and the dataset's evaluation split (Fashion-MNIST's test set, ImageFolder's val/) is the test set,
    # read once after the last epoch; 0: every epoch validates on the evaluation split (ImageNet's convention)
    val_split: int = 0
    split_seed: int = 0
    test_subset: Optional[int] = None
    skip_bad: bool = False  # skip and count unreadable images instead of stopping
    crop_padding: int = 4  # Fashion-MNIST's random crop
    hflip: float = 0.5
    crop_pct: float = 0.875  # ImageFolder evaluation: centre crop fraction
    interpolation: str = "bilinear"
    color_jitter: Optional[float] = None

    def __post_init__(self) -> None:
        if self.name in DETECTION_DATASETS:
            raise ConfigError(f"data={self.name} is a detection dataset: use train_det.py")
        check_choice("data.name", self.name, CLASSIFICATION_DATASETS)
        for key in ("img_size", "in_chans", "batch_size", "eval_batch_size", "num_classes", "train_subset",
                    "val_subset", "test_subset", "prefetch_factor"):
            check_positive(f"data.{key}", getattr(self, key))
        check_positive("data.val_split", self.val_split, allow_zero=True)
        check_positive("data.workers", self.workers, allow_zero=True)
        if self.name != "fashion_mnist" and self.root == DataConfig.root:
            raise ConfigError(f"missing required value data.root for data={self.name}: pass data.root=/path/to/images")
        if len(self.mean) != len(self.std):
            raise ConfigError("data.mean and data.std must have the same length")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"data.crop_pct={self.crop_pct} must be in (0, 1]")
        check_fraction("data.hflip", self.hflip)


@dataclass
class OptimConfig:
    """A timm optimizer (``timm.optim.create_optimizer_v2``) with the learning rate scaled to the global batch.

    Attributes:
        name: A timm optimizer name: ``momentum`` (SGD with classical momentum, the default), ``sgd``
            (timm's: SGD with Nesterov momentum), ``adamw``, ``lamb``... (``timm.optim.list_optimizers()``).
        lr: Learning rate for ``lr_base_batch`` images, scaled linearly to the global batch; used as is
            when ``lr_base_batch`` is null.
        weight_decay: Applied to weights; none on norm and bias parameters unless ``wd_on_norm_and_bias``.
        kwargs: Further arguments of the optimizer (``momentum`` is 0.9 unless set; ``betas``, ``eps``...).
    """

    name: str = "momentum"
    lr: float = 0.1
    lr_base_batch: Optional[int] = 256
    weight_decay: float = 1e-4
    wd_on_norm_and_bias: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from timm.optim import list_optimizers

        check_choice("optim.name", self.name, tuple(list_optimizers()), " (timm.optim.list_optimizers())")
        check_positive("optim.lr", self.lr)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("optim.lr_base_batch", self.lr_base_batch)


SCHEDULES = ("cosine", "multistep", "constant")


@dataclass
class SchedConfig:
    """Per-step learning-rate schedule (timm's): a linear warmup from ``warmup_start_factor`` x lr, then ``cosine``
    to ``min_lr_factor`` x lr, ``multistep`` decay by ``gamma`` at each of ``milestones``, or ``constant``.
    """

    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.0  # cosine only
    milestones: list[int] = field(default_factory=list)  # multistep only
    gamma: float = 0.1  # multistep only

    def __post_init__(self) -> None:
        check_choice("sched.name", self.name, SCHEDULES)
        check_positive("sched.warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_fraction("sched.warmup_start_factor", self.warmup_start_factor)
        if self.name == "multistep" and not self.milestones:
            raise ConfigError("sched.milestones must list epochs when sched.name=multistep")


@dataclass
class TrainerConfig:
    """The loop.

    Attributes:
        device: ``auto`` (``cuda:LOCAL_RANK`` when a GPU is visible), ``cpu`` or ``cuda``.
        amp: ``auto`` (bf16 on CUDA, off on CPU), ``off``, ``bf16`` or ``fp16``.
        clip_grad: Maximum gradient norm; null = off.
        ema_decay: Weight EMA (timm's ModelEmaV3), e.g. 0.9998; null = none.
        resume: ``auto`` (the newest loadable ``last.pt``/``prev.pt``/``best.pt`` of the run directory),
            ``never``, or a checkpoint path.
        eval_only: Evaluate the checkpoint given by ``resume`` and write ``eval.json``.
        max_train_steps / max_eval_steps: Cap the steps per epoch (smoke tests).
        deterministic: ``torch.use_deterministic_algorithms`` (warn only).
        log_interval: Steps between the loop's host syncs: progress-bar loss, non-finite check, stop agreement.
        sync_bn: ``nn.SyncBatchNorm`` under DDP on GPUs.
        sync_debug: CUDA: raise on any host sync inside a training step (``scripts/gpu_check.sh``).
        threads: ``torch.set_num_threads`` for this process (CPU intra-op threads); null keeps torch's default.
            Results are bitwise repeatable on one CPU kind only at a fixed thread count.
        stop_after_epoch: End the run after this epoch (checkpoint and summary written) without changing its
            schedule, which still spans ``epochs``: a long run's epoch k can be re-checked in k epochs.
        check_training_forms: Before training, one forward + backward of a batch of two at the training input
            size with CompConv's factorised training forms and one as Figure 2 is written must agree (outputs,
            input and parameter gradients within 1e-2 relative; fp32); otherwise the run stops with an error.
    """

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
    check_training_forms: bool = True
    threads: Optional[int] = None
    stop_after_epoch: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("epochs", "clip_grad", "max_train_steps", "max_eval_steps", "log_interval", "threads",
                    "stop_after_epoch"):
            check_positive(f"trainer.{key}", getattr(self, key))
        check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("trainer.amp", self.amp, ("auto", "off", "bf16", "fp16"))
        check_fraction("trainer.label_smoothing", self.label_smoothing, closed_high=False)
        if self.stop_after_epoch is not None and self.stop_after_epoch > self.epochs:
            raise ConfigError(f"trainer.stop_after_epoch={self.stop_after_epoch} is past trainer.epochs={self.epochs}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be in (0, 1) or null")


@dataclass
class LoggerConfig:
    """``wandb`` (offline unless ``mode=online`` or WANDB_MODE says otherwise; sync later with
    ``wandb sync <run_dir>/wandb/offline-run-*``) or ``none``."""

    name: str = "wandb"
    project: str = "compconv"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("logger.name", self.name, ("wandb", "none"))
        check_choice("logger.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class RunConfig:
    """Fields shared by the run configs of every entry point.

    Attributes:
        run_dir: Where checkpoints, summaries and wandb files go (the entry points use Hydra's output dir).
        experiment: Set by ``experiment=...``; names the wandb run and the table row.
        command: The command line that started the run (set by the entry point; kept in the summary).
    """

    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_dir: str = "runs/default"
    experiment: Optional[str] = None
    command: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (for checkpoints, summaries and wandb)."""
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """A whole classification run (``train_cls.py``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
