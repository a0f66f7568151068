"""ftk.losses: the chunked causal-LM loss equals transformers' own loss, in value and in gradients, on
the real stories260K LLaMA with LoRA (fp32, bf16, 4-bit NF4), packed and padded batches, and through a
recipe run (where it is the sft trainer's default)."""
from __future__ import annotations

import json

import pytest

from conftest import MODEL_DIR

torch = pytest.importorskip("torch")


def _lora_model(quantized=False, dtype=None, head=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {"dtype": dtype or torch.float32}
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kw)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if head else [])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B = 0 at init would make the adapter's gradients trivially small
            p.data.normal_(0, 0.05)
    return model.train()


def _batch(packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100  # a masked prompt
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two examples a row, positions restarting
        batch["position_ids"] = torch.cat([torch.arange(20), torch.arange(20)]).repeat(3, 1)
        labels[:, 20] = -100
    else:
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][2, 30:] = 0
        labels[2, 30:] = -100
    return batch


class _Trainer:  # what causal_lm_loss_chunked reads of a transformers Trainer
    model_accepts_loss_kwargs = True

    class args:
        average_tokens_across_devices = False


def _loss_and_grads(model, batch, chunked, num_items=None, chunk_tokens=7):
    from ftk.losses import causal_lm_loss_chunked

    model.zero_grad()
    if chunked:
        loss = causal_lm_loss_chunked(_Trainer(), model, batch, num_items_in_batch=num_items, chunk_tokens=chunk_tokens)
    else:
        kw = {"num_items_in_batch": num_items} if num_items is not None else {}
        loss = model(**batch, **kw).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                   if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("num_items", [None, 50])
def test_equals_the_plain_loss_and_its_gradients(packed, num_items):
    model = _lora_model()
    batch = _batch(packed)
    plain, g_plain = _loss_and_grads(model, batch, False, num_items)
    chunk, g_chunk = _loss_and_grads(model, batch, True, num_items)
    assert torch.allclose(plain, chunk, atol=1e-5, rtol=0), (plain, chunk)
    assert g_plain.keys() == g_chunk.keys() and g_plain
    for n in g_plain:
        assert torch.allclose(g_plain[n], g_chunk[n], atol=1e-5, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for g in g_chunk.values())


def test_a_lora_adapted_output_layer_gets_the_same_gradients():
    model = _lora_model(head=True)
    batch = _batch(True)
    plain, g_plain = _loss_and_grads(model, batch, False)
    chunk, g_chunk = _loss_and_grads(model, batch, True, chunk_tokens=5)
    heads = [n for n in g_plain if "lm_head" in n]
    assert heads and all(g_chunk[n].abs().sum() > 0 for n in heads)
    assert torch.allclose(plain, chunk, atol=1e-5)
    for n in g_plain:
        assert torch.allclose(g_plain[n], g_chunk[n], atol=1e-5, rtol=1e-4), n


