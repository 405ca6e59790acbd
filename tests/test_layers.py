"""CompConv2d: shapes and complexity for any geometry, identity parts, gradients, linearity."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compconv import CompConv2d, channel_shuffle, create_conv2d
from compconv.complexity import count_macs
from compconv.efficient import EfficientCompConv2d, figure2_forms
from helpers import literal
from compconv.shuffle import shuffle_keeping_format


@st.composite
def geometries(draw):
    k = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 3))
    reach = dilation * (k - 1) + 1
    size = draw(st.integers(max(1, reach - 2 * padding), 11))
    return dict(
        c_in=draw(st.integers(1, 48)), c_out=draw(st.integers(1, 48)), k=k, stride=stride, padding=padding,
        dilation=dilation, size=size, depth=draw(st.integers(1, 3)), bias=draw(st.booleans()),
        tail=draw(st.sampled_from(["depthwise", "dense"])), tail_kernel=draw(st.sampled_from([None, 1, 2, 3])),
        inner_norm=draw(st.booleans()), shuffle=draw(st.booleans()),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries())
def test_shape_macs_params_match_plain_conv_and_plan(g):
    args = (g["c_in"], g["c_out"], g["k"], g["stride"], g["padding"], g["dilation"])
    module = EfficientCompConv2d(*args, bias=g["bias"], depth=g["depth"], tail=g["tail"],
                                 tail_kernel=g["tail_kernel"], inner_norm=g["inner_norm"], shuffle=g["shuffle"]).eval()
    x = torch.randn(2, g["c_in"], g["size"], g["size"] + 1)
    y = module(x)
    expected = nn.Conv2d(*args, bias=g["bias"])(x)
    assert y.shape == expected.shape
    with figure2_forms(module):  # Figure 2 as written is the literal form, bit for bit
        torch.testing.assert_close(module(x), literal(module, x), rtol=0, atol=0)
    torch.testing.assert_close(y, literal(module, x))  # a dense pointwise form, to fp32 rounding
    macs, _ = count_macs(module, x[:1])
    assert macs == module.plan.macs_per_position * y.shape[-2] * y.shape[-1]
    assert sum(p.numel() for p in module.parameters()) == module.plan.params
    assert module.plan.depth <= g["depth"]


def test_output_matches_conv_shape_for_common_resnet_geometries():
    for c_in, c_out, k, s, p in [(64, 256, 1, 1, 0), (256, 512, 1, 2, 0), (512, 512, 3, 2, 1), (1024, 2048, 1, 2, 0)]:
        x = torch.randn(1, c_in, 14, 14)
        assert CompConv2d(c_in, c_out, k, s, p, bias=False)(x).shape == nn.Conv2d(c_in, c_out, k, s, p)(x).shape


@pytest.mark.parametrize("shape", [(2, 12, 5, 7), (2, 12, 1, 1)])
def test_channel_shuffle_keeps_the_memory_format(shape):
    x = torch.randn(*shape)
    want = x.view(shape[0], 3, 4, *shape[2:]).transpose(1, 2).reshape(shape)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert torch.equal(channel_shuffle(x.to(memory_format=fmt), 3), want)  # the plain form: any layout
        got = shuffle_keeping_format(x.to(memory_format=fmt), 3)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=fmt)


def _shuffled_positions(module):
    """Output channel of each concatenated (pre-shuffle) channel."""
    index = torch.arange(module.out_channels, dtype=torch.float32).view(1, -1, 1, 1)
    order = channel_shuffle(index, module.plan.shuffle_groups).flatten().long()
    return {int(src): dst for dst, src in enumerate(order)}


@pytest.mark.parametrize("k, stride, padding, sampler", [
    (3, 1, 1, lambda x: x),
    (3, 2, 1, lambda x: x[:, :, ::2, ::2]),
    (1, 2, 0, lambda x: x[:, :, ::2, ::2]),
    (3, 1, 0, lambda x: x[:, :, 1:-1, 1:-1]),
])
@pytest.mark.parametrize("shuffle", [False, True])
def test_identity_parts_copy_the_chosen_input_channels(k, stride, padding, sampler, shuffle):
    module = CompConv2d(64, 64, k, stride, padding, bias=False, depth=3, shuffle=shuffle)
    x = torch.randn(2, 64, 9, 9)
    y = module(x)
    where = _shuffled_positions(module)
    offset = 0
    for part in module.plan.parts:
        if part.kind == "identity":
            start, stop = part.identity_slice
            channels = [where[offset + i] for i in range(part.channels)]
            torch.testing.assert_close(y[:, channels], sampler(x[:, start:stop]), rtol=0, atol=0)
        offset += part.channels


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_channels_last_matches_and_stays_channels_last(depth):
    module = EfficientCompConv2d(96, 128, 3, 2, 1, bias=True, depth=depth)
    x = torch.randn(2, 96, 9, 9)
    y = module(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, literal(module, x), rtol=1e-5, atol=1e-5)


def test_identity_outside_the_input_is_zero_padding():
    module = CompConv2d(32, 32, 1, 1, 1, bias=False, depth=2, shuffle=False)  # 1x1 conv with padding 1
    x = torch.randn(1, 32, 5, 5)
    y = module(x)
    c = module.plan.c_prim
    a1 = y[:, c:2 * c]
    assert a1.shape[-2:] == (7, 7)
    assert torch.all(a1[:, :, 0] == 0) and torch.all(a1[:, :, :, -1] == 0)
    torch.testing.assert_close(a1[:, :, 1:-1, 1:-1], x[:, :c])


@pytest.mark.parametrize("options", [{}, {"tail": "dense"}, {"inner_norm": True}, {"tail_kernel": 3}])
def test_every_parameter_gets_a_gradient(options):
    module = CompConv2d(256, 256, 1, bias=True, depth=3, **options)
    module(torch.randn(2, 256, 6, 6)).square().mean().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_module_is_linear_without_inner_norm():
    module = CompConv2d(96, 80, 3, 2, 1, bias=False, depth=3).double()
    x, z = torch.randn(2, 96, 8, 8, dtype=torch.double), torch.randn(2, 96, 8, 8, dtype=torch.double)
    torch.testing.assert_close(module(2.5 * x - 0.5 * z), 2.5 * module(x) - 0.5 * module(z))


def test_bias_is_added_once_on_the_output():
    module = CompConv2d(32, 32, 3, 1, 1, bias=True, depth=2)
    zero = module(torch.zeros(1, 32, 4, 4))
    torch.testing.assert_close(zero, module.bias.view(1, -1, 1, 1).expand_as(zero))


def test_depth_zero_factory_returns_plain_conv():
    conv = create_conv2d(64, 64, 3, padding=1, depth=0)
    assert type(conv) is nn.Conv2d
    assert isinstance(create_conv2d(64, 64, 3, padding=1, depth=2), CompConv2d)
    with pytest.raises(ValueError, match="create_conv2d"):
        CompConv2d(64, 64, 3, depth=0)


def test_rejects_what_it_cannot_replace():
    with pytest.raises(ValueError, match="groups"):
        CompConv2d(64, 64, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        CompConv2d(64, 64, 3, padding_mode="reflect")


def test_same_and_valid_padding_strings():
    x = torch.randn(1, 32, 7, 7)
    assert CompConv2d(32, 32, 3, padding="same")(x).shape == x.shape
    assert CompConv2d(32, 32, 3, padding="valid")(x).shape == (1, 32, 5, 5)


def test_extra_repr_shows_depth_and_parts():
    text = repr(CompConv2d(128, 128, 3, 1, 1, depth=3))
    assert "d=3" in text and "C_prim=10" in text and "A0:28" in text


def test_ddp_without_unused_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    try:
        model = DDP(CompConv2d(256, 256, 3, 1, 1, depth=3, inner_norm=True), find_unused_parameters=False)
        for _ in range(3):  # an unused parameter raises on the second iteration
            model.zero_grad()
            model(torch.randn(2, 256, 5, 5)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_compiles_without_graph_breaks():
    module = CompConv2d(64, 64, 3, 2, 1, depth=3, bias=True)
    x = torch.randn(2, 64, 8, 8)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x))
