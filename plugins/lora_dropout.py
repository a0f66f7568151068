"""LoRA dropout masks drawn fast on the CPU (the lora adapter's ``dropout_rng: "auto"``).

torch's CPU dropout samples its Bernoulli mask with MKL's parallel sampler on Intel CPUs only; on every
other CPU (AMD, ARM) it draws one element at a time from a Mersenne Twister on one thread
(``bernoulli_`` takes the same time with 1 or 2 threads): about 5.3 ms of an 8 ms dropout on a
4 x 512 x 512 fp32 input, measured on an AVX512-BF16 EPYC, 10% of a LoRA training step there. Here each
mask is 32 random bits per element from numpy's SFC64 generator, seeded by a draw from torch's own
generator (so ``training.seed`` and a resumed run's restored RNG state give the same masks), compared
with a threshold: 1.8 ms for the whole dropout. The masks have the same distribution as torch's
(an element is dropped with probability ``round(p * 2**32) / 2**32``, kept ones are scaled by
``1 / (1 - p)``); they are different random numbers. Backward keeps a 1-byte mask instead of torch's
4-byte one. GPUs (torch's fused kernel is fast), compiled code and evaluation take torch's dropout.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_BITS = 2 ** 32


class SampledDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU training masks come from :func:`keep_mask`; everything else is torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0 or self.p >= 1 or x.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return F.dropout(x, self.p, self.training, self.inplace)
        return torch.where(keep_mask(x.shape, self.p), x, 0.0).mul_(1.0 / (1.0 - self.p))


def keep_mask(shape, p: float) -> torch.Tensor:
    """A bool tensor of ``shape``, each element True with probability 1 - ``p`` (to 2**-32), independently."""
    n = math.prod(shape)
    # torch's CPU generator decides the stream (also where a default device other than the CPU is set)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64, device="cpu"))
    raw = np.random.SFC64(seed).random_raw((n + 1) // 2)  # 64 uniform bits per draw: two 32-bit halves
    bits = torch.from_numpy(raw.view(np.int32)[:n]).view(shape)  # uniform over [-2**31, 2**31)
    return bits >= round(p * _BITS) - _BITS // 2


def torch_samples_serially(cpu_vendor: str) -> bool:
    """Whether torch's CPU dropout samples its masks on one thread on a CPU of ``cpu_vendor``
    (``ModelContext.cpu_vendor``): everywhere but Intel CPUs with an MKL build of torch (aten's
    bernoulli_scalar_kernel takes MKL's sampler only on vendor Intel)."""
    return not (torch.backends.mkl.is_available() and cpu_vendor == "GenuineIntel")


def install(model) -> int:
    """Replace each plain ``nn.Dropout`` of the model's LoRA layers (PEFT's ``lora_dropout``) by
    :class:`SampledDropout` with the same ``p``; returns how many were replaced."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, drop in list(drops.items()):
                if type(drop) is torch.nn.Dropout:
                    drops[name] = SampledDropout(drop.p, drop.inplace)
                    n += 1
    return n
