"""Device and numeric precision: which to use, and the autocast context that applies it."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple GPU is available")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """bf16 matrix units (AMX) or bf16 dot products (AVX512-BF16).

    Elsewhere bf16 convolutions are emulated: on an AVX2 CPU one ran about 400x slower than fp32.
    """
    if os.environ.get("STYLESHIFT_CPU_BF16") in ("0", "1"):  # an override for machines we cannot detect
        return os.environ["STYLESHIFT_CPU_BF16"] == "1"
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "fp32"


@dataclass(frozen=True)
class Precision:
    device: torch.device
    name: str  # fp32 | bf16 | fp16, already resolved

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> "Precision":
        return cls(device, resolve_precision(name, device))

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")
