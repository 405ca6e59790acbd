"""deploy's residual sums written into the shortcut: equal outputs, in place only where the dataflow proves nothing
reads the shortcut afterwards, out of place everywhere else (blocks called alone, hooks, autograd, graph capture)."""

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import randomise_norms

from compconv import deploy
from compconv.deploy import DonatingSequential, ResidualConv2d
from compconv.deploy.residual import ResidualLowRankConv2d


class _InPlaceSums(TorchDispatchMode):
    """Counts the in-place conv + sum calls of a forward."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_convolution_pointwise_" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _close(got, want):
    """Equal within deploy's tolerance: 1e-4 of the largest |value|."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _deployed(name="resnet50_compconv128"):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    randomise_norms(model)
    model.eval().to(memory_format=torch.channels_last)
    original = copy.deepcopy(model)
    report = deploy(model)
    return original, model, report


@pytest.mark.parametrize("stride, kernel, channels_last, relu", [(1, 1, True, True), (2, 1, True, True),
                                                                  (1, 3, False, False), (2, 3, False, True)])
@torch.no_grad()
def test_residual_conv_equals_conv_plus_shortcut_in_place_and_out_of_place(stride, kernel, channels_last, relu):
    conv = nn.Conv2d(8, 16, kernel, stride, kernel // 2)
    fused = ResidualConv2d.from_conv(conv, relu)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 10, 10).to(memory_format=fmt)
    shortcut = torch.randn_like(conv(x)).to(memory_format=fmt)
    want = conv(x) + shortcut
    want = want.relu() if relu else want
    kept = shortcut.clone()
    torch.testing.assert_close(fused(x, shortcut, False), want)
    assert torch.equal(shortcut, kept)  # not owned: the shortcut is untouched
    got = fused(x, shortcut, True)
    torch.testing.assert_close(got, want)
    assert got.data_ptr() == shortcut.data_ptr()  # owned: written into the shortcut
    torch.testing.assert_close(fused(x), conv(x))  # one argument: the plain conv


def test_residual_conv_sums_out_of_place_under_autograd():
    conv = nn.Conv2d(4, 4, 1)
    fused = ResidualConv2d.from_conv(conv, True)
    x, shortcut = torch.randn(1, 4, 5, 5, requires_grad=True), torch.randn(1, 4, 5, 5)
    y = fused(x, shortcut, True)
    assert y.data_ptr() != shortcut.data_ptr()
    y.sum().backward()
    assert x.grad is not None


@torch.no_grad()
def test_deployed_resnet_writes_its_sums_in_place_and_keeps_outputs():
    original, model, report = _deployed()
    # the sums after a dense or low-rank conv (a chain-form layer is no plain conv): the first block of each stage
    # into the tensor it made, the others into their input
    assert len(report.residual_sums) >= 12 and not report.residual_left
    assert all(isinstance(model.get_submodule(name), (ResidualConv2d, ResidualLowRankConv2d))
               for name in report.residual_sums)
    assert all(isinstance(model.get_submodule(name.split(".")[0]), DonatingSequential) for name in report.residual_sums)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with _InPlaceSums() as mode:
        got = model(x)
    assert mode.count == len(report.residual_sums)
    torch.testing.assert_close(got, original(x), rtol=1e-4, atol=1e-4)
    assert report.max_error <= report.tolerance


@torch.no_grad()
def test_fused_blocks_never_write_into_what_others_hold():
    original, model, _ = _deployed()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    # a block called alone sums out of place: the caller's tensor is untouched
    block_input = original.layer1[:1](original.maxpool(original.act1(original.bn1(original.conv1(x)))))
    kept = block_input.clone()
    with _InPlaceSums() as mode:
        _close(model.layer1[1](block_input), original.layer1[1](kept))
    assert mode.count == 0 and torch.equal(block_input, kept)
    # timm's forward_intermediates hands out every stage's output
    want = original.forward_intermediates(x, intermediates_only=True)
    got = model.forward_intermediates(x, intermediates_only=True)
    for g, w in zip(got, want):
        _close(g, w)
    # a forward hook keeping the outputs of each block: in place would change them after the hook ran
    kept_outputs = {"original": [], "deployed": []}
    for key, net in (("original", original), ("deployed", model)):
        for block in net.layer2:
            block.register_forward_hook(lambda m, a, out, key=key: kept_outputs[key].append(out))
        net(x)
    assert len(kept_outputs["deployed"]) == len(kept_outputs["original"]) == 4
    for g, w in zip(kept_outputs["deployed"], kept_outputs["original"]):
        _close(g, w)


class _Block(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if self.mode == "reads_conv_input":  # conv(x) + x: the conv reads the memory it would write
            return F.relu(self.conv2(x) + x)
        y = self.conv2(F.relu(self.conv1(x)))
        if self.mode == "reads_after":  # the shortcut is read again after the sum
            return (y + x) * x
        if self.mode == "returns_shortcut":
            return y + x, x
        return F.relu(y + x)


class _KeepsBuffer(nn.Module):
    """Returns a view of its own buffer: the next block's input is not the stage's to give."""

    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.randn(1, 8, 6, 6))

    def forward(self, x):
        return self.state.expand_as(x)


