"""deploy(): exact folds and equivalent forms leave eval outputs unchanged; the report is honest."""

import copy

import pytest
import timm
import torch
from torch import nn

from helpers import break_absorbed_norms, randomise_norms

from compconv import CompConv2d, deploy
from compconv.inference import DeployedCompConv2d, DeployError, LowRankConv2d, build_form, form_macs, rule_choice
from compconv.inference.forms import permute_input


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name, options, norms, forms", [
    ("resnet50_compconv128", {}, 0, {"chain": 6, "lowrank": 15, "dense": 15}),
    ("resnet50_compconv256", {"tail": "dense"}, 0, None),
    ("resnet50_compconv64", {"tail_kernel": 3}, 0, {"chain": 0, "lowrank": 0, "dense": 0}),
    ("resnet18_compconv128", {"inner_norm": True}, 49, {"chain": 1, "lowrank": 0, "dense": 2}),
    ("vgg16_bn_compconv128", {"inner_norm": True}, 37, {"chain": 0, "lowrank": 0, "dense": 0}),
])
@pytest.mark.parametrize("timed", [False, True])
@torch.no_grad()
def test_deploy_keeps_eval_outputs(name, options, norms, forms, timed):  # timed in PyTorch
    model = timm.create_model(name, num_classes=10, compconv=options)
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    report = deploy(model, x if timed else None)
    assert report.norms_folded == norms
    if forms and not timed:
        assert report.forms() == forms
    if name.startswith("vgg"):  # every conv -> bn -> relu (-> pool) -> conv of the features, not the last
        assert report.shuffles_folded == 11
    _close(model(x), reference)
    assert not any(isinstance(m, nn.BatchNorm2d) for c in model.modules() if isinstance(c, CompConv2d)
                   for m in c.modules())


@pytest.mark.parametrize("form", ["lowrank", "dense"])
@pytest.mark.parametrize("c_in, c_out, stride, depth", [(256, 64, 1, 2), (512, 128, 2, 3), (64, 256, 1, 1)])
@torch.no_grad()
def test_pointwise_forms_equal_compconv_with_norm_and_permuted_input(form, c_in, c_out, stride, depth):
    conv = CompConv2d(c_in, c_out, 1, stride, bias=True, depth=depth, inner_norm=True).double()
    norm = nn.BatchNorm2d(c_out).double()
    randomise_norms(nn.Sequential(conv, norm))
    reference = nn.Sequential(conv, norm).eval()
    conv.reparameterize()
    x = torch.randn(2, c_in, 9, 9, dtype=torch.double)
    fused = build_form(conv, norm, form).eval()
    assert isinstance(fused, LowRankConv2d if form == "lowrank" else nn.Conv2d)
    torch.testing.assert_close(fused(x), reference(x))
    # an upstream shuffle folded into this layer: the input arrives permuted
    source = torch.randperm(c_in)
    permuted = torch.empty_like(x)
    permuted[:, source] = x
    torch.testing.assert_close(permute_input(fused, source)(permuted), reference(x))


def test_form_macs_and_rule():
    deep = CompConv2d(2048, 512, 1, bias=False)  # d = 3
    shallow = CompConv2d(64, 256, 1, bias=False)  # d = 1
    assert form_macs(deep, "dense") == 2048 * 512
    assert form_macs(deep, "chain") == deep.plan.macs_per_position
    c = deep.plan.c_prim
    assert form_macs(deep, "lowrank") == 2048 * c + 4 * c * 512
    expand = CompConv2d(512, 2048, 1, bias=False)  # d = 3: low-rank would cost more than the plain conv
    assert form_macs(expand, "lowrank") > 0.6 * expand.plan.plain_macs_per_position
    assert (rule_choice(deep), rule_choice(shallow), rule_choice(expand)) == ("lowrank", "dense", "chain")
    assert (rule_choice(deep, "ort"), rule_choice(shallow, "ort")) == ("lowrank", "dense")


