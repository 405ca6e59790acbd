"""deploy() and export_onnx() over architectures nobody here wrote folds for: each model is either equal
to the user's model or refused with DeployError, leaving it untouched. Never a silent wrong model."""

from __future__ import annotations

import copy
import importlib

import pytest
import timm
import torch
import torchvision
from torch import nn

from helpers import break_absorbed_norms, randomise_norms

import compconv
from compconv import deploy
from compconv.inference import ROUNDING_SHARE, DeployError, forms, rounding_error, tolerance_for
from compconv.testing.zoo import EXPORTED, ZOO, prepared

FAST = ["preact_cifar", "two_consumers", "shared_conv", "tv_resnet18"]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _snapshot(model: nn.Module) -> tuple[list, dict]:
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _same(model: nn.Module, snapshot) -> bool:
    structure, state = snapshot
    now = model.state_dict()
    return ([(n, type(m)) for n, m in model.named_modules()] == structure and now.keys() == state.keys()
            and all(torch.equal(now[k], state[k]) for k in state))


@pytest.mark.parametrize("runtime", ["torch", "ort"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in ZOO])
@torch.no_grad()
def test_deploy_is_equal_or_refused(name, runtime):
    model = prepared(name)
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    snapshot = _snapshot(model)
    try:
        report = deploy(model, runtime=runtime)
    except DeployError:
        assert _same(model, snapshot)  # refused: the user's model is untouched
        return
    assert _relative(model(x), reference) <= tolerance_for(torch.float32)  # on an input deploy did not see
    assert report.max_error <= report.tolerance == 1e-4
    assert not model.training


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in EXPORTED])
def test_export_onnx_is_equal_to_the_users_model_or_refused(name, tmp_path):
    pytest.importorskip("onnxruntime")
    size = 224 if name == "tv_vgg11_bn" else 64  # the TorchScript exporter cannot pool 2x2 to VGG's 7x7
    model = prepared(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
    snapshot = _snapshot(model)
    try:
        report = compconv.export_onnx(model, tmp_path / "m.onnx", (3, size, size), batch_size=2, dynamo=False)
    except DeployError:
        assert not (tmp_path / "m.onnx").exists()
        return
    assert _same(model, snapshot)  # export works on a copy
    from compconv.onnxrt import ort_session

    session = ort_session(report.path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert _relative(got, reference) <= 1e-4


@torch.no_grad()
def test_a_wrong_fold_is_refused_naming_the_layer_and_the_model_is_untouched(monkeypatch):
    def forgets_the_norm(conv, norm):  # drops the shuffle but leaves the norm's channels in place: wrong
        source = compconv.shuffle.shuffle_source(conv.out_channels, conv.shuffle_groups)
        conv.shuffle_groups = 1
        return source

    monkeypatch.setattr(importlib.import_module("compconv.inference.pipeline"), "fold_shuffle", forgets_the_norm)
    model = prepared("tv_resnet18")
    model.train()
    snapshot = _snapshot(model)
    with pytest.raises(DeployError, match=r"differs from the model's by .* first at layer layer\d\.\d\.conv2") as error:
        deploy(model)
    assert "The model was not changed" in str(error.value)
    assert _same(model, snapshot) and model.training  # modes restored too


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.conv = compconv.CompConv2d(64, 128, 1, bias=False, depth=2)
        self.bn = nn.BatchNorm2d(128)

    def forward(self, x):
        y = self.bn(self.conv(self.stem(x)))
        if y.mean() > 0:  # FX cannot trace a branch on a tensor's value
            y = y * 2
        return y


@torch.no_grad()
def test_untraceable_model_gets_per_module_forms_only():
    model = _DataDependent().eval()
    model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    report = deploy(model)
    assert not report.traced and "TraceError" in report.trace_error
    assert report.left == {"conv": "not traced"} and report.biases_folded == 0
    assert isinstance(model.bn, nn.BatchNorm2d)  # no neighbour fold without the graph
    assert report.forms()["chain"] + report.forms()["dense"] == 1
    assert _relative(model(x), reference) <= 1e-5
    assert "per-module forms only" in str(report)


@torch.no_grad()
def test_report_says_why_folds_were_left_out():
    model = prepared("two_consumers")
    report = deploy(model)
    assert report.left["conv"] == "shuffle kept: relu: its output has 2 users"
    assert "| conv |" in report.left_table()
    effnet = deploy(prepared("timm_efficientnet_b0"))
    assert any("BatchNormAct2d" in reason and "not by a BatchNorm2d" in reason for reason in effnet.left.values())


@torch.no_grad()
def test_timm_reparameterize_model_gives_each_layer_its_inference_form():
    """timm's convention (``fuse()`` on the module): each CompConv becomes its checked per-layer form; the folds
    that need neighbours (norms, shuffles) are deploy()'s, so the model keeps timm's plain classes around them."""
    from compconv.inference import LowRankConv2d, rule_choice

    model = timm.create_model("resnet50_compconv128", num_classes=10).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.weight.uniform_(0.8, 1.2)
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    fused = timm.utils.reparameterize_model(model)
    assert _relative(fused(x), reference) <= 1e-4
    layers = {n: m for n, m in model.named_modules() if isinstance(m, compconv.CompConv2d)}
    forms = {"dense": nn.Conv2d, "lowrank": LowRankConv2d, "chain": compconv.CompConv2d}
    for name, layer in layers.items():
        form = rule_choice(compconv.CompConv2d.from_layer(layer)) if layer.kernel_size == (1, 1) else "chain"
        assert type(fused.get_submodule(name)) is forms[form], name
    assert {type(m) for m in fused.modules()} & {compconv.EfficientCompConv2d} == set()
    assert type(fused.layer1) is nn.Sequential and isinstance(fused.bn1, nn.BatchNorm2d)
    assert type(model.layer1[0].conv1) is compconv.EfficientCompConv2d  # reparameterize_model works on a copy


@torch.no_grad()
def test_timm_reparameterize_model_in_benchmark_scripts_order():
    """timm's benchmark.py reparameterizes the model as create_model returns it (training mode) and calls eval()
    after; the model's eval outputs are kept."""
    from compconv.inference import LowRankConv2d

    model = timm.create_model("resnet50_compconv128", num_classes=10)
    assert model.training
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.bias.uniform_(-0.2, 0.2)
    reference = copy.deepcopy(model).eval()
    fused = timm.utils.reparameterize_model(model)
    assert fused.training
    fused.eval()
    x = torch.randn(2, 3, 64, 64)
    assert _relative(fused(x), reference(x)) <= 1e-4
    assert any(isinstance(m, LowRankConv2d) for m in fused.modules())


def test_deploy_forms_are_pure_functions_of_the_layer():
    conv = compconv.CompConv2d(256, 64, 1, depth=2, bias=False).double().eval()
    weight = conv.convs[0].weight.clone()
    dense = compconv.lowrank.build_form(conv, None, "dense")
    assert torch.equal(conv.convs[0].weight, weight) and isinstance(dense, nn.Conv2d)
    with pytest.raises(ValueError, match="form must be"):
        compconv.lowrank.build_form(conv, None, "chain")


class Cancelling(nn.Module):
    """Output ``(1e4 h + 1) - 1e4 h + 1e-3 h``: float32 rounds ``1e4 h + 1`` to steps of about 1e-3, so rounding
    alone moves the output by 1e-4 to 1e-3 of its size (float64: 1e-12)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # the patcher keeps a stem conv
        self.conv = nn.Conv2d(16, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)

    def forward(self, x):
        h = self.bn(self.conv(self.stem(x)))
        return (h * 1e4 + 1.0) - h * 1e4 + h * 1e-3


@torch.no_grad()
def test_a_model_its_own_rounding_moves_is_refused_unless_the_tolerance_allows_it():
    torch.manual_seed(0)
    model = Cancelling()
    compconv.patch(model, c0=16)
    model.eval()
    assert any(isinstance(m, compconv.CompConv2d) for m in model.modules())
    x = torch.randn(2, 3, 16, 16)
    rounding = rounding_error(model, x)
    assert rounding > 1e-4  # the float64 copy disagrees with float32 by more than deploy's whole tolerance
    snapshot = _snapshot(model)
    with pytest.raises(DeployError, match="rounding alone moves them.*deploy it in float64"):
        deploy(model, x)
    assert _same(model, snapshot)
    # the same model in float64 is exact to its rounding, and deploys
    report = deploy(copy.deepcopy(model).double(), x.double())
    assert report.rounding_error is None and report.max_error < 1e-9
    # a tolerance the model's rounding fits in accepts it, and says what rounding was measured
    report = deploy(model, x, tolerance=rounding / ROUNDING_SHARE * 1.01)
    assert report.rounding_error == pytest.approx(rounding)


class Thresholding(nn.Module):
    """A traceable body, then a data-dependent branch (so the model traces only in parts) and a comparison of two
    values equal in exact arithmetic, as a detector's NMS decides near-ties: the last bit of the body's output flips
    some of the model's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:
            h = h - h.mean()
        return (h * 3 / 3 > h).float()  # a tie in exact arithmetic, decided by the last bit


class Scaled(nn.Module):
    """A part of two inputs (features and a scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Thresholding().body

    def forward(self, x, scale):
        return self.body(x) * scale


class ThresholdingTwoInputs(Thresholding):
    def __init__(self) -> None:
        super().__init__()
        self.body = Scaled()

    def forward(self, x):
        h = self.body(x, 2.0)
        if h.sum() > 0:
            h = h - h.mean()
        return (h * 3 / 3 > h).float()


@torch.no_grad()
def test_a_model_traced_in_parts_whose_outputs_rounding_moves_is_checked_part_by_part(monkeypatch):
    torch.manual_seed(0)
    model = Thresholding()
    compconv.patch(model, c0=16)
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert rounding_error(model, x) > 1e-4  # the thresholded outputs flip under float64
    deployed = copy.deepcopy(model)
    report = deploy(deployed, x)
    assert report.traced_parts == ["body"] and report.checked_parts == ["body"] and report.max_error < 1e-4
    assert any(type(m).__module__ == "compconv.inference.forms" for m in deployed.modules())
    torch.testing.assert_close(deployed.body(x), model.body(x), rtol=1e-4, atol=1e-5)
    # a part of two inputs cannot be checked on its own: refused, the model left as it was
    torch.manual_seed(0)
    two = ThresholdingTwoInputs()
    compconv.patch(two, c0=16)
    two.eval()
    snapshot = _snapshot(two)
    with pytest.raises(DeployError, match="part body takes 2 positional"):
        deploy(two, x)
    assert _same(two, snapshot)
    # a wrong rewrite inside the part is still refused, and the model is left as it was
    break_absorbed_norms(monkeypatch)
    snapshot = _snapshot(model)
    with pytest.raises(DeployError, match="differs from the model's"):
        deploy(model, x)
    assert _same(model, snapshot)


@torch.no_grad()
def test_rounding_is_measured_only_where_it_can_be():
    model = timm.create_model("resnet18_compconv128", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert rounding_error(model, x) < 1e-5
    assert rounding_error(model.bfloat16(), x.bfloat16()) is None  # half precision: not measured

    class Float32Only(nn.Module):  # an operator without a float64 kernel
        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("float32 only")
            return x

    assert rounding_error(Float32Only(), x) is None


@torch.no_grad()
def test_a_model_that_does_not_run_on_the_check_input_is_refused_with_the_fix():
    model = torchvision.models.inception_v3(num_classes=10, aux_logits=False, init_weights=True)
    compconv.patch(model, c0=128)
    model.eval()
    snapshot = _snapshot(model)
    with pytest.raises(DeployError, match=r"does not run on an input of shape \(1, 3, 64, 64\).*pass example_input"):
        deploy(model)  # torchvision models carry no input size: deploy tries 64x64, too small for inception
    assert _same(model, snapshot)
