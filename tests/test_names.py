"""Names that tell the truth: a run of a registered model with other CompConv options says so, and a
variant registered with a suffix is offered by the entry points."""

from __future__ import annotations

import timm
import torch

from compconv.models import model_label, register_variant, variant_options
from compconv.train import TrainConfig, run_classification
from compconv.train.config import DataConfig, LoggerConfig, ModelConfig, TrainerConfig
from entrypoints import model_options
from helpers import summary


def test_model_label_names_the_options_that_differ():
    assert model_label("resnet50_compconv128", None) == "resnet50_compconv128"
    assert model_label("resnet50_compconv128", {"c0": 128}) == "resnet50_compconv128"
    assert model_label("resnet50_compconv128", {"c0": 256, "tail": "dense"}) == \
        "resnet50_compconv128-c0_256-tail_dense"
    assert model_label("resnet50", None) == "resnet50"


def test_a_suffixed_variant_is_an_option_with_its_own_options():
    register_variant("resnet18_compconv128_dense", "resnet18", c0=128, tail="dense")
    option = model_options()["resnet18_compconv128_dense"]
    assert option["compconv"]["tail"] == "dense" and option["compconv"]["c0"] == 128
    assert variant_options("resnet18_compconv128_dense")["tail"] == "dense"
    model = timm.create_model("resnet18_compconv128_dense", num_classes=3)
    assert model.compconv_report.options.tail == "dense"
    assert model_label("resnet18_compconv128_dense", option["compconv"]) == "resnet18_compconv128_dense"


def test_run_with_other_options_is_labelled_in_summary_and_checkpoint(tmp_path):
    cfg = TrainConfig(
        model=ModelConfig(name="resnet18_compconv128", compconv={"c0": 256}), run_dir=str(tmp_path),
        data=DataConfig(train_subset=32, val_subset=32, batch_size=32, eval_batch_size=32),
        trainer=TrainerConfig(epochs=1, progress=False), logger=LoggerConfig(name="none"))
    run_classification(cfg)
    result = summary(tmp_path)
    assert result["model"] == "resnet18_compconv128-c0_256" and result["model_name"] == "resnet18_compconv128"
    assert result["c0"] == 256
    assert torch.load(tmp_path / "last.pt", weights_only=True)["model_name"] == "resnet18_compconv128-c0_256"
