"""``sdpa_packed``: attention for packed rows that computes only what each packed sequence attends to.

transformers' ``sdpa`` attends over a packed row with a block-diagonal mask built from the position-id
restarts, and torch's CPU flash kernel computes every query x key block of the row, masked or not (its
causal flag does not skip keys within a 512-key block either). Here each packed sequence is cut into
query chunks of ``CHUNK`` positions, and each chunk attends only to its sequence's keys up to its own
end (a causal mask aligned bottom-right): about half of a sequence's score matrix, and nothing across
sequences. The chunks run in fp32: on a CPU without AMX torch's bf16 flash kernel is no faster than its
fp32 one, and fp32 is the more exact. Measured on a 2-core AVX512-BF16 CPU (docs/benchmarks.md).

The sequences come from ``cu_seq_lens_q`` (cumulative lengths over the flattened batch, the keyword
transformers' flash-attention varlen path also reads), which ftk adds to packed batches. Every other
call (unpacked or padded batches, generation with a cache, a GPU tensor, attention dropout) is
transformers' own ``sdpa`` with the mask it built, so nothing else changes where this is chosen.
"""
from __future__ import annotations

import functools

NAME = "sdpa_packed"
CHUNK = 128  # query positions a call; 64-256 measured alike, 512 (a whole sequence) slower


def sequence_bounds(position_ids):
    """Cumulative sequence lengths (int32, starting at 0) over the flattened ``position_ids`` of packed
    rows: a sequence starts wherever a position is 0, and at every row start."""
    import torch

    pos = position_ids.reshape(-1)
    width = position_ids.shape[-1]
    starts = (pos == 0) | (torch.arange(pos.numel(), device=pos.device) % width == 0)
    idx = starts.nonzero().squeeze(1)
    return torch.cat([idx, idx.new_tensor([pos.numel()])]).to(torch.int32)


def chunk_plan(cu_seq_lens, width: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """(row, sequence start, chunk start, chunk end) for every query chunk of every packed sequence,
    positions within the row; ``cu_seq_lens`` counts over the flattened rows of ``width``."""
    bounds = [int(x) for x in cu_seq_lens]
    plan = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        row, s = divmod(start, width)
        e = s + (end - start)
        plan.extend((row, s, a, min(a + chunk, e)) for a in range(s, e, chunk))
    return plan


_masks: dict = {}


def _mask(rows: int, cols: int):
    """Additive fp32 mask for ``rows`` queries that are the last of ``cols`` keys (causal, bottom-right)."""
    import torch

    m = _masks.get((rows, cols))
    if m is None:
        if len(_masks) > 256:
            _masks.clear()
        allowed = torch.ones(rows, cols, dtype=torch.bool).tril(cols - rows)
        m = _masks[(rows, cols)] = torch.zeros(rows, cols).masked_fill_(~allowed, float("-inf"))[None, None]
    return m


@functools.cache
def _function():
    import torch

    forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    class PackedAttention(torch.autograd.Function):
        """(B, H, T, D) q, k, v (as many heads) -> (B, H, T, D) output in fp32, chunk by chunk."""

        @staticmethod
        def forward(ctx, q, k, v, plan, scale):
            cq, ck, cv = (x.float() for x in (q, k, v))
            out = torch.empty_like(cq)
            lse = []
            for b, s, a, z in plan:
                mask = None if a == s else _mask(z - a, z - s)  # the first chunk is plain causal
                o, l = forward_op(cq[b:b + 1, :, a:z], ck[b:b + 1, :, s:z], cv[b:b + 1, :, s:z], 0.0, mask is None,
                                  attn_mask=mask, scale=scale)
                out[b:b + 1, :, a:z] = o
                lse.append(l)
            # the fp32 copies, not the inputs: casting them again in backward costs more time than they cost memory
            ctx.save_for_backward(cq, ck, cv, out, *lse)
            ctx.plan, ctx.scale, ctx.dtypes = plan, scale, (q.dtype, k.dtype, v.dtype)
            return out

        @staticmethod
        def backward(ctx, grad):
            cq, ck, cv, out, *lse = ctx.saved_tensors
            grad = grad.float()
            gq, gk, gv = torch.empty_like(cq), torch.zeros_like(ck), torch.zeros_like(cv)  # the plan covers every query
            for (b, s, a, z), l in zip(ctx.plan, lse):
                mask = None if a == s else _mask(z - a, z - s)
                dq, dk, dv = backward_op(grad[b:b + 1, :, a:z], cq[b:b + 1, :, a:z], ck[b:b + 1, :, s:z],
                                         cv[b:b + 1, :, s:z], out[b:b + 1, :, a:z], l, 0.0, mask is None,
                                         attn_mask=mask, scale=ctx.scale)
                gq[b:b + 1, :, a:z] = dq
                gk[b:b + 1, :, s:z] += dk
                gv[b:b + 1, :, s:z] += dv
            return (*(g.to(dtype) for g, dtype in zip((gq, gk, gv), ctx.dtypes)), None, None)

    return PackedAttention


_cache: dict = {}


def _plan_for(cu_seq_lens, width: int):
    """The chunk plan of this batch, built once for all layers (they get the same tensor)."""
    if _cache.get("key") is not cu_seq_lens or _cache.get("width") != width or _cache.get("chunk") != CHUNK:
        _cache.update(key=cu_seq_lens, width=width, chunk=CHUNK, plan=chunk_plan(cu_seq_lens.tolist(), width, CHUNK))
    return _cache["plan"]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """transformers' attention-function signature; (B, H, T, D) in, (B, T, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if (cu is None or query.shape[2] != key.shape[2] or query.device.type != "cpu" or dropout
            or getattr(module, "sliding_window", None) or kwargs.get("s_aux") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # grouped-query attention: each KV head serves heads // kv_heads query heads
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = _function().apply(query, key, value, _plan_for(cu, query.shape[2]), scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="sdpa_packed"`` known to transformers (idempotent): the function above,
    and sdpa's mask construction for the calls it hands to sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def resolve(requested: str, cuda: bool, compiling: bool) -> str:
    """``auto``: ``sdpa_packed`` on the CPU when the layers are not compiled (its per-sequence calls
    would recompile for every batch), else ``sdpa``; any other value as given."""
    if requested != "auto":
        return requested
    return NAME if not (cuda or compiling) else "sdpa"
