"""Faster R-CNN + FPN on a timm backbone (any CompConv model), as torchvision's detection API expects."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..train.checkpoint import CheckpointMismatchError
from ..train.config import ConfigError
from ..train import build_model

# timm ResNet stage names, deepest first (torchvision's trainable_layers convention).
_RESNET_STAGES = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))


class TimmFPNBackbone(nn.Module):
    """``features_only`` timm model + FPN (+ max-pooled P6); ``out_channels`` as FasterRCNN needs."""

    def __init__(self, body: nn.Module, fpn_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def load_backbone_checkpoint(body: nn.Module, path: str | Path, model_name: str) -> None:
    """Initialises ``body`` from a train_cls.py checkpoint of the same model (classifier weights ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_checkpoint {path} does not exist (a last.pt from train_cls.py)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("model_name") != model_name:
        raise CheckpointMismatchError(f"backbone checkpoint {path} is from model '{state.get('model_name')}', "
                                      f"this detector's backbone is '{model_name}'")
    weights = state["model"]
    own = body.state_dict()
    missing = [k for k in own if k not in weights]
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or wrong:
        raise CheckpointMismatchError(
            f"backbone checkpoint {path} does not fit: missing {missing[:3]}, shape mismatch {wrong[:3]} "
            "(same model, data.in_chans as in classification?)")
    body.load_state_dict({k: weights[k] for k in own})


GENERATED_SET_MEAN, GENERATED_SET_STD = 0.286, 0.353  # the generated Fashion-MNIST canvases


def input_settings(model_cfg, data_cfg):
    """``data_cfg`` with ``in_chans``, ``mean`` and ``std`` filled in: the backbone checkpoint's (its classification
    run's ``data``) where one is given, else 3 channels with the generated set's statistics. A value set by hand that
    contradicts the checkpoint is refused in one line that names what to set.
    """
    wanted = {}
    if model_cfg.backbone_checkpoint and Path(model_cfg.backbone_checkpoint).is_file():
        state = torch.load(model_cfg.backbone_checkpoint, map_location="cpu", weights_only=True)
        trained = (state.get("config") or {}).get("data") or {}
        wanted = {k: trained[k] for k in ("in_chans", "mean", "std") if trained.get(k) is not None}
    for key, value in wanted.items():
        given = getattr(data_cfg, key)
        if given is not None and (list(given) if isinstance(given, (list, tuple)) else given) != value:
            raise ConfigError(
                f"data.{key}={given} but the backbone checkpoint {model_cfg.backbone_checkpoint} was trained with "
                f"data.{key}={value}: drop data.{key} to follow the checkpoint "
                f"(data.in_chans={wanted.get('in_chans')} data.mean={wanted.get('mean')} data.std={wanted.get('std')})")
    in_chans = data_cfg.in_chans or wanted.get("in_chans") or 3
    mean = data_cfg.mean or wanted.get("mean") or [GENERATED_SET_MEAN] * in_chans
    std = data_cfg.std or wanted.get("std") or [GENERATED_SET_STD] * in_chans
    return dataclasses.replace(data_cfg, in_chans=in_chans, mean=list(mean), std=list(std))


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freezes all but the ``trainable_layers`` deepest stages (0..5) of a timm ResNet body."""
    names = {name for name, _ in body.named_children()}
    trainable = {n for stage in _RESNET_STAGES[:trainable_layers] for n in stage}
    if trainable_layers < 5 and not {"layer1", "layer4"} <= names:
        raise ConfigError("head.trainable_layers < 5 needs a ResNet-style backbone (layer1..layer4); "
                          "use head.trainable_layers=5 for this model")
    for name, child in body.named_children():
        if name not in trainable:
            child.requires_grad_(False)


def _box_head(head_cfg, num_classes: int) -> dict:
    """FasterRCNN's box head arguments: torchvision's own (built inside, 1024 wide) or, for another width, a
    ``TwoMLPHead`` and ``FastRCNNPredictor`` of ``head.box_representation_size`` (7x7 RoI features, as torchvision)."""
    width = head_cfg.box_representation_size
    if width == 1024:
        return {"num_classes": num_classes}
    return {"box_head": TwoMLPHead(head_cfg.fpn_channels * 7 * 7, width),
            "box_predictor": FastRCNNPredictor(width, num_classes)}


def build_detector(model_cfg, head_cfg, data_cfg, num_classes: int) -> FasterRCNN:
    """Faster R-CNN + FPN whose backbone is the (CompConv-patched) timm model of ``model_cfg``."""
    data_cfg = input_settings(model_cfg, data_cfg)
    body = build_model(model_cfg, num_classes=0, in_chans=data_cfg.in_chans, features_only=True,
                       out_indices=tuple(head_cfg.out_indices))
    if model_cfg.backbone_checkpoint:
        load_backbone_checkpoint(body, model_cfg.backbone_checkpoint, model_cfg.name)
    if head_cfg.frozen_bn:
        body = timm.layers.freeze_batch_norm_2d(body)
    freeze_stages(body, head_cfg.trainable_layers)
    backbone = TimmFPNBackbone(body, head_cfg.fpn_channels)
    detector = FasterRCNN(
        backbone, **_box_head(head_cfg, num_classes), min_size=data_cfg.min_size, max_size=data_cfg.max_size,
        image_mean=list(data_cfg.mean), image_std=list(data_cfg.std),
        box_score_thresh=head_cfg.box_score_thresh, box_detections_per_img=head_cfg.detections_per_img,
        rpn_pre_nms_top_n_train=head_cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=head_cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=head_cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=head_cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=head_cfg.box_batch_size_per_image,
    )
    detector.compconv_report = getattr(body, "compconv_report", None)
    return detector
