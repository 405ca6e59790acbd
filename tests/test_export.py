"""Every export path of a CompConv model gives PyTorch's outputs: ONNX (both exporters, run in ONNX
Runtime), torch.jit.script, torch.jit.trace, torch.export."""

import pytest
import timm
import torch

import compconv
from compconv.export import export_onnx

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    return timm.create_model("resnet18_compconv128", num_classes=10).eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_onnx_runs_in_onnx_runtime_with_equal_outputs(model, tmp_path, dynamo):
    import onnx

    from compconv.export import ort_session

    report = export_onnx(model, tmp_path / "m.onnx", (3, 64, 64), batch_size=2, dynamo=dynamo)
    assert report.max_error < 1e-4 and report.deploy is not None and report.deploy.shuffles_folded > 0
    graph = onnx.load(str(report.path))
    assert report.nodes == len(graph.graph.node)
    if dynamo:
        assert report.nodes < 250  # no per-piece copy loops in the graph (the TorchScript exporter adds Identity nodes)
    x = torch.randn(3, 3, 64, 64)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(x)
    got = ort_session(report.path).run(None, {graph.graph.input[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_export_refuses_a_wrong_file_and_leaves_nothing(model, tmp_path, monkeypatch):
    import compconv.export as export

    class Wrong:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, outputs, feed):
            return [torch.zeros(2, 10).numpy()]

    monkeypatch.setattr(export, "ort_session", Wrong)
    with pytest.raises(RuntimeError, match="wrote a wrong model"):
        export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), batch_size=2, dynamo=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("deployed", [False, True])
def test_jit_script_trace_and_torch_export(model, deployed):
    import copy

    net = copy.deepcopy(model)
    if deployed:
        compconv.deploy(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(torch.jit.script(net)(x), expected)
        torch.testing.assert_close(torch.jit.trace(net, x)(x), expected)
    torch.testing.assert_close(torch.export.export(net, (x,)).module()(x), expected)


class _DictAndTuple(torch.nn.Module):
    """Outputs as segmentation models and feature pyramids return them: a dict, and a tuple inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = timm.create_model("resnet18_compconv128", features_only=True, out_indices=(2, 3))

    def forward(self, x):
        c3, c4 = self.body(x)
        return {"out": c4.mean((2, 3)), "aux": (c3, c4)}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_onnx_takes_models_returning_dicts_and_tuples(tmp_path, dynamo):
    report = export_onnx(_DictAndTuple().eval(), tmp_path / "d.onnx", (3, 64, 64), dynamo=dynamo)
    assert report.max_error < 1e-3 and report.path.exists()


@pytest.mark.slow
def test_export_onnx_of_torchvision_fcn_whose_output_is_an_ordered_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                                         aux_loss=True)
    compconv.patch(model, c0=128)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_var.fill_(4.0)  # keeps the untrained activations in range
    report = export_onnx(model.eval(), tmp_path / "fcn.onnx", (3, 64, 64), dynamo=False)
    assert report.max_error < 1e-2 and report.deploy.shuffles_folded > 0


def test_export_onnx_refuses_what_it_cannot_export_in_one_line(tmp_path):
    class ListInput(torch.nn.Module):
        def forward(self, images):
            if not isinstance(images, list):
                raise TypeError("expected a list of images")
            return torch.stack([image.sum() for image in images])

    class Strings(torch.nn.Module):
        def forward(self, x):
            return {"label": "cat", "logits": x.mean()}

    with pytest.raises(compconv.ExportError, match="does not run on one batch tensor"):
        export_onnx(ListInput(), tmp_path / "a.onnx", (3, 8, 8))
    with pytest.raises(compconv.ExportError, match="holding more than tensors"):
        export_onnx(Strings(), tmp_path / "b.onnx", (3, 8, 8))
    assert list(tmp_path.iterdir()) == []