@pytest.mark.parametrize("stage, fused, reason", [
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 1), _Block("plain"), _Block("plain")), 2, None),
    (lambda: nn.Sequential(_Block("plain")), 0, "stage hands it"),  # the stage's input: its caller may hold it
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 1), _Block("reads_after")), 0, "after the sum"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 1), _Block("reads_conv_input")), 0, "conv reads"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 1), _Block("returns_shortcut")), 0, "returns the shortcut"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 1), _KeepsBuffer(), _Block("plain")), 0, "stage hands it"),
])
@torch.no_grad()
def test_sums_are_fused_only_where_the_dataflow_proves_the_shortcut_private(stage, fused, reason):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), stage()).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    report = deploy(model, x)
    assert len(report.residual_sums) == fused
    if reason:
        assert any(reason in why for why in report.residual_left.values()), report.residual_left
    want, got = original(x), model(x)
    for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
        torch.testing.assert_close(g, w)


@torch.no_grad()
def test_fused_model_pickles_copies_scripts_compiles_and_exports():
    original, model, report = _deployed()
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    want = original(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for net in (loaded, copy.deepcopy(model)):
        with _InPlaceSums() as mode:
            torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-4)
        assert mode.count == len(report.residual_sums)
    torch.testing.assert_close(torch.jit.script(copy.deepcopy(model))(x), want, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)
    exported = torch.export.export(model, (x,))
    assert not any("mkldnn" in str(node.target) for node in exported.graph.nodes)  # runs anywhere: the plain sum
    torch.testing.assert_close(exported.module()(x), want, rtol=1e-4, atol=1e-4)
    traced = torch.jit.trace(copy.deepcopy(model), x)
    assert "mkldnn" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-4)
    fresh = timm.create_model("resnet50_compconv128", num_classes=10)
    deploy(fresh)
    fresh.load_state_dict(model.state_dict())  # the state dict keys are those of a deployed model


@torch.no_grad()
def test_fused_blocks_keep_every_submodule_name_and_class():
    import importlib

    deploy_module = importlib.import_module("compconv.deploy")
    _, model, report = _deployed()
    unfused = timm.create_model("resnet50_compconv128", num_classes=10).eval()
    real = deploy_module.fuse_residual_sums
    deploy_module.fuse_residual_sums = lambda m, t: ([], {})
    try:
        deploy(unfused)
    finally:
        deploy_module.fuse_residual_sums = real
    fused_blocks = {".".join(name.split(".")[:2]) for name in report.residual_sums}
    got = {n: type(m).__name__ for n, m in model.named_modules() if n and n not in fused_blocks}
    want = {n: type(m).__name__ for n, m in unfused.named_modules() if n and n not in fused_blocks}
    renamed = {"Conv2d": "ResidualConv2d", "LowRankConv2d": "ResidualLowRankConv2d",
               "ReparameterizableStage": "ReparameterizableStage"}
    assert got.keys() == want.keys()
    for name in got:  # the fused convs change class; everything else keeps it (downsample stays a Sequential)
        assert got[name] == want[name] or (name in report.residual_sums and got[name] == renamed[want[name]]), name
    model.get_submodule("layer1.0.downsample.1")


def _dynamo_graph(model, x):
    """The single graph dynamo records for ``model(x)`` (``fullgraph``: no graph break), and the output."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert len(graphs) == 1
    return [str(node.target) for node in graphs[0].nodes if node.op == "call_function"], got


def test_torch_compile_captures_the_whole_model_with_onednn_convs_at_the_sums():
    original, model, report = _deployed()
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = original(x)
        targets, got = _dynamo_graph(model, x)
    # inference on channels_last fp32 CPU: each fused sum's conv is oneDNN's functional conv, which inductor's
    # passes fuse with the sum and ReLU; the in-place op itself is never in a captured graph
    assert targets.count("mkldnn._convolution_pointwise") == len(report.residual_sums) > 0
    assert not any("_convolution_pointwise_" in t for t in targets)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # otherwise plain aten convs: a model in NCHW, and graphs that autograd records
    with torch.no_grad():
        targets, got = _dynamo_graph(copy.deepcopy(model).to(memory_format=torch.contiguous_format), x.contiguous())
    assert not any("mkldnn" in t for t in targets)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    targets, got = _dynamo_graph(model, x)
    assert not any("mkldnn" in t for t in targets)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_inductor_writes_the_sums_in_place_only_into_what_its_graph_owns():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.Conv2d(8, 8, 1), *[_Block("plain") for _ in range(3)]))
    model = model.eval().to(memory_format=torch.channels_last)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    assert len(deploy(model, x).residual_sums) == 3
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(model), x)
    torch.testing.assert_close(got, original(x))
    assert "\n".join(code).count("mkldnn._convolution_pointwise_.binary(") == 3
    # a block compiled alone: its input is the caller's, so inductor sums out of place and leaves it untouched
    block_input = original[1][:2](original[0](x))
    kept = block_input.clone()
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(model[1][2]), block_input)
    torch.testing.assert_close(got, original[1][2](kept))
    assert torch.equal(block_input, kept)
    code = "\n".join(code)
    assert "mkldnn._convolution_pointwise.binary(" in code and "_convolution_pointwise_.binary(" not in code
