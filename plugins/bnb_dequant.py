"""The 4-bit matmul written in torch ops, for decoder layers that ``training.compile`` compiles.

bitsandbytes' ``gemm_4bit`` is a custom op: the compiler cannot see into it, so every call runs its
Python and ctypes wrapper (measured on an H200: ~220 us of host time per call, 448 calls per 7B step,
while the GPU idles half the step; docs/benchmarks.md). Written in torch ops (the arithmetic of
bitsandbytes' own reference backend, ``bitsandbytes/backends/default/ops.py``), dequantization becomes
part of the layer's graph and the compiler fuses it into one kernel. The result is bit-identical to
bitsandbytes' dequantization (tests/test_bnb_dequant.py), so the matmul is the same computation.

Only code being compiled takes this path (``torch.compiler.is_compiling()``): eager training, evaluation
and generation (which uses bitsandbytes' fast single-token kernel) run bitsandbytes' op as before.
Chosen by the nf4/fp4 option ``dequantize``; installed by the quantizer's ``after_load``.
"""
from __future__ import annotations

import functools
import math

import torch  # imported only by the quantizer's after_load, when torch is loaded already

NESTED_BLOCK = 256  # bitsandbytes' block of 8-bit absmax values under nested quantization


def dequantize(packed, absmax, code, blocksize: int, shape: tuple, dtype, absmax2=None, code2=None, offset=None):
    """A 4-bit weight of ``shape`` from its packed nibbles (high nibble first) and block scales; nested:
    the scales are themselves 8-bit codes (``code2``) scaled per block of 256 (``absmax2``) plus ``offset``."""
    if absmax2 is not None:
        scales = code2[absmax.long()]
        n2 = scales.numel()
        scales = torch.nn.functional.pad(scales, (0, (-n2) % NESTED_BLOCK)).view(-1, NESTED_BLOCK)
        absmax = (scales * absmax2.view(-1, 1)).reshape(-1)[:n2] + offset
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:  # packed in another storage dtype for sharding
        p = p.view(torch.uint8)
    values = code[torch.stack((p >> 4, p & 0xF), -1).reshape(-1).long()][:math.prod(shape)]
    return (values.view(-1, blocksize) * absmax.view(-1, 1)).reshape(shape).to(dtype)


class Matmul4bit(torch.autograd.Function):
    """x @ W.T with W dequantized in the forward and again in the backward: like bitsandbytes' own
    MatMul4Bit, only the packed weight is kept for backward, never a dequantized copy."""

    @staticmethod
    def forward(ctx, x, bias, meta, packed, absmax, code, absmax2, code2, offset):
        w = dequantize(packed, absmax, code, *meta, absmax2, code2, offset)
        ctx.meta = meta
        ctx.save_for_backward(packed, absmax, code, absmax2, code2, offset)
        return torch.nn.functional.linear(x, w.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, code, absmax2, code2, offset = ctx.saved_tensors
        w = dequantize(packed, absmax, code, *ctx.meta, absmax2, code2, offset)
        grad_x = grad @ w.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None, None, None, None, None, None, None


def matmul_4bit(x, weight, bias=None):
    """``x @ weight.T + bias`` for a bitsandbytes Params4bit ``weight``, in torch ops."""
    qs = weight.quant_state
    nested = qs.state2 if qs.nested else None
    if nested is not None and nested.blocksize != NESTED_BLOCK:
        raise NotImplementedError(f"nested 4-bit with an absmax block of {nested.blocksize}")
    meta = (qs.blocksize, tuple(qs.shape), qs.dtype)
    return Matmul4bit.apply(x, bias, meta, weight.data, qs.absmax, qs.code,
                             nested.absmax if nested else None, nested.code if nested else None,
                             qs.offset if nested else None)


def _forward(layer, eager, x):
    """Linear4bit.forward, with the matmul in torch ops while the layer is being compiled."""
    if not torch.compiler.is_compiling():
        return eager(x)
    if not layer.compute_type_is_set:  # what bitsandbytes' forward does on its first call
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    inp_dtype = x.dtype
    if layer.compute_dtype is not None:
        x = x.to(layer.compute_dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return matmul_4bit(x, layer.weight, bias).to(inp_dtype)


def install(model) -> int:
    """Give every bitsandbytes 4-bit layer of ``model`` the compiled-code path; returns how many."""
    from bitsandbytes.nn import Linear4bit

    n = 0
    for mod in model.modules():
        if isinstance(mod, Linear4bit) and not isinstance(getattr(mod, "forward", None), functools.partial):
            mod.forward = functools.partial(_forward, mod, mod.forward)
            n += 1
    return n