@torch.no_grad()
def test_dense_forms_are_counted_at_the_plain_convs_macs():
    import compconv

    model = timm.create_model("resnet50_compconv128").eval()
    before = compconv.complexity(model).macs
    report = deploy(model)
    after = compconv.complexity(model)
    choice = next(c for c in report.layers if c.name == "layer1.0.conv3")
    assert choice.form == "dense" and choice.macs_per_position == choice.plain_macs_per_position == 64 * 256
    assert after.macs_of("layer1.0.conv3") == 64 * 256 * 56 * 56
    assert after.macs > before
    assert "| layer1.0.conv3 | dense | 16384 | 16384 | 1.000 | rule |" in report.table()


class _ConvNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = CompConv2d(64, 64, 3, padding=1, bias=True, depth=2), nn.BatchNorm2d(64)

    def forward(self, x):
        return self.bn1(self.conv1(x))


@torch.no_grad()
def test_deploy_folds_output_bias_into_following_norm():
    block = _ConvNorm()
    randomise_norms(block)
    block.eval()
    x = torch.randn(1, 64, 6, 6)
    reference = block(x)
    assert deploy(block).biases_folded == 1 and block.conv1.bias is None
    torch.testing.assert_close(block(x), reference, rtol=1e-5, atol=1e-5)


def test_timm_reparameterize_model_folds_inner_norms():
    model = timm.create_model("resnet18_compconv128", num_classes=5, compconv={"inner_norm": True}).eval()
    randomise_norms(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        fused = timm.utils.reparameterize_model(model)
        _close(fused(x), reference)
    assert not any(isinstance(m, nn.BatchNorm2d) for c in fused.modules() if isinstance(c, CompConv2d)
                   for m in c.modules())


@pytest.mark.slow
def test_deployed_model_compiles_scripts_and_exports():
    model = timm.create_model("resnet50_compconv128", num_classes=5)
    deploy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected)
        torch.testing.assert_close(torch.jit.script(copy.deepcopy(model))(x), expected)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)


@torch.no_grad()
def test_deploy_for_onnx_runtime_times_forms_there_and_keeps_outputs():
    pytest.importorskip("onnxruntime")
    model = timm.create_model("resnet18_compconv128", num_classes=10).eval()
    randomise_norms(model)
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    report = deploy(model, x, runtime="ort")
    assert all(set(c.times_ms) == {"chain", "lowrank", "dense"} for c in report.layers)
    _close(model(x), reference)
    with pytest.raises(ValueError, match="runtime"):
        deploy(model, runtime="tensorrt")


@pytest.mark.parametrize("in_copy", [True, False])  # the per-piece affine copy, and cat + in-place affine
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("channels_last", [True, False])
@torch.no_grad()
def test_assemble_with_a_norms_affine_equals_shuffle_of_cat_then_affine(monkeypatch, in_copy, groups, channels_last):
    import dataclasses

    from compconv import efficient as fastpath
    from compconv.shuffle import channel_shuffle

    rule = dataclasses.replace(fastpath.FORM_RULES["cpu"], affine_in_copy_min_elements=1 if in_copy else 1 << 40)
    monkeypatch.setitem(fastpath.FORM_RULES, "cpu", rule)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    parts = [torch.randn(2, c, 5, 6).to(memory_format=fmt) for c in (3, 3, 6, 12)]  # 24 channels
    scale, shift = torch.randn(24), torch.randn(24)
    want = channel_shuffle(torch.cat(parts, 1), groups) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    got = fastpath.assemble(parts, groups, scale, shift)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("kernel, depth, stride", [(3, 1, 1), (3, 2, 2), (3, 3, 1), (1, 3, 1), (1, 2, 2)])
