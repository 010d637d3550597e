import math

import pytest
import torch

from conftest import tiny_config
from styleshift.cyclegan import CycleGAN
from styleshift.networks.layers import InstanceNorm2d
from styleshift.precision import Precision, cpu_has_fast_bf16, resolve_precision


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("STYLESHIFT_CPU_BF16", "0")
    assert resolve_precision("auto", cpu) == "fp32"  # emulated bf16 would be hundreds of times slower
    monkeypatch.setenv("STYLESHIFT_CPU_BF16", "1")
    assert resolve_precision("auto", cpu) == "bf16"  # AMX / AVX512-BF16
    assert resolve_precision("fp16", cpu) == "fp16"  # an explicit choice is kept
    with pytest.raises(ValueError, match="fp32"):
        resolve_precision("int8", cpu)


def test_detection_reads_the_cpu_flags(monkeypatch):
    import styleshift.precision as p

    monkeypatch.delenv("STYLESHIFT_CPU_BF16", raising=False)
    monkeypatch.setattr(p, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert cpu_has_fast_bf16()
    monkeypatch.setattr(p, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not cpu_has_fast_bf16()


def test_instance_norm_computes_in_fp32_under_bf16_autocast():
    x = torch.randn(2, 8, 12, 10) * 5 + 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = InstanceNorm2d(8)(x.bfloat16())
    assert y.dtype == torch.float32  # what follows (pad, ReLU, residual add) stays in fp32 on CPUs
    torch.testing.assert_close(y, torch.nn.functional.instance_norm(x.bfloat16().float()), atol=1e-5, rtol=1e-5)


def test_instance_norm_keeps_bf16_without_gradients():
    """Inference (styleshift.stylizer's all-bf16 network) gets bf16 out, as accurate as rounding the fp32
    result: the kernels accumulate in fp32, whatever the layout."""
    x = torch.randn(1, 8, 40, 30) * 5 + 30
    ref = torch.nn.functional.instance_norm(x.bfloat16().float())
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            y = InstanceNorm2d(8)(x.bfloat16().contiguous(memory_format=layout))
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def one_step(cfg, precision, channels_last=False):
    torch.manual_seed(0)
    model = CycleGAN(cfg, Precision(torch.device("cpu"), precision), 10, 5)
    if channels_last:
        model.wrap(lambda _, net: net.to(memory_format=torch.channels_last))
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    return model, {k: v.item() for k, v in model.train_step(a, b).items()}


def test_a_bf16_step_trains_like_fp32(sample_dirs):
    cfg = tiny_config(*sample_dirs)
    _, ref = one_step(cfg, "fp32")
    model, low = one_step(cfg, "bf16")
    assert all(math.isfinite(v) for v in low.values())
    for k in ref:  # same weights, same images: only rounding differs
        assert low[k] == pytest.approx(ref[k], rel=0.05, abs=0.02), k
    assert model.scaler_G.is_enabled() is False  # bf16 needs no loss scaling


def test_channels_last_gives_the_same_step(sample_dirs):
    cfg = tiny_config(*sample_dirs)
    _, ref = one_step(cfg, "fp32")
    _, cl = one_step(cfg, "fp32", channels_last=True)
    for k in ref:
        assert cl[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
