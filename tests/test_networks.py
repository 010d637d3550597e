import pytest
import torch

from styleshift.config import DiscriminatorConfig, GeneratorConfig
from styleshift.networks import DISCRIMINATORS, GENERATORS, build_discriminator, build_generator
from styleshift.networks.layers import InstanceNorm2d


@pytest.mark.parametrize("arch", sorted(GENERATORS))
@pytest.mark.parametrize("upsample,downsample", [("transpose", "stride"), ("resize", "blur"),
                                                 ("resize", "stride_reflect")])
def test_generator_keeps_the_input_size(arch, upsample, downsample):
    net = build_generator(GeneratorConfig(arch=arch, ngf=4, n_blocks=1, upsample=upsample, downsample=downsample))
    x = torch.rand(2, 3, 36, 52) * 2 - 1
    y = net(x)
    assert y.shape == x.shape
    assert y.abs().max() <= 1.0  # tanh output, the image range


def test_reference_generator_matches_the_paper_size():
    # ResNet-9 with ngf 64 has 11.378M parameters in the reference implementation.
    net = build_generator(GeneratorConfig())
    assert sum(p.numel() for p in net.parameters()) == 11_378_179


@pytest.mark.parametrize("arch", sorted(DISCRIMINATORS))
def test_patchgan_gives_a_grid_of_logits(arch):
    net = build_discriminator(DiscriminatorConfig(arch=arch, ndf=4, n_layers=3))
    # The 70x70 PatchGAN maps 256x256 to 30x30 patch logits (Isola et al. 2017).
    assert net(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_reference_discriminator_size():
    net = build_discriminator(DiscriminatorConfig())
    assert sum(p.numel() for p in net.parameters()) == 2_764_737


def test_weights_start_as_normal_0_002():
    net = build_generator(GeneratorConfig(ngf=16, n_blocks=2))
    w = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.mean().item()) < 2e-3
    assert 0.018 < w.std().item() < 0.022


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="resnet_9blocks"):
        build_generator(GeneratorConfig(arch="unet"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_instance_norm_equals_the_textbook_one(layout):
    x = (torch.randn(3, 8, 11, 7) * 4 + 2).contiguous(memory_format=layout).requires_grad_()
    ref_x = x.detach().clone().contiguous().requires_grad_()
    g = torch.randn(3, 8, 11, 7)
    y = InstanceNorm2d(8)(x)
    ref = torch.nn.functional.instance_norm(ref_x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-4, rtol=1e-4)


def test_reflection_padded_downsampling_changes_only_the_top_and_left_edges():
    """Zero padding is read only at the top and left by a stride-2 convolution on an even side: the band the
    reference draws there. stride_reflect takes the same weights and differs from it near those edges alone."""
    zeros = build_generator(GeneratorConfig(arch="mobile_resnet", ngf=8, n_blocks=1, upsample="resize"))
    reflect = build_generator(GeneratorConfig(arch="mobile_resnet", ngf=8, n_blocks=1, upsample="resize",
                                              downsample="stride_reflect"))
    torch.manual_seed(0)
    for m in zeros.modules():  # weights large enough that an edge's change survives to the output
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.5 / m.weight[0].numel() ** 0.5)
    reflect.load_state_dict(zeros.state_dict())
    for net in (zeros, reflect):
        for m in net.modules():  # no instance norm: it would spread an edge's change over the whole map
            if isinstance(m, InstanceNorm2d):
                m.forward = lambda x: x
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        diff = (zeros(x) - reflect(x)).abs().amax(dim=(0, 1))
    edge = min(diff[:2].max(), diff[:, :2].max())  # the top and left edges change ...
    assert edge > 1e-4 and diff[48:, 48:].max() < edge / 1000  # ... the rest of the picture does not
