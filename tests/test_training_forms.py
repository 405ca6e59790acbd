"""The training path (ConcatShuffle's view backward, the dense form of 1x1 layers) computes Figure 2's
function and gradients: outputs, parameter and input gradients equal the literal
``channel_shuffle(torch.cat(parts))`` over the geometry sweep and every option, in eager (NCHW and
channels_last), under ``torch.compile(fullgraph=True)`` and under DDP (gloo)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compconv import CompConv2d, channel_shuffle
from compconv.efficient import EfficientCompConv2d, TrainingFormError, check_training_forms, composed_weight, dense_pays, \
    factorised_weights, figure2_forms, training_form, unshuffle_views
from compconv.efficient import FORM_RULES

from helpers import literal

CPU = FORM_RULES["cpu"]


@st.composite
def layers(draw):
    k = draw(st.sampled_from([1, 1, 2, 3]))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2)) if k > 1 else 0
    reach = dilation * (k - 1) + 1
    size = draw(st.integers(max(1, reach - 2 * padding), 10))
    return dict(
        c_in=draw(st.integers(4, 64)), c_out=draw(st.integers(4, 64)), k=k, stride=stride, padding=padding,
        dilation=dilation, size=size, depth=draw(st.integers(1, 3)), bias=draw(st.booleans()),
        tail=draw(st.sampled_from(["depthwise", "dense"])), tail_kernel=draw(st.sampled_from([None, 1, 3])),
        inner_norm=draw(st.booleans()), shuffle=draw(st.booleans()),
        pointwise_form=draw(st.sampled_from(["auto", "dense", "lowrank", "chain"])),
        channels_last=draw(st.booleans()))


def _build(g):
    return EfficientCompConv2d(g["c_in"], g["c_out"], g["k"], g["stride"], g["padding"], g["dilation"], bias=g["bias"],
                      depth=g["depth"], tail=g["tail"], tail_kernel=g["tail_kernel"], inner_norm=g["inner_norm"],
                      shuffle=g["shuffle"], pointwise_form=g["pointwise_form"]).double()


def _grads(module, x, out, grad):
    return torch.autograd.grad(out, [x, *module.parameters()], grad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_training_path_equals_the_literal_form(g):
    module = _build(g).train()
    fmt = torch.channels_last if g["channels_last"] else torch.contiguous_format
    x = torch.randn(2, g["c_in"], g["size"], g["size"] + 1, dtype=torch.double).to(memory_format=fmt)
    x.requires_grad_(True)
    want = literal(module, x)
    grad = torch.randn_like(want)
    want_grads = _grads(module, x, want, grad)
    got = module(x)
    torch.testing.assert_close(got, want)
    for a, b in zip(_grads(module, x, got, grad), want_grads):
        torch.testing.assert_close(a, b)


def test_dense_form_is_taken_where_it_pays_and_only_for_pointwise_layers():
    deep = EfficientCompConv2d(256, 64, 1, bias=False, depth=2)
    assert deep.pointwise_form == "auto"
    assert dense_pays(deep, torch.empty(1, 256, 56, 56), CPU) and not dense_pays(deep, torch.empty(1, 256, 14, 14), CPU)
    assert not dense_pays(EfficientCompConv2d(64, 256, 1, bias=False), torch.empty(1, 64, 7, 7), CPU)
    expand = EfficientCompConv2d(256, 1024, 1, bias=False, depth=2)  # ResNet-50 layer 3's conv3: the chain keeps > half the MACs
    assert expand.plan.macs_ratio >= 0.5 and deep.plan.macs_ratio < 0.5
    assert dense_pays(expand, torch.empty(1, 256, 14, 14), CPU) and not dense_pays(expand, torch.empty(1, 256, 7, 7), CPU)
    assert EfficientCompConv2d(64, 64, 3, padding=1).pointwise_form == "chain"
    assert EfficientCompConv2d(256, 64, 1, inner_norm=True).pointwise_form == "chain"
    x = torch.randn(1, 256, 56, 56)
    with figure2_forms(nn.Sequential(deep)):  # the plain module's forward, as Figure 2 is written
        assert deep.figure2 and torch.equal(deep(x), CompConv2d.forward(deep, x))
    assert type(deep) is EfficientCompConv2d and not deep.figure2 and deep.pointwise_form == "auto"


def test_unshuffle_views_are_views_of_the_output_gradient():
    grad = torch.randn(2, 24, 3, 3).to(memory_format=torch.channels_last)
    widths, groups = [3, 3, 6, 12], 4  # the parts of a d = 3 layer with C_prim = 3... each within one group
    views = unshuffle_views(grad, widths, groups)
    assert all(v.data_ptr() >= grad.data_ptr() and v._base is grad for v in views[:2])
    concatenated = torch.cat(views, dim=1)
    torch.testing.assert_close(channel_shuffle(concatenated, groups), grad)


def test_training_form_rule():
    assert training_form(EfficientCompConv2d(256, 64, 1, depth=2), torch.empty(1, 256, 7, 7), CPU) == "lowrank"
    assert training_form(EfficientCompConv2d(2048, 512, 1), torch.empty(1, 2048, 7, 7), CPU) == "lowrank"
    # d = 1 with a depthwise tail: a GEMM and a scale, memory-bound where the output is large
    assert training_form(EfficientCompConv2d(64, 256, 1), torch.empty(1, 64, 14, 14), CPU) == "lowrank"
    assert training_form(EfficientCompConv2d(64, 256, 1), torch.empty(1, 64, 28, 28), CPU) == "lowrank"
    assert training_form(EfficientCompConv2d(64, 256, 1), torch.empty(1, 64, 56, 56), CPU) == "dense"
    assert training_form(EfficientCompConv2d(64, 256, 1, tail="dense"), torch.empty(1, 64, 56, 56), CPU) == "dense"


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
def test_chain_input_gradient_keeps_channels_last(stride, dilation):
    # autograd's slice backward would hand back an NCHW gradient, slowing every norm/activation upstream
    conv = EfficientCompConv2d(64, 96, 3, stride, dilation, dilation, depth=3).double()
    assert conv.identity_starts and not conv.identity_padded
    x = torch.randn(2, 64, 9, 9, dtype=torch.double).to(memory_format=torch.channels_last).requires_grad_(True)
    out = conv(x)
    grad_out = torch.randn_like(out)
    grad = torch.autograd.grad(out, x, grad_out)[0]
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
    torch.testing.assert_close(grad, torch.autograd.grad(literal(conv, x), x, grad_out)[0])


@pytest.mark.parametrize("compiled", [False, True])
def test_concat_shuffle_promotes_dtypes_as_torch_cat_does(compiled):
    from compconv.efficient import concat_shuffle
    a = torch.randn(2, 4, 3, 3, requires_grad=True)
    b = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    want = channel_shuffle(torch.cat([a, b], 1), 2)
    run = torch.compile(concat_shuffle, backend="aot_eager", fullgraph=True) if compiled else concat_shuffle
    got = run([a, b], 2)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    grads = torch.autograd.grad(got, [a, b], torch.randn_like(want))
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16]


def test_factorised_weights_shapes():
    conv = EfficientCompConv2d(512, 128, 1, depth=3)
    w1, v = factorised_weights(conv)
    rank = conv.plan.c_prim + conv.plan.identity_channels
    assert w1.shape == (rank, 512) and v.shape == (128, rank)
    assert torch.equal(w1[conv.plan.c_prim:].sum(1), torch.ones(rank - conv.plan.c_prim))  # one-hot rows


def test_composed_weight_gives_the_plain_convs_mapping():
    conv = EfficientCompConv2d(96, 48, 1, 2, bias=True, depth=3, tail="dense").double()
    x = torch.randn(1, 96, 7, 7, dtype=torch.double)
    with figure2_forms(conv):
        want = conv(x)
    got = nn.functional.conv2d(x, composed_weight(conv)[:, :, None, None], conv.bias, conv.stride)
    torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("kernel, form", [(1, "dense"), (1, "lowrank"), (1, "chain"), (3, "auto")])
def test_compiled_fullgraph_training_step_equals_eager(kernel, form):
    torch.manual_seed(0)
    module = EfficientCompConv2d(64, 96, kernel, padding=kernel // 2, bias=True, depth=2, pointwise_form=form)
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    want = module(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *module.parameters()])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, *module.parameters()]), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compile_calls_concat_shuffle_as_one_operator_and_export_records_standard_ops():
    torch.manual_seed(0)
    module = EfficientCompConv2d(64, 96, 3, padding=1, depth=2)
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last).requires_grad_(True)
    targets: list[str] = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch.compiler.reset()
    torch.compile(module, backend=recording_backend, fullgraph=True)(x)
    assert "compconv.concat_shuffle.default" in targets
    want = module(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *module.parameters()])
    got = torch.compile(module, fullgraph=True)(x)  # inductor
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, *module.parameters()]), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    exported = torch.export.export(module.eval(), (x.detach(),))
    assert not any("compconv" in str(node.target) for node in exported.graph.nodes)


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from compconv import CompConv2d, EfficientCompConv2d
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(EfficientCompConv2d(64, 48, 1, bias=True, depth=2), nn.ReLU(),
                      EfficientCompConv2d(48, 32, 3, padding=1, bias=False))
net = nn.parallel.DistributedDataParallel(model)
torch.manual_seed(1 + rank)
net(torch.randn(2, 64, 30, 30)).square().mean().backward()  # 900 positions: the 1x1 layer trains dense
torch.save([p.grad for p in model.parameters()], os.path.join(sys.argv[1], f"grads{rank}.pt"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_gradients_equal_the_literal_form_on_the_global_batch(tmp_path):
    from helpers import ROOT, env

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
               str(script), str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    model = nn.Sequential(EfficientCompConv2d(64, 48, 1, bias=True, depth=2, pointwise_form="chain"), nn.ReLU(),
                          EfficientCompConv2d(48, 32, 3, padding=1, bias=False))
    losses = []
    for rank in range(2):
        torch.manual_seed(1 + rank)
        losses.append(model(torch.randn(2, 64, 30, 30)).square().mean())
    (sum(losses) / 2).backward()  # DDP averages the ranks' gradients
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert len(grads) == len(list(model.parameters()))
        for got, p in zip(grads, model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_check_training_forms_passes_and_leaves_the_model_as_it_was():
    import timm

    model = timm.create_model("resnet50_compconv128", num_classes=10).to(memory_format=torch.channels_last)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    rng = torch.get_rng_state()
    assert 0 < check_training_forms(model, x) < 1e-4  # fp32 rounding only
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    assert check_training_forms(nn.Sequential(EfficientCompConv2d(16, 16, 3, padding=1)), torch.randn(1, 16, 8, 8)) < 1e-6
    assert check_training_forms(nn.Sequential(CompConv2d(16, 16, 3, padding=1)), torch.randn(1, 16, 8, 8)) == 0.0


def test_check_training_forms_names_what_differs(monkeypatch):
    import compconv.efficient

    forward = compconv.efficient.pointwise_forward
    monkeypatch.setattr(compconv.efficient, "pointwise_forward", lambda module, x, form, rule: 1.5 * forward(module, x, form, rule))
    model = nn.Sequential(EfficientCompConv2d(64, 32, 1, depth=2), nn.ReLU(), nn.Conv2d(32, 8, 1))
    with pytest.raises(TrainingFormError, match=r"differ from Figure 2 in output 0 by 0\.5.*efficient=false"):
        check_training_forms(model, torch.randn(2, 64, 8, 8))
    monkeypatch.setattr(compconv.efficient, "pointwise_forward",  # the same output, a wrong gradient
                        lambda module, x, form, rule: forward(module, x.detach(), form, rule))
    with pytest.raises(TrainingFormError, match="in the input's gradient"):
        check_training_forms(model, torch.randn(2, 64, 8, 8))


@pytest.mark.slow
def test_a_run_whose_training_forms_differ_stops_with_one_error_line(tmp_path):
    from helpers import FMNIST, ROOT, TINY, env

    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    patch = tmp_path / "inject"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import compconv.efficient as efficient\n"
        "_forward = efficient.pointwise_forward\n"
        "efficient.pointwise_forward = lambda module, x, form, rule: 1.5 * _forward(module, x, form, rule)\n")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train_cls.py"), "model=resnet50_compconv128", *TINY,
                           "trainer.epochs=1", f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True,
                          env={**env(), "PYTHONPATH": f"{patch}:{ROOT}"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TrainingFormError" in errors[0] and "efficient=false" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not list(run.glob("*.pt"))
