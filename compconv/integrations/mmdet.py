"""mmdetection 3.x backbone: any timm/CompConv ResNet as ``type='CompConvResNet'``, registered in mmdet's
``MODELS`` on import (``custom_imports = dict(imports=['compconv.integrations.mmdet'])``; see
``configs/mmdet/``). Needs mmengine and mmdet (``scripts/setup_mmdet.sh``).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import timm
import torch
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from torch import nn

from ..detection.backbone import load_backbone_checkpoint

# Children of a timm ResNet in forward order; mmdet's frozen_stages=k freezes the stem and layer1..k.
_STEM = ("conv1", "bn1")
_STAGES = ("layer1", "layer2", "layer3", "layer4")


@MODELS.register_module()
class CompConvResNet(BaseModule):
    """A ``features_only`` timm ResNet (plain or CompConv-patched) as an mmdet backbone.

    Follows mmdet's ``ResNet`` conventions for ``frozen_stages`` and ``norm_eval`` so the standard
    Faster R-CNN recipes carry over; the feature maps are those of the timm model.

    Args:
        model_name: A timm model name, e.g. ``resnet50_compconv128`` or ``resnet50``.
        out_indices: timm feature indices (``1..4`` are layer1..layer4 at strides 4..32; 0 is the stem).
        frozen_stages: -1 trains everything; 0 freezes the stem; k freezes the stem and layer1..layer k.
        norm_eval: Keep every BatchNorm in eval mode during training (running statistics frozen).
        checkpoint: A ``last.pt``/``best.pt`` of ``train_cls.py`` for the same ``model_name``; loaded by
            :meth:`init_weights`. ``None`` keeps timm's initialisation (training from scratch).
        compconv: CompConv options other than C_0 (``{"tail": "dense"}``), passed to the timm model.
        in_chans: Input channels.
        init_cfg: mmengine's init config; use ``checkpoint`` for train_cls checkpoints instead.
    """

    def __init__(self, model_name: str = "resnet50_compconv128", out_indices: Sequence[int] = (1, 2, 3, 4),
                 frozen_stages: int = 1, norm_eval: bool = True, checkpoint: str | None = None,
                 compconv: dict[str, Any] | None = None, in_chans: int = 3,
                 init_cfg: dict | list[dict] | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not -1 <= frozen_stages <= len(_STAGES):
            raise ValueError(f"frozen_stages must be in -1..{len(_STAGES)}, got {frozen_stages}")
        if not timm.is_model(model_name):
            raise ValueError(f"unknown timm model '{model_name}' (CompConv models: resnet50_compconv128, ...)")
        kwargs = {"compconv": dict(compconv)} if compconv else {}
        self.model_name = model_name
        self.body = timm.create_model(model_name, pretrained=False, features_only=True,
                                      out_indices=tuple(out_indices), in_chans=in_chans, **kwargs)
        missing = [n for n in _STEM + _STAGES if not hasattr(self.body, n)]
        if frozen_stages >= 0 and missing:
            raise ValueError(f"{model_name} is not a timm ResNet (no {missing}); use frozen_stages=-1")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.checkpoint = checkpoint
        self.out_channels = tuple(self.body.feature_info.channels())
        self._freeze_stages()

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        names = _STEM + _STAGES[:self.frozen_stages]
        return [getattr(self.body, n) for n in names]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            module.requires_grad_(False)

    def init_weights(self) -> None:
        """Loads ``checkpoint`` (a train_cls.py checkpoint) when given, else mmengine's ``init_cfg``."""
        if self.checkpoint:
            load_backbone_checkpoint(self.body, self.checkpoint, self.model_name)
            return
        super().init_weights()
        if self.init_cfg is None and (self.frozen_stages >= 0 or self.norm_eval):
            warnings.warn(
                f"CompConvResNet({self.model_name}) has no checkpoint, so frozen_stages={self.frozen_stages} / "
                f"norm_eval={self.norm_eval} freeze randomly initialised layers or statistics: give "
                "model.backbone.checkpoint=<train_cls last.pt>, or train from scratch with frozen_stages=-1, "
                "norm_eval=False", stacklevel=2)

    def train(self, mode: bool = True) -> "CompConvResNet":
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(x))
