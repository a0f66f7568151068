"""model.activation_offloading: the activations autograd saves go to host memory (torch's save_on_cpu)
during every training step. It is a GPU lever, so here on the CPU: a recipe that asks for it is refused
with a one-line error (it would change nothing), and with that check lifted the training step runs under
the real save_on_cpu, which then receives exactly what the docs say (under gradient checkpointing each
decoder layer's input, nothing from inside a layer) and the run's losses equal the run without it."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import data as D
from ftk import model as M
from ftk import train as T
from ftk.errors import FtkError

torch.set_num_threads(1)
STEPS = 2


def raw(out, offload: bool, checkpointing: bool = True) -> dict:
    return {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}, "gradient_checkpointing": checkpointing,
                  "activation_offloading": offload},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},  # no random masks to differ
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                 "max_length": 128, "validation_size": 0, "cache": False},
        "training": {"max_steps": STEPS, "batch_size": 2, "learning_rate": 2e-3, "report_to": ["none"],
                     "precision": "fp32"},
        "output_dir": str(out),
    }


def train(out, manager, offload: bool):
    from ftk.recipe import load_recipe

    r = load_recipe(data=raw(out, offload))
    tok = M.load_tokenizer(r)
    prepared = D.prepare_data(r, tok, manager)
    model, info = M.load_model(r, manager, tok)
    T.train(model, tok, prepared, r, manager, str(out))
    losses = [json.loads(x)["loss"] for x in (out / T.TRAIN_LOG).read_text().splitlines() if '"loss"' in x]
    return info, losses, model


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_refused_without_a_gpu(tmp_path, fresh_manager, capsys):
    from ftk.cli import main

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(raw(tmp_path / "out", True)))
    with pytest.raises(SystemExit) as e:
        main(["validate", str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "model.activation_offloading: needs a CUDA GPU" in err
    from ftk.recipe import load_recipe

    r = load_recipe(data=raw(tmp_path / "out", True))
    with pytest.raises(FtkError, match="model.activation_offloading"):
        M.load_model(r, fresh_manager, M.load_tokenizer(r))
    assert not (tmp_path / "out").exists()


def test_steps_run_under_save_on_cpu_and_train_the_same(tmp_path, fresh_manager, monkeypatch):
    _, plain_losses, _ = train(tmp_path / "plain", fresh_manager, False)

    packed, real = [], torch.autograd.graph.save_on_cpu

    class Counting(real):  # the real hooks, with what they receive written down
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counted(t):
                packed.append(tuple(t.shape))
                return pack(t)
            self.pack_hook = counted

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    monkeypatch.setattr(M, "_check_offloading", lambda on: None)  # the CPU refusal, lifted
    info, losses, model = train(tmp_path / "offload", fresh_manager, True)
    assert info["activation_offloading"] is True
    assert losses == pytest.approx(plain_losses, rel=1e-6), (losses, plain_losses)
    cfg = model.config
    layers, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    steps_inputs = [s for s in packed if len(s) == 3 and s[-1] == hidden]
    # every micro-batch saved each layer's input (and the final norm's and the head's) to host memory
    assert len(steps_inputs) >= STEPS * layers, packed
    # ...and nothing from inside a layer: the checkpoint's own hooks take those
    assert not [s for s in packed if s and s[-1] == inter], packed


def test_plan_moves_the_checkpointed_inputs_to_host(tmp_path, fresh_manager):
    from ftk.plan import estimate_memory

    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    on = estimate_memory(cfg, raw(tmp_path, True), cuda=True, manager=fresh_manager)
    off = estimate_memory(cfg, raw(tmp_path, False), cuda=True, manager=fresh_manager)
    assert on["assumptions"]["activation_offloading"] and not off["assumptions"]["activation_offloading"]
    moved = off["bytes"]["activations"] - on["bytes"]["activations"]
    assert moved > 0 and on["bytes"]["offloaded_to_host"] == moved
    assert on["bytes"]["total"] == off["bytes"]["total"] - moved
    # the CPU has nothing to move
    cpu = estimate_memory(cfg, raw(tmp_path, True), cuda=False, manager=fresh_manager)
    assert not cpu["assumptions"]["activation_offloading"] and cpu["bytes"]["offloaded_to_host"] == 0
