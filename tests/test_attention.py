"""Packed attention (one causal call per packed example) equals transformers' block-mask SDPA and
running each example on its own; non-packed inputs fall through to SDPA unchanged."""
import torch
from transformers import AutoModelForCausalLM

from conftest import MODEL_DIR
from ftk.attention import NAME, use_packed_attention


def test_packed_attention_matches_block_mask_and_separate_examples():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="sdpa")
    m.config.use_cache = False
    ids = torch.randint(3, 500, (2, 40))
    pos = torch.tensor([list(range(15)) + list(range(20)) + list(range(5)), list(range(40))])
    labels = ids.clone()
    ref = m(input_ids=ids, position_ids=pos, labels=labels)
    assert use_packed_attention(m) and m.config._attn_implementation == NAME
    got = m(input_ids=ids, position_ids=pos, labels=labels)
    assert (ref.logits - got.logits).abs().max() < 1e-4
    assert abs(ref.loss.item() - got.loss.item()) < 1e-5
    alone = torch.cat([m(input_ids=ids[0:1, s:e]).logits for s, e in ((0, 15), (15, 35), (35, 40))], dim=1)
    assert (alone - got.logits[0:1]).abs().max() < 1e-4
    # padded, unpacked batch and cached generation take the plain SDPA path
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, 30:] = 0
    m.eval()
    with torch.no_grad():
        a = m(input_ids=ids, attention_mask=am).logits
        m.config._attn_implementation = "sdpa"
        b = m(input_ids=ids, attention_mask=am).logits
        m.config._attn_implementation = NAME
    assert torch.equal(a, b)
    m.config.use_cache = True
    out = m.generate(ids[:1, :5], max_new_tokens=5, do_sample=False)
    m.config._attn_implementation = "sdpa"
    assert torch.equal(out, m.generate(ids[:1, :5], max_new_tokens=5, do_sample=False))
