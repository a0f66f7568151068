"""Sequence-tiled MLP (``model.tiled_mlp``): each decoder layer's MLP runs a tile of positions at a time,
and each tile's intermediates are recomputed in the backward pass instead of kept.

At long context the MLP's intermediates are the largest part of a layer's activations: gate, up and the
activation of gate, three intermediate-size tensors a token (LLaMA-7B in bf16: 66 KB of the ~156 KB a
layer keeps per token, docs/benchmarks.md). Kept for backward, or rebuilt all at once when gradient
checkpointing recomputes a layer, they bound the longest sequence that fits. Tiled, only one tile's exist at a time. A tile is
``hidden_size`` positions, the default of DeepSpeed's and Liger-Kernel's TiledMLP (Arctic Long Sequence
Training: ``ceil(seqlen / hidden_size)`` shards). The price is one more forward pass of each MLP (a
third one under gradient checkpointing). It is the same computation: positions go through the MLP independently.
"""
from __future__ import annotations

import functools


def _tiled_forward(forward, positions: int, x):
    import torch
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-2] <= positions:
        return forward(x)  # no backward to save memory for, or nothing to tile
    return torch.cat([checkpoint(forward, tile, use_reentrant=False) for tile in x.split(positions, dim=-2)],
                     dim=-2)


def apply(model) -> int:
    """Tile the MLP of every decoder layer of ``model`` (a module with ``self_attn`` and ``mlp``, as
    transformers' LLaMA-family layers have); returns how many. Idempotent."""
    n = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(layer, "self_attn"):
            continue
        if not isinstance(mlp.__dict__.get("forward"), functools.partial):
            positions = int(getattr(mlp, "hidden_size", 0) or model.config.hidden_size)
            mlp.forward = functools.partial(_tiled_forward, mlp.forward, positions)
        n += 1
    return n
