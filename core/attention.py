"""Packed-sequence attention: one causal attention call per packed example instead of one masked call
over the whole row.

With packing, a row holds several examples and transformers builds a block-diagonal causal mask from
the position restarts. The fused CPU/GPU kernels then still do the work of the full row (and a masked
call cannot use the fastest causal path). Attending within each example's span, with ``is_causal``,
gives the same result for a fraction of the cost: sum(len_i^2) instead of row_len^2. Anything that is
not a packed training batch (padding masks, generation with a KV cache) goes to transformers' own SDPA
function unchanged.
"""
from __future__ import annotations

NAME = "ftk_packed_sdpa"
_registered = False


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        position_ids=None, **kwargs):
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    q_len = query.shape[2]
    if position_ids is None or q_len != key.shape[2] or q_len == 1 or position_ids.shape[-1] != q_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pos = position_ids.expand(query.shape[0], -1) if position_ids.shape[0] == 1 else position_ids
    starts = (pos == 0)
    if not bool((starts.sum(dim=1) > 1).any()):  # nothing packed: one example per row
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    rows = []
    for b, row_starts in enumerate(starts.tolist()):
        cuts = [i for i, s in enumerate(row_starts) if s] + [q_len]
        if cuts[0] != 0:
            cuts.insert(0, 0)
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                dropout_p=dropout, is_causal=True, scale=scaling)
                 for s, e in zip(cuts[:-1], cuts[1:])]
        rows.append(torch.cat(parts, dim=2))
    out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function (and sdpa's mask builder under the same name) with transformers."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, packed_sdpa_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def use_packed_attention(model) -> bool:
    """Switch a model that uses SDPA to the packed variant (training with packing); True if switched."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    name = register()
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
            c._attn_implementation = name
    return True