@torch.no_grad()
def test_chain_layer_applying_its_norm_equals_layer_then_norm_in_every_runtime(kernel, depth, stride):
    from compconv.inference.forms import absorb_norm

    conv = CompConv2d(64, 64, kernel, stride, padding=kernel // 2, bias=False, depth=depth)
    norm = nn.BatchNorm2d(64)
    reference = nn.Sequential(conv, norm)
    randomise_norms(reference)
    reference.eval()
    x = torch.randn(2, 64, 12, 12).to(memory_format=torch.channels_last)
    want = reference(x)
    deployed = absorb_norm(copy.deepcopy(conv), norm).eval()
    assert deployed.out_scale is not None and type(conv) is CompConv2d  # the trained layer class is untouched
    torch.testing.assert_close(deployed(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.jit.script(deployed)(x), want, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(deployed, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.export.export(deployed, (x,)).module()(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias"):
        absorb_norm(CompConv2d(64, 64, 3, padding=1, bias=True), norm)


@torch.no_grad()
def test_deploy_applies_norms_in_chain_layers_for_pytorch_only():
    model = timm.create_model("resnet50_compconv128", num_classes=10)
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    ort_model = copy.deepcopy(model)
    report = deploy(model)
    chain = [c.name for c in report.layers if c.form == "chain"]
    assert {conv for conv, _ in report.norms_absorbed} >= set(chain) and len(report.norms_absorbed) == 22  # 16 3x3 + 6
    for conv, norm in report.norms_absorbed:
        assert model.get_submodule(conv).out_scale is not None and isinstance(model.get_submodule(norm), nn.Identity)
    assert "22 norms applied in chain layers' assembly" in str(report)
    _close(model(x), reference)
    assert deploy(ort_model, runtime="ort").norms_absorbed == []


class _PlainConvNorms(nn.Module):
    """Plain convs before norms: one foldable, one whose output has two users, one norm called twice, one norm
    subclass that also applies an activation (as timm's BatchNormAct2d)."""

    class _NormAct(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x).relu()

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.branch, self.branch_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.twice, self.shared_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.last, self.last_bn = nn.Conv2d(8, 8, 1), self._NormAct(8)

    def forward(self, x):
        x = self.stem_bn(self.stem(x)).relu()
        y = self.branch(x)
        x = self.branch_bn(y) + y
        x = self.shared_bn(self.shared_bn(self.twice(x)))
        return self.last_bn(self.last(x))


@torch.no_grad()
def test_deploy_folds_a_norm_into_a_plain_conv_only_where_the_dataflow_proves_it():
    torch.manual_seed(0)
    model = _PlainConvNorms()
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    want, ort_model = model(x), copy.deepcopy(model)
    report = deploy(model, x)
    assert report.plain_norms_folded == [("stem", "stem_bn")]
    assert isinstance(model.stem_bn, nn.Identity) and model.stem.bias is not None
    assert type(model.branch_bn) is nn.BatchNorm2d and type(model.shared_bn) is nn.BatchNorm2d
    assert type(model.last_bn) is _PlainConvNorms._NormAct
    _close(model(x), want)
    assert deploy(ort_model, runtime="ort").plain_norms_folded == []  # ONNX Runtime folds these itself


@torch.no_grad()
def test_a_wrong_absorbed_norm_is_refused_and_the_model_is_untouched(monkeypatch):
    break_absorbed_norms(monkeypatch)
    model = timm.create_model("resnet18_compconv128", num_classes=10)
    randomise_norms(model)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeployError, match="The model was not changed"):
        deploy(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, DeployedCompConv2d) for m in model.modules())


@pytest.mark.parametrize("form", ["lowrank", "chain"])
@torch.no_grad()
def test_permuted_identity_gathers_keep_channels_last(form):
    from compconv.lowrank import gather_channels

    x = torch.randn(2, 12, 5, 5).to(memory_format=torch.channels_last)
    index = torch.tensor([7, 0, 3, 11])
    gathered = gather_channels(x, index)
    assert torch.equal(gathered, x.index_select(1, index))
    assert gathered.is_contiguous(memory_format=torch.channels_last)
    conv = CompConv2d(64, 64, 1 if form == "lowrank" else 3, padding=0 if form == "lowrank" else 1, depth=2)
    layer = build_form(conv, None, "lowrank") if form == "lowrank" else conv
    layer = permute_input(layer.eval(), torch.randperm(64))
    y = layer(torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@torch.no_grad()
def test_deployed_resnet_keeps_channels_last_through_every_layer():
    """An NCHW tensor anywhere would make every conv after it reorder for oneDNN (seen: all of layer3-4)."""
    model = timm.create_model("resnet50_compconv128", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    report = deploy(model)
    assert report.shuffles_folded > 0 and any(isinstance(m, DeployedCompConv2d) and m.input_index is not None
                                              for m in model.modules())
    nchw = []
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: nchw.append(n) if out.dim() == 4 and not
                                     out.is_contiguous(memory_format=torch.channels_last) else None)
             for n, m in model.named_modules() if n and n != "global_pool"]
    model(x)
    for hook in hooks:
        hook.remove()
    assert nchw == []


def test_channel_slice_reads_arithmetic_runs_only():
    from compconv.lowrank import channel_slice

    assert channel_slice(torch.arange(3, 9)) == (3, 9, 1)
    assert channel_slice(torch.tensor([1, 5, 9])) == (1, 10, 4)
    assert channel_slice(torch.tensor([4])) == (4, 5, 1)
    assert channel_slice(torch.tensor([0, 1, 3])) is None
    assert channel_slice(torch.tensor([3, 2, 1])) is None
    assert channel_slice(torch.tensor([], dtype=torch.long)) is None


@pytest.mark.parametrize("kernel", [1, 3])
@torch.no_grad()
def test_identity_channels_that_are_one_slice_are_views_in_every_form(kernel):
    """No gather where the identity channels are a slice; a gather where a folded shuffle interleaved them;
    both equal to the layer before deploy, also after a state-dict round trip."""
    conv = CompConv2d(64, 64, kernel, padding=kernel // 2, depth=3).eval()
    x = torch.randn(2, 64, 8, 8)
    want = conv(x)
    layer = build_form(conv, None, "lowrank") if kernel == 1 else DeployedCompConv2d.from_layer(conv)
    if kernel == 3:
        layer = permute_input(layer, torch.arange(64))  # a permutation that keeps every slice
        assert sorted(layer.input_slices) == list(layer.identity_starts)
    else:
        assert layer.identity_slice == (0, 3 * conv.plan.c_prim, 1)
    with torch.profiler.profile() as prof:
        torch.testing.assert_close(layer(x), want)
    assert not any(e.name == "aten::index_select" for e in prof.events())
    source = torch.arange(64).view(2, 32).t().reshape(-1)  # a shuffle of two groups: identity channels interleave
    permuted = torch.empty_like(x)
    permuted[:, source] = x
    shuffled = permute_input(copy.deepcopy(layer), source)
    torch.testing.assert_close(shuffled(permuted), want)
    assert (shuffled.identity_slice is None) if kernel == 1 else (shuffled.input_slices != layer.input_slices)
    reloaded = copy.deepcopy(layer)
    reloaded.load_state_dict(shuffled.state_dict())
    torch.testing.assert_close(reloaded(permuted), want)


@torch.no_grad()
def test_deployed_layers_pickled_without_their_slices_recompute_them():
    """A whole model pickled by a version before the slices existed still runs after torch.load."""
    import io

    model = timm.create_model("resnet50_compconv128", num_classes=10).eval()
    deploy(model)
    x = torch.randn(1, 3, 64, 64)
    want = model(x)
    for module in model.modules():
        for name in ("identity_slice", "input_slices"):
            module.__dict__.pop(name, None)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert any(getattr(m, "identity_slice", None) for m in loaded.modules())
    torch.testing.assert_close(loaded(x), want)
