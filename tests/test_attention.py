"""ftk's sdpa_packed attention (each packed sequence's query chunks attend only to their own sequence):
the same output and gradients as torch's block-masked SDPA (float64 reference), the same loss, gradients
and logits as transformers' sdpa on packed rows of a real model (with grouped-query attention, as
stories260K has), plain sdpa wherever a batch is not packed (generation, padded rows), chosen by "auto"
on the CPU, and fed by the collator's sequence bounds."""
from __future__ import annotations

import pytest

from conftest import MODEL_DIR

torch = pytest.importorskip("torch")


def _packed_rows(lengths_per_row, seed=3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        ids = torch.randint(3, 512, (sum(lengths),), generator=g).tolist()
        pos = [i for n in lengths for i in range(n)]
        rows.append({"input_ids": ids, "labels": ids, "position_ids": pos})
    return rows


def _packed_batch(lengths_per_row=([30, 17, 9], [56], [20, 20])):
    from ftk.rows import Collator

    return Collator(pad_token_id=0, sequence_bounds=True)(_packed_rows(lengths_per_row))


def test_collator_gives_the_sequences_over_the_flattened_batch():
    b = _packed_batch()
    assert b["cu_seq_lens_q"].tolist() == [0, 30, 47, 56, 112, 132, 152, 168]  # the padding is a run of its own
    assert b["max_length_q"] == 56 and b["cu_seq_lens_k"] is b["cu_seq_lens_q"]
    from ftk.rows import Collator

    assert "cu_seq_lens_q" not in Collator(pad_token_id=0)(_packed_rows([[5, 3]]))  # only when asked


def test_chunk_plan_covers_every_position_once_within_its_sequence():
    from ftk.attention import chunk_plan

    plan = chunk_plan([0, 30, 47, 56, 112], 56, 16)
    assert plan == [(0, 0, 0, 16), (0, 0, 16, 30), (0, 30, 30, 46), (0, 30, 46, 47), (0, 47, 47, 56),
                    (1, 0, 0, 16), (1, 0, 16, 32), (1, 0, 32, 48), (1, 0, 48, 56)]


class _Module:  # what transformers passes as ``module``: only attributes the function may read
    sliding_window = None
    training = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradients_equal_block_masked_sdpa(dtype):
    """Sequences longer than a chunk (several chunks with the bottom-right masks), shorter ones, a
    one-token one and a padding run; grouped-query attention; against float64 SDPA with the block mask."""
    import torch.nn.functional as F

    from ftk import attention

    lengths = [[200, 90, 1, 9], [37, 250, 13]]  # row 2 ends in 300 - 300 = 0 padding; row 1: 0 too
    width = 300
    b, h, kvh, d = len(lengths), 4, 2, 16
    pos = torch.tensor([[i for n in row for i in range(n)] + list(range(width - sum(row))) for row in lengths])
    cu = attention.sequence_bounds(pos)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, width, d, generator=g)
    k, v = (torch.randn(b, kvh, width, d, generator=g) for _ in range(2))
    grad = torch.randn(b, h, width, d, generator=g)

    seq = torch.zeros(b, width, dtype=torch.long)
    for r, row in enumerate(lengths):
        seq[r] = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
    mask = ((seq[:, :, None] == seq[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril())[:, None]

    def run(fn, x_dtype):
        xs = [x.to(x_dtype).requires_grad_(True) for x in (q, k, v)]
        out = fn(*xs)
        out.backward(grad.to(out.dtype))
        return [out.double()] + [x.grad.double() for x in xs]

    ref = run(lambda q_, k_, v_: F.scaled_dot_product_attention(
        q_, k_.repeat_interleave(2, 1), v_.repeat_interleave(2, 1), attn_mask=mask), torch.float64)
    got = run(lambda q_, k_, v_: attention.packed_sdpa_forward(
        _Module(), q_, k_, v_, None, scaling=d ** -0.5, cu_seq_lens_q=cu)[0].transpose(1, 2), dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert got[0].shape == ref[0].shape
    for name, a, r in zip(("output", "dq", "dk", "dv"), got, ref):
        assert torch.allclose(a, r, atol=tol, rtol=tol), (name, (a - r).abs().max().item())


def _model(impl):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftk import attention

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation=impl, dtype=torch.float32)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is exercised
    torch.manual_seed(0)  # the same adapter (A and B) in every model built here
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return model


def test_same_loss_gradients_and_logits_as_masked_sdpa(monkeypatch):
    from ftk import attention

    monkeypatch.setattr(attention, "CHUNK", 8)  # several chunks a sequence with this model's short rows
    calls = []
    real = attention.packed_sdpa_forward
    monkeypatch.setattr(attention, "packed_sdpa_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = _packed_batch()
    res = {}
    for impl in ("sdpa", "sdpa_packed"):
        model = _model(impl).train()
        model.zero_grad()
        out = model(**b, use_cache=False)  # as in training: sdpa then masks each packed sequence
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        res[impl] = out.loss.detach(), out.logits.detach(), grads
    assert calls  # transformers called ftk's function (registered under the name), not its own sdpa
    (l1, o1, g1), (l2, o2, g2) = res["sdpa"], res["sdpa_packed"]
    assert torch.allclose(l1, l2, atol=1e-5)
    real_pos = b["labels"] != -100  # the padding run's logits are not scored
    assert torch.allclose(o1[real_pos], o2[real_pos], atol=1e-4)
    assert all(torch.allclose(g1[n], g2[n], atol=1e-5, rtol=1e-4) for n in g1)


def test_unpacked_calls_and_generation_are_plain_sdpa():
    a, b = _model("sdpa").eval(), _model("sdpa_packed").eval()
    ids = torch.tensor([[0, 0, 1, 403, 407, 261], [1, 365, 338, 1834 % 512, 263, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.allclose(a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits,
                              atol=1e-5)
        ga = a.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        gb = b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ga, gb)


def test_auto_is_packed_attention_on_the_cpu_without_compile():
    from ftk.attention import resolve

    assert resolve("auto", cuda=False, compiling=False) == "sdpa_packed"
    assert resolve("auto", cuda=True, compiling=False) == "sdpa"
    assert resolve("auto", cuda=False, compiling=True) == "sdpa"
    assert resolve("eager", cuda=False, compiling=False) == "eager"
    assert resolve("sdpa", cuda=False, compiling=False) == "sdpa"


def test_a_run_trains_through_it_and_records_it(tmp_path, fresh_manager, monkeypatch):
    import json
    import math

    from conftest import ALPACA

    from ftk import attention
    from ftk.recipe import load_recipe
    from ftk.run import run_recipe
    from ftk.testing import tiny_recipe

    calls = []
    real = attention.packed_sdpa_forward
    monkeypatch.setattr(attention, "packed_sdpa_forward",
                        lambda *a, **k: calls.append(k.get("cu_seq_lens_q") is not None) or real(*a, **k))
    raw = tiny_recipe(MODEL_DIR, [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                      output_dir=tmp_path / "run", data={"validation_size": 0, "max_length": 256})
    run_recipe(load_recipe(data=raw, manager=fresh_manager), manager=fresh_manager)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["attention"] == "sdpa_packed"
    assert calls and any(calls)  # training batches went through the packed path
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["train"]["final_loss"])