def test_under_the_forwards_autocast_with_a_trained_fp32_head():
    """bf16 autocast wraps the model's forward only (as accelerate does on the CPU); a head trained in full
    (modules_to_save, fp32) must still be called under it, as in the model's own forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    forward = model.forward
    model.forward = lambda *a, **k: torch.autocast("cpu", dtype=torch.bfloat16)(forward)(*a, **k)
    batch = _batch(True)
    plain, g_plain = _loss_and_grads(model, batch, False)
    chunk, g_chunk = _loss_and_grads(model, batch, True)
    assert torch.allclose(plain, chunk, atol=1e-3), (plain, chunk)
    assert any("lm_head" in n for n in g_chunk) and all(
        torch.allclose(g_plain[n], g_chunk[n], atol=1e-3, rtol=2e-2) for n in g_plain)


def test_4bit_and_bf16_models():
    batch = _batch(True)
    model = _lora_model(quantized=True)
    plain, g_plain = _loss_and_grads(model, batch, False)
    chunk, g_chunk = _loss_and_grads(model, batch, True)
    assert torch.allclose(plain, chunk, atol=1e-5)
    assert all(torch.allclose(g_plain[n], g_chunk[n], atol=1e-5, rtol=1e-4) for n in g_plain)
    model = _lora_model(dtype=torch.bfloat16)
    plain, g_plain = _loss_and_grads(model, batch, False)
    chunk, g_chunk = _loss_and_grads(model, batch, True)
    # bf16 logits: the same rounding in both; the sum of a chunk differs from the whole in float order only
    assert torch.allclose(plain, chunk, atol=1e-3), (plain, chunk)
    assert all(torch.allclose(g_plain[n], g_chunk[n], atol=1e-3, rtol=2e-2) for n in g_plain)


def test_the_output_layer_is_restored():
    from ftk.losses import causal_lm_loss_chunked

    model = _lora_model()
    batch = _batch(True)
    causal_lm_loss_chunked(_Trainer(), model, batch)
    out = model(input_ids=batch["input_ids"])
    assert out.logits.shape == (3, 40, 512)


def test_the_backward_pass_reaches_the_chunks_through_the_models_output(monkeypatch):
    """What FSDP needs: it hooks the model's outputs to gather the sharded output layer before backward, so
    the chunks' recomputation must come after the output's gradient (tests/test_fsdp.py runs it sharded)."""
    from ftk import losses

    model, order = _lora_model(), []
    real_chunk, real_forward = losses._chunk_sum, model.forward
    monkeypatch.setattr(losses, "_chunk_sum", lambda *a: order.append("chunk") or real_chunk(*a))

    def forward(*a, **k):
        out = real_forward(*a, **k)
        out.logits.register_hook(lambda g: order.append("output"))
        return out
    monkeypatch.setattr(model, "forward", forward)
    loss = losses.causal_lm_loss_chunked(_Trainer(), model, _batch(True), chunk_tokens=7)
    chunks = order.count("chunk")
    order.clear()
    loss.backward()
    assert chunks > 1 and order == ["output"] + ["chunk"] * chunks, order


def test_on_by_default_also_under_fsdp(fresh_manager):
    from ftk.components import ModelContext
    from ftk.recipe import filled_recipe

    recipe = filled_recipe({"model": {"name": str(MODEL_DIR)}, "distributed": {"strategy": "fsdp"}}, fresh_manager)
    plan = fresh_manager.get("trainer", "sft").factory(recipe["trainer"] | {"chunked_loss": "auto"},
                                                        ModelContext(None, recipe))
    assert plan.compute_loss is not None and plan.logits_positions == 1024


def test_recipe_runs_train_the_same_with_and_without_it(tmp_path, fresh_manager, monkeypatch):
    """The sft trainer's default (chunked) and chunked_loss: false log the same losses, step for step."""
    from ftk import losses
    from ftk.recipe import load_recipe
    from ftk.run import run_recipe
    from ftk.testing import tiny_recipe

    from conftest import ALPACA

    calls = []
    real = losses.chunked_causal_lm_loss
    monkeypatch.setattr(losses, "chunked_causal_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    logs, used = {}, {}
    for chunked in ("auto", False):
        calls.clear()
        out = tmp_path / str(chunked)
        raw = tiny_recipe(MODEL_DIR, [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 40}], output_dir=out,
                          trainer={"method": "sft", "chunked_loss": chunked}, training={"max_steps": 4},
                          data={"validation_size": 0})
        run_recipe(load_recipe(data=raw, manager=fresh_manager), manager=fresh_manager)
        logs[chunked] = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
                         if "loss" in r]
        used[chunked] = len(calls)
    assert used == {"auto": 4, False: 0}  # the default is the chunked loss: one call a micro-batch
    assert len(logs["auto"]) == 4
    assert logs["auto"] == pytest.approx(logs[False], abs=1e-4)
