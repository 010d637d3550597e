"""Faster convolution kernels (styleshift.kernels) give the same values (and gradients) as the ordinary ones."""

import copy

import pytest
import torch

from styleshift import kernels
from styleshift.networks import build_generator
from styleshift.config import GeneratorConfig

nnpack = pytest.mark.skipif(not kernels.available(), reason="this torch build has no NNPACK")


@nnpack
def test_accelerated_generator_matches_in_values_and_gradients():
    torch.manual_seed(0)
    net = build_generator(GeneratorConfig(arch="resnet_6blocks", ngf=8))
    fast = copy.deepcopy(net)
    assert kernels.accelerate(fast) == 12  # two 3x3 convolutions in each of the 6 residual blocks
    assert fast.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(1, 3, 208, 200)  # trunk at 52x50: above kernels.MIN_PIXELS, so NNPACK runs
    grads = []
    for m in (net, fast):
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (y0, g0), (y1, g1) = grads
    torch.testing.assert_close(y1, y0, atol=1e-4, rtol=1e-4)
    # Winograd's transforms round more than a direct convolution: the weight gradients of this net came within
    # 0.5% (relative norm) of float64, against 0.006% for oneDNN.
    for name, g in g0.items():
        if name.endswith(".weight"):
            assert (g1[name] - g).norm() <= 2e-2 * g.norm(), name


@nnpack
def test_small_inputs_and_autocast_fall_back_to_the_ordinary_convolution(monkeypatch):
    conv = torch.nn.Conv2d(4, 4, 3)
    kernels.accelerate(torch.nn.Sequential(conv))
    called = []
    monkeypatch.setattr(kernels._WinogradConv, "apply", lambda *a: called.append(a) or torch.zeros(1))
    conv(torch.randn(1, 4, 20, 20))  # 400 pixels: below MIN_PIXELS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(1, 4, 60, 60))
    assert not called
    conv(torch.randn(1, 4, 60, 60))
    assert called


def test_folded_narrow_convolution_gives_the_plain_one_to_the_bit():
    """The generator's last convolution (ngf -> 3 channels, 7x7), folded over column pairs, returns exactly what
    the plain convolution returns in bf16 channels-last, in the same layout; other inputs take the plain path."""
    torch.manual_seed(0)
    net = build_generator(GeneratorConfig(arch="resnet_6blocks", ngf=8)).to(torch.bfloat16,
                                                                          memory_format=torch.channels_last)
    plain = copy.deepcopy(net)
    assert kernels.fold_narrow(net) == 1  # only the last convolution has <= 4 output channels
    assert net.state_dict().keys() == plain.state_dict().keys()
    conv, ref = net.model[-2], plain.model[-2]
    assert isinstance(conv, kernels.FoldedConv2d)
    with torch.inference_mode():
        for h, w in ((30, 40), (17, 8), (9, 7)):  # 7 columns: odd, so it falls back
            x = torch.randn(1, 8, h, w).to(torch.bfloat16, memory_format=torch.channels_last)
            y, expected = conv(x), ref(x)
            assert y.shape == expected.shape and y.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(y, expected)
            x = x.contiguous()  # NCHW
            assert torch.equal(conv(x), ref(x))
        x = torch.randn(1, 3, 64, 64).to(torch.bfloat16, memory_format=torch.channels_last)
        assert torch.equal(net(x), plain(x))
    x = torch.randn(1, 8, 16, 16).to(torch.bfloat16, memory_format=torch.channels_last).requires_grad_()
    conv(x).float().sum().backward()  # with gradients: the plain convolution, which autograd knows
    assert conv.weight.grad is not None and x.grad is not None
