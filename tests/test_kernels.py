"""Winograd (NNPACK) convolutions give the same values and gradients as the ordinary ones."""

import copy

import pytest
import torch

from styleshift import kernels
from styleshift.networks import build_generator
from styleshift.config import GeneratorConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this torch build has no NNPACK")


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
