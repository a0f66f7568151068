"""model.tiled_mlp: each decoder layer's MLP runs hidden_size positions at a time in training, each
tile recomputed in the backward pass. Checked on the real stories260K LLaMA with LoRA on every linear
layer (the MLP's too): the same loss and adapter gradients as the untiled model, no intermediate-size
tensor kept for backward (what it is for), and a recipe run that logs the untiled run's losses."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import tiled_mlp

torch.set_num_threads(1)


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    torch.manual_seed(0)  # the same adapter init every time
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # B = 0 would make every gradient but B's zero
    return model.train()


def _step(model, ids):
    saved = []  # what autograd keeps for backward: (shape, bytes)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, saved


def test_same_loss_and_gradients_and_no_intermediates_kept():
    ids = torch.randint(3, 512, (2, 200), generator=torch.Generator().manual_seed(1))
    plain = _model()
    loss, grads, saved = _step(plain, ids)
    tiled = _model()
    cfg = tiled.config
    assert tiled_mlp.apply(tiled) == cfg.num_hidden_layers
    assert cfg.hidden_size < 200  # so the 200 positions go in several tiles
    t_loss, t_grads, t_saved = _step(tiled, ids)
    assert torch.allclose(t_loss, loss, rtol=1e-6)
    assert grads.keys() == t_grads.keys() and any("mlp" in n for n in grads)
    for n in grads:
        assert torch.allclose(t_grads[n], grads[n], rtol=1e-5, atol=1e-7), n
    inter = cfg.intermediate_size
    assert any(s[-1] == inter for s in saved if s)  # untiled: the MLP's intermediates are kept
    assert not any(s[-1] == inter for s in t_saved if s), t_saved  # tiled: none
    # generation and evaluation (no grad) run the MLP whole
    with torch.no_grad():
        assert torch.allclose(tiled(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_a_recipe_run_trains_the_same(tmp_path, fresh_manager, monkeypatch):
    from ftk.recipe import load_recipe
    from ftk.run import run_recipe
    from ftk.testing import tiny_recipe

    tiles, real = [], tiled_mlp._tiled_forward

    def counted(forward, positions, x):
        if torch.is_grad_enabled() and x.shape[-2] > positions:
            tiles.append(x.shape[-2])
        return real(forward, positions, x)
    monkeypatch.setattr(tiled_mlp, "_tiled_forward", counted)
    logs = {}
    for tiled in (False, True):
        out = tmp_path / str(tiled)
        raw = tiny_recipe(MODEL_DIR, [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}], output_dir=out,
                          adapter={"dropout": 0.0, "target_modules": "all-linear"},
                          training={"max_steps": 3, "precision": "fp32"}, data={"validation_size": 0})
        raw["model"]["tiled_mlp"] = tiled
        run_recipe(load_recipe(data=raw, manager=fresh_manager), manager=fresh_manager)
        logs[tiled] = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
                       if "loss" in r]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"]["tiled_mlp"] is tiled
    assert tiles  # the tiled run's MLPs did run in tiles
    assert len(logs[True]) == 3 and logs[True] == pytest.approx(logs[False], rel=1e-5)
