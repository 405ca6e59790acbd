"""mmdetection integration (configs/mmdet, compconv.integrations.mmdet).

Runs only where mmdet and mmcv's compiled ops import: in the environment scripts/setup_mmdet.sh
builds (``make test-mmdet``). Elsewhere every test here is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdet not installed: run scripts/setup_mmdet.sh and make test-mmdet")
pytest.importorskip("mmcv.ops", reason="mmcv was built without compiled ops (scripts/setup_mmdet.sh builds them)")

import mmdet  # noqa: E402
import timm  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from helpers import FMNIST, ROOT  # noqa: E402

CONFIG = ROOT / "configs/mmdet/faster-rcnn_r50-compconv128_fpn_1x_coco.py"


@pytest.fixture(scope="module")
def cfg() -> Config:
    init_default_scope("mmdet")
    return Config.fromfile(str(CONFIG))  # also imports custom_imports, i.e. registers CompConvResNet


def _build(spec):
    return MODELS.build(spec)


def test_config_uses_the_compconv_backbone(cfg):
    assert cfg.custom_imports.imports == ["compconv.integrations.mmdet"]
    assert cfg.model.backbone.type == "CompConvResNet"
    assert "depth" not in cfg.model.backbone  # mmdet's ResNet keys were deleted, not merged
    assert cfg.train_cfg.max_epochs == 12 and cfg.optim_wrapper.optimizer.lr == 0.02  # the 1x recipe


@pytest.mark.parametrize("name, channels", [("resnet50_compconv128", (256, 512, 1024, 2048)),
                                            ("resnet18", (64, 128, 256, 512))])
def test_backbone_strides_channels_and_frozen_stages(cfg, name, channels):
    backbone = _build(dict(type="CompConvResNet", model_name=name, frozen_stages=1, norm_eval=True))
    features = backbone(torch.randn(1, 3, 64, 96))
    assert tuple(f.shape[1] for f in features) == channels == backbone.out_channels
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.split(".")[1] in ("conv1", "bn1", "layer1") for n in frozen)
    assert any(p.requires_grad for n, p in backbone.named_parameters() if ".layer2." in f".{n}")
    backbone.train()
    assert backbone.training and not any(m.training for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_backbone_rejects_bad_arguments(cfg):
    with pytest.raises(ValueError, match="unknown timm model"):
        _build(dict(type="CompConvResNet", model_name="resnet50_compconv127"))
    with pytest.raises(ValueError, match="frozen_stages"):
        _build(dict(type="CompConvResNet", frozen_stages=5))


def test_backbone_warns_when_freezing_random_weights(cfg):
    with pytest.warns(UserWarning, match="no checkpoint"):
        _build(dict(type="CompConvResNet", model_name="resnet18")).init_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(dict(type="CompConvResNet", model_name="resnet18", frozen_stages=-1, norm_eval=False)).init_weights()


def test_backbone_loads_a_train_cls_checkpoint(cfg, tmp_path):
    from compconv.train.checkpoint import CheckpointMismatchError

    source = timm.create_model("resnet18_compconv128", num_classes=10)
    torch.save({"model_name": "resnet18_compconv128", "model": source.state_dict()}, tmp_path / "last.pt")
    backbone = _build(dict(type="CompConvResNet", model_name="resnet18_compconv128",
                           checkpoint=str(tmp_path / "last.pt")))
    backbone.init_weights()
    expected = source.state_dict()
    loaded = backbone.body.state_dict()
    assert len(loaded) > 50 and all(torch.equal(v, expected[k]) for k, v in loaded.items())
    other = _build(dict(type="CompConvResNet", model_name="resnet18", checkpoint=str(tmp_path / "last.pt")))
    with pytest.raises(CheckpointMismatchError, match="resnet18_compconv128"):
        other.init_weights()


def _batch(num_classes: int = 80):
    torch.manual_seed(0)
    inputs, samples = [], []
    for h, w in ((160, 192), (128, 160)):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 40.0, 120.0, 100.0]]),
                                           labels=torch.tensor([3, num_classes - 1]))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def test_detector_from_config_trains_one_step_and_infers(cfg):
    """The issue's acceptance test: the config's detector, one SGD step and one inference on CPU."""
    detector = _build(cfg.model)
    detector.init_weights()
    optim_wrapper = build_optim_wrapper(detector, cfg.optim_wrapper)
    before = {n: p.detach().clone() for n, p in detector.named_parameters()}
    detector.train()
    log_vars = detector.train_step(_batch(), optim_wrapper)
    print("mmdet train_step:", {k: round(float(torch.as_tensor(v).detach()), 4) for k, v in log_vars.items()})
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss"} <= set(log_vars)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in log_vars.values())
    changed = {n for n, p in detector.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("backbone.body.layer4") for n in changed)
    assert any(n.startswith("roi_head.bbox_head") for n in changed)
    assert not any(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in changed)

    detector.eval()
    detector.roi_head.test_cfg.score_thr = 0.0  # after one step no score passes the config's 0.05
    batch = _batch()
    with torch.no_grad():
        results = detector.test_step(batch)
    assert len(results) == 2
    for result, image in zip(results, batch["inputs"]):
        pred = result.pred_instances
        print("mmdet test_step:", len(pred.bboxes), "boxes, top scores", [f"{v:.1e}" for v in pred.scores[:3].tolist()])
        assert 0 < len(pred.bboxes) == len(pred.scores) == len(pred.labels) <= 100  # max_per_img of the 1x config
        h, w = image.shape[-2:]
        assert (pred.bboxes[:, 0::2] <= w).all() and (pred.bboxes[:, 1::2] <= h).all() and (pred.bboxes >= 0).all()
        assert ((pred.labels >= 0) & (pred.labels < 80)).all()


def _tools_train() -> Path:
    path = Path(mmdet.__file__).parent / ".mim/tools/train.py"
    if not path.is_file():
        pytest.skip(f"this mmdet install has no {path}")
    return path


@pytest.mark.slow
def test_tools_train_runs_the_config_on_generated_coco(tmp_path):
    """mmdet's own tools/train.py on a small generated COCO-format set: 2 epochs + COCO bbox eval."""
    from compconv.detection.synth import CLASSES, write_fmnist_detection

    data = write_fmnist_detection(tmp_path / "fmnist_det", FMNIST, train_images=16, val_images=8, canvas=128)
    small = tmp_path / "small.py"
    small.write_text(f"""
_base_ = {str(CONFIG)!r}
data_root = {str(data) + '/'!r}
metainfo = dict(classes={tuple(CLASSES)!r})
# score_thr 0: after 8 iterations from scratch no score passes 0.05, and COCOeval needs detections
model = dict(roi_head=dict(bbox_head=dict(num_classes={len(CLASSES)})), test_cfg=dict(rcnn=dict(score_thr=0.0)))
pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(160, 128), keep_ratio=True), dict(type='RandomFlip', prob=0.5),
            dict(type='PackDetInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(160, 128), keep_ratio=True),
                 dict(type='LoadAnnotations', with_bbox=True),
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=pipeline,
                                     ann_file='annotations/instances_train2017.json',
                                     data_prefix=dict(img='train2017/')))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
                                   ann_file='annotations/instances_val2017.json', data_prefix=dict(img='val2017/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=2, val_interval=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
optim_wrapper = dict(optimizer=dict(lr=0.01))
default_hooks = dict(logger=dict(interval=1))
""")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(_tools_train()), str(small), "--work-dir", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-6000:])
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    assert "coco/bbox_mAP:" in log and "Epoch(train) [2]" in log
    assert (tmp_path / "work/epoch_2.pth").is_file()
