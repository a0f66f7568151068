"""Every combination `ftk validate` accepts trains, or `ftk validate` refuses it (issue 12).

Refusals: each exits 2 with one line naming the JSON path (trackers whose package is missing, precision or
attention the hardware lacks). Accepted combinations that once validated and then crashed or did not learn
(DoRA over int8 on the CPU died on its second forward) train here for a few steps at lr 1e-2 and must leave
every saved LoRA B non-zero. docs/model.md has the whole table these come from."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA, MODEL_DIR

torch.set_num_threads(1)


def recipe(out, quant="nf4", adapter=None, model=None, training=None) -> dict:
    return {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": quant}, **(model or {})},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, **(adapter or {})},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 20}],
                 "max_length": 64, "validation_size": 4, "cache": False},
        "training": {"max_steps": 3, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                     "warmup_ratio": 0, "optimizer": "adamw_torch", "report_to": ["none"], **(training or {})},
        "evaluation": {"metrics": ["perplexity"], "max_samples": 2},
        "output_dir": str(out),
    }


def validate(tmp_path, capsys, data: dict) -> tuple[int, list[str]]:
    from ftk.cli import main

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        main(["validate", str(path)])
    return e.value.code, capsys.readouterr().err.splitlines()


@pytest.fixture
def without(monkeypatch):
    """Make the named top-level packages look uninstalled to importlib.util.find_spec."""
    def _hide(*names):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, **k: None if name.split(".")[0] in names else real(name, *a, **k))
    return _hide


# -- refused at validation ------------------------------------------------------------------------
@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_tracker_not_installed_is_refused(tmp_path, capsys, without, tracker):
    without(tracker)
    code, err = validate(tmp_path, capsys, recipe(tmp_path / "out", training={"report_to": ["tensorboard", tracker]}))
    assert code == 2
    assert err == [f"error: training.report_to: {tracker} is not installed (pip install {tracker})"]


def test_installed_tracker_is_accepted(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == "wandb" else real(name, *a, **k))
    code, err = validate(tmp_path, capsys, recipe(tmp_path / "out", training={"report_to": ["wandb"]}))
    assert code == 0, err


@pytest.mark.parametrize("section,key,value,line", [
    ("training", "precision", "fp16",
     "error: training.precision: fp16 mixed precision needs a CUDA GPU (none found); use \"bf16\", \"fp32\" or \"auto\""),
    ("model", "attn_implementation", "flash_attention_2",
     "error: model.attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; use \"sdpa\""),
])
def test_what_this_cpu_cannot_run_is_refused(tmp_path, capsys, monkeypatch, section, key, value, line):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = recipe(tmp_path / "out")
    data[section][key] = value
    code, err = validate(tmp_path, capsys, data)
    assert (code, err) == (2, [line])


# -- accepted: trains -----------------------------------------------------------------------------
TRAINS = [
    pytest.param("int8", {"use_dora": True}, {}, {}, id="int8-dora"),  # crashed on the CPU before
    pytest.param("int8", {"use_dora": True}, {"gradient_checkpointing": True}, {"precision": "fp32"},
                 id="int8-dora-checkpointing-fp32"),
    # compile over int8 layers, the DoRA hook inside the compiled decoder layers (30-45 s cold, 15 s warm)
    pytest.param("int8", {"use_dora": True}, {}, {"compile": True}, id="int8-dora-compile"),
    pytest.param("nf4", {"use_dora": True}, {}, {}, id="nf4-dora"),
    pytest.param("none", {"use_dora": True, "use_rslora": True}, {}, {}, id="none-dora-rslora"),
    pytest.param("nf4", {"modules_to_save": ["lm_head"]}, {"gradient_checkpointing": True}, {},
                 id="nf4-modules_to_save-checkpointing"),
]


@pytest.mark.parametrize("quant,adapter,model,training", TRAINS)
def test_accepted_combination_trains(tmp_path, fresh_manager, quant, adapter, model, training):
    from ftk.recipe import load_recipe
    from ftk.run import prepare_run, train_run

    r = load_recipe(data=recipe(tmp_path / "out", quant, adapter, model, training), manager=fresh_manager)
    metrics = train_run(prepare_run(r, fresh_manager))
    assert metrics["steps"] == 3 and metrics["compiled_layers"] == (5 if training.get("compile") else 0)
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert len(b) == 10 and not [k for k, v in b.items() if not v.any()], "LoRA B tensors still zero"
    if adapter.get("use_dora"):
        assert len([k for k in saved if "lora_magnitude_vector" in k]) == 10
    if adapter.get("modules_to_save") == ["lm_head"]:  # trained in full: differs from the base (tied) head
        base = load_file(str(MODEL_DIR / "model.safetensors"))
        head = saved["base_model.model.lm_head.weight"]
        assert not torch.equal(head, base.get("lm_head.weight", base["model.embed_tokens.weight"]).to(head.dtype))
