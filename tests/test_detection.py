"""Detection: FPN backbone on CompConv models, COCO loading and metrics, train_det.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from PIL import Image

from compconv.checks import DeployError
from compconv.detection import CocoDetection, evaluate_bbox, load_coco
from compconv.detection.coco import METRIC_NAMES
from compconv.detection.backbone import TimmFPNBackbone, build_detector
from compconv.detection.config import DetDataConfig, DetHeadConfig, DetModelConfig
from compconv.train.checkpoint import CheckpointMismatchError, model_signature, save_checkpoint
from compconv.train import build_model
from helpers import run_script, summary

SMALL_HEAD = DetHeadConfig(fpn_channels=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                           rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_compconv128", "resnet50_compconv128"])
def test_fpn_backbone_strides_and_channels(name):
    body = build_model(DetModelConfig(name=name), num_classes=0, in_chans=3, features_only=True,
                       out_indices=(1, 2, 3, 4))
    assert body.feature_info.reduction() == [4, 8, 16, 32]
    backbone = TimmFPNBackbone(body, 256)
    features = backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert {f.shape[1] for f in features.values()} == {256}


@torch.no_grad()
def test_the_box_head_width_is_set_by_the_config_and_torchvisions_stays_its_own():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    def head_widths(detector):
        return detector.roi_heads.box_head.fc7.out_features, detector.roi_heads.box_predictor.cls_score.in_features

    data = DetDataConfig(min_size=96, max_size=96)
    assert head_widths(build_detector(DetModelConfig(name="resnet18"), SMALL_HEAD, data, 11)) == (1024, 1024)
    assert head_widths(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)) == (1024, 1024)
    narrow = DetHeadConfig(**{**SMALL_HEAD.__dict__, "box_representation_size": 256})
    detector = build_detector(DetModelConfig(name="resnet18"), narrow, data, 11).eval()
    assert head_widths(detector) == (256, 256) and detector.roi_heads.box_predictor.cls_score.out_features == 11
    assert detector.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
    assert set(detector([torch.rand(3, 96, 96)])[0]) == {"boxes", "scores", "labels"}


def _write_coco(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for i in (1, 2, 3):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(root / "images" / f"{i}.jpg")
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30} for i in (1, 2, 3)],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root


def test_coco_loader_targets(tmp_path):
    root = _write_coco(tmp_path)
    train = CocoDetection(root / "images", root / "ann.json", train=True, hflip=0.0)
    assert train.ids == [1, 3]  # image 2 has no annotation: dropped for training
    assert train.num_classes == 3 and train.category_ids == [3, 7]
    image, target = train[0]
    assert image.shape == (3, 30, 40) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[5, 5, 15, 13]] and target["labels"].tolist() == [2]  # crowd box dropped
    _, target = train[1]
    assert target["boxes"].tolist() == [[30, 20, 40, 30]] and target["labels"].tolist() == [1]  # degenerate dropped, clipped
    val = CocoDetection(root / "images", root / "ann.json", train=False)
    assert val.ids == [1, 2, 3] and val[1][1]["boxes"].shape == (0, 4)
    flipped = CocoDetection(root / "images", root / "ann.json", train=True, hflip=1.0)
    assert flipped[0][1]["boxes"].tolist() == [[25, 5, 35, 13]]


def test_coco_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="lacks"):
        load_coco(tmp_path / "partial.json")


def test_cocoeval_perfect_shifted_and_empty(tmp_path):
    root = _write_coco(tmp_path)
    data = json.loads((root / "ann.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["bbox"][2] > 0]  # no degenerate ground truth
    (root / "clean.json").write_text(json.dumps(data))
    coco = load_coco(root / "clean.json")
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in data["annotations"] if not a["iscrowd"]]
    metrics = evaluate_bbox(coco, perfect, [1, 2, 3], "pycocotools")
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["APs"] == pytest.approx(100.0) and metrics["APm"] is None and metrics["APl"] is None  # all small
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]} for r in perfect]  # IoU 1/3
    assert evaluate_bbox(coco, shifted, [1, 2, 3], "pycocotools")["AP50"] == 0.0
    assert evaluate_bbox(coco, [], [1, 2, 3])["AP"] == 0.0


def test_generated_set_with_a_test_split_keeps_validation_items_out_of_training_and_test(tmp_path):
    """Validation canvases draw Fashion-MNIST training items held out of the training canvases; test canvases draw
    the test items; the record of the arguments makes a differently asked set be rewritten."""
    import json

    from compconv.detection import write_fmnist_detection
    from compconv.detection.run import _needs_writing
    from compconv.detection.synth import generation_record
    from helpers import FMNIST

    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    args = {"train_images": 12, "val_images": 6, "test_images": 6, "canvas": 96, "val_items": 1000}
    root = write_fmnist_detection(tmp_path / "det", FMNIST, **args)
    for split in ("train", "val", "test"):
        coco = json.loads((root / f"annotations/instances_{split}2017.json").read_text())
        assert len(coco["images"]) == args[f"{split}_images"] and (root / f"{split}2017").is_dir()
    annotations = ["annotations/instances_train2017.json", "annotations/instances_val2017.json",
                   "annotations/instances_test2017.json"]
    assert json.loads((root / "generate.json").read_text()) == generation_record(**args)
    assert not _needs_writing(root, annotations, args)
    assert _needs_writing(root, annotations, {**args, "train_images": 13})


def test_runs_that_start_together_write_the_generated_set_one_at_a_time(tmp_path):
    import threading

    from compconv.detection.run import _set_lock

    order = []

    def second():
        with _set_lock(tmp_path / "det"):
            order.append("second")

    with _set_lock(tmp_path / "det"):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # waits on the lock while the first writer holds it
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]


@pytest.mark.slow
def test_train_det_reads_the_generated_test_split_once(tmp_path):
    run = tmp_path / "run"
    run_script("train_det.py", run, *DET_TINY, f"data.root={tmp_path / 'det'}", "data.generate.test_images=8",
               "trainer.epochs=1", "trainer.max_train_steps=2")
    result = summary(run)
    assert result["test_images"] == 8 and result["test_AP"] is not None and result["generated"]["test_images"] == 8
    assert (run / "train_det.log").read_text().count("test (read once") == 1
    assert all(result[f"test_deployed_{name}"] == result[f"test_{name}"] for name in METRIC_NAMES)


def test_a_detector_deploy_refuses_keeps_its_test_ap_and_says_why(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from compconv.detection import run as det_run

    def refuse(model, example_input):
        raise DeployError("outputs differ")

    monkeypatch.setattr(det_run, "deploy", refuse)
    monkeypatch.setattr(det_run, "evaluate", lambda model, loader, rt, evaluator, steps: {"AP": 12.5})
    metrics = det_run.test_with_deployed(nn.Conv2d(1, 1, 1), [([torch.zeros(1, 8, 8)], [{}], 0)], SimpleNamespace(device=torch.device("cpu")))
    assert metrics == {"AP": 12.5, "deployed_error": "outputs differ"}


@pytest.mark.slow
def test_training_steps_reduce_the_loss_on_generated_data(tmp_path):
    from compconv.detection import write_fmnist_detection
    from compconv.detection.coco import collate_detection

    root = write_fmnist_detection(tmp_path / "det", train_images=8, val_images=4, canvas=96)
    data = DetDataConfig(root=str(root), min_size=96, max_size=96)
    dataset = CocoDetection(root / "train2017", root / data.train_ann, train=True, hflip=0.0)
    images, targets, _ = collate_detection([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    detector = build_detector(DetModelConfig(name="resnet18_compconv128"), SMALL_HEAD, data, dataset.num_classes)
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    detector.train()
    losses = []
    for _ in range(8):
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_backbone_checkpoint_from_classification(tmp_path):
    model = build_model(DetModelConfig(name="resnet18_compconv128"), num_classes=10, in_chans=3)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model_name": "resnet18_compconv128", "model_signature": model_signature(model),
                           "model": model.state_dict()})
    data = DetDataConfig(min_size=64, max_size=64)
    detector = build_detector(DetModelConfig(name="resnet18_compconv128", backbone_checkpoint=str(path)),
                              DetHeadConfig(frozen_bn=False, trainable_layers=5), data, 3)
    body = detector.backbone.body
    torch.testing.assert_close(body.layer2[0].conv1.convs[0].weight, model.layer2[0].conv1.convs[0].weight)
    frozen = build_detector(DetModelConfig(name="resnet18_compconv128"), DetHeadConfig(trainable_layers=3), data, 3)
    assert not any(p.requires_grad for p in frozen.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in frozen.backbone.body.layer2.parameters())
    with pytest.raises(CheckpointMismatchError, match="is from model 'resnet18_compconv128'"):
        build_detector(DetModelConfig(name="resnet18", backbone_checkpoint=str(path)), DetHeadConfig(), data, 3)


DET_TINY = ["model=resnet18_compconv128", "data.generate.train_images=16", "data.generate.val_images=8",
            "data.min_size=96", "data.max_size=96", "data.generate.canvas=96", "data.batch_size=4",
            "head.fpn_channels=64", "trainer.progress=false"]


@pytest.mark.slow
def test_a_classification_checkpoint_is_all_the_detector_needs(tmp_path):
    """train_cls.py on 1-channel Fashion-MNIST, then train_det.py with model.backbone_checkpoint only: the detector
    takes the checkpoint's input channels and normalisation; a contradicting override is one error line."""
    from helpers import FMNIST

    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    cls = tmp_path / "cls"
    run_script("train_cls.py", cls, "debug=default", "model=resnet18_compconv128", "data.train_subset=64",
               "data.val_subset=32", "data.batch_size=32")
    data_root = f"data.root={tmp_path / 'det'}"
    checkpoint = f"model.backbone_checkpoint={cls / 'last.pt'}"
    run = tmp_path / "det"
    run_script("train_det.py", run, *DET_TINY, data_root, checkpoint, "trainer.epochs=1", "trainer.max_train_steps=2")
    result = summary(run)
    assert result["backbone_checkpoint"] == str(cls / "last.pt") and result["backbone_code"]
    config = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["config"]["data"]
    assert config["in_chans"] == 1 and config["mean"] == [0.286] and config["std"] == [0.353]
    refused = run_script("train_det.py", tmp_path / "det3", *DET_TINY, data_root, checkpoint, "data.in_chans=3",
                         check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error: ConfigError: data.in_chans=3 but the backbone checkpoint")


@pytest.mark.slow
def test_the_coco_recipe_fine_tunes_an_imagefolder_checkpoint_on_coco_format_data(tmp_path):
    """README's COCO command as a lab runs it, on small real data: train_cls.py on an ImageFolder tree (RGB,
    ImageNet's normalisation), then train_det.py experiment=coco_frcnn_1x data=coco with that checkpoint."""
    from compconv.detection import write_fmnist_detection
    from helpers import FMNIST, write_imagefolder

    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    images = write_imagefolder(tmp_path / "imagefolder")
    cls = tmp_path / "cls"
    run_script("train_cls.py", cls, "data=imagefolder", f"data.root={images}", "data.img_size=32",
               "model=resnet18_compconv128", "trainer.epochs=1", "data.batch_size=8", "data.workers=0",
               "trainer.progress=false", "logger=none")
    coco = write_fmnist_detection(tmp_path / "coco", FMNIST, train_images=8, val_images=4, canvas=96)
    run = tmp_path / "det"
    run_script("train_det.py", run, "experiment=coco_frcnn_1x", f"data.root={coco}", "model=resnet18_compconv128",
               f"model.backbone_checkpoint={cls / 'last.pt'}", "data.min_size=96", "data.max_size=96",
               "data.workers=0", "trainer.epochs=1", "trainer.max_train_steps=2", "trainer.progress=false",
               "logger=none")
    result = summary(run)
    assert result["backbone_checkpoint"] == str(cls / "last.pt") and result["backbone_code"]
    assert 0.0 <= result["AP"] <= 100.0 and result["macs"] > 0
    config = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert config["data"]["name"] == "coco" and config["data"]["in_chans"] == 3
    assert config["data"]["mean"] == [0.485, 0.456, 0.406] and config["head"]["box_representation_size"] == 1024
    assert config["sched"]["milestones"] == [8, 11]


@pytest.mark.slow
def test_train_det_runs_evaluates_logs_and_resumes(tmp_path):
    run = tmp_path / "run"
    data_root = f"data.root={tmp_path / 'det'}"
    run_script("train_det.py", run, *DET_TINY, data_root, "trainer.epochs=1", "trainer.max_train_steps=2")
    first = summary(run)
    assert first["task"] == "detection" and first["dataset"] == "fmnist_det" and first["epochs"] == 1
    assert set(("AP", "AP50", "AP75", "APs", "APm", "APl")) <= set(first) and first["history"][0]["val/images"] == 8
    assert first["backbone_macs"] > 0 and first["macs"] > first["backbone_macs"] and first["c0"] == 128
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))

    run_script("train_det.py", run, *DET_TINY, data_root, "trainer.epochs=2", "trainer.max_train_steps=2")
    second = summary(run)
    assert second["epochs"] == 2 and second["history"][0] == first["history"][0]  # epoch 1 came from last.pt


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["data=coco", "data.root=/nonexistent/coco"], "does not exist"),
    (["data=fashion_mnist"], "is a classification dataset"),
])
def test_train_det_bad_input(tmp_path, overrides, message):
    proc = run_script("train_det.py", tmp_path / "run", *overrides, "logger=none", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_train_det_malformed_annotations(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text("{oops")
    proc = run_script("train_det.py", tmp_path / "run", "data=coco", f"data.root={root}", "logger=none", check=False)
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr
    assert not list((tmp_path / "run").glob("*.pt"))


@torch.no_grad()
def test_deploy_takes_the_detector_of_train_det_and_checks_its_boxes_scores_labels():
    """The detector train_det.py trains (a list of images in, a list of dicts out, frozen BatchNorms): deploy
    traces its backbone (the whole detector is not traceable), folds there, and checks the detector's outputs."""
    import copy

    import compconv

    torch.manual_seed(0)
    detector = build_detector(DetModelConfig(name="resnet18_compconv128"), SMALL_HEAD,
                              DetDataConfig(min_size=96, max_size=96), 11).eval()
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    expected = detector(images)
    deployed = copy.deepcopy(detector)
    report = compconv.deploy(deployed, images)
    assert not report.traced and report.traced_parts == ["backbone"]
    assert report.shuffles_folded > 0 and report.norms_absorbed
    assert all("residual sum" in reason for reason in report.left.values())  # as in the classifier
    assert any(type(m).__module__ == "compconv.inference.forms" for m in deployed.modules())
    for got, want in zip(deployed(images), expected):
        assert set(got) == {"boxes", "scores", "labels"} and torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    with pytest.raises(compconv.ExportError, match=r"detector .*export its backbone"):
        compconv.export_onnx(detector, "unused.onnx", (3, 96, 96))
    assert not Path("unused.onnx").exists()
