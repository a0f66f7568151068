"""The seed's Python API: config dataclasses -> validated recipe -> train -> evaluate."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk.api import DataConfig, EvalConfig, LLAMATrainer, LoRAConfig, ModelConfig, TrainingConfig
from ftk.errors import FtkError

torch.set_num_threads(1)


def test_defaults_match_the_seed():
    t, lora, m = TrainingConfig(), LoRAConfig(), ModelConfig(name="x")
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.bias) == (8, 16, 0.05, ["q_proj", "v_proj"], "none")
    assert (t.epochs, t.batch_size, t.gradient_accumulation_steps, t.learning_rate, t.weight_decay,
            t.warmup_ratio, t.max_grad_norm, t.lr_scheduler, t.optimizer) == \
        (3, 4, 4, 2e-4, 0.01, 0.03, 0.3, "cosine", "paged_adamw_32bit")
    assert m.to_recipe()["quantization"] == {"method": "nf4", "nested": True, "compute_dtype": "auto"}


def test_invalid_config_is_validated_like_a_recipe(tmp_path):
    with pytest.raises(FtkError, match=r"training.learning_rate: -1 is less than the minimum"):
        LLAMATrainer(model_config=ModelConfig(name=str(MODEL_DIR)),
                     data_config=DataConfig(datasets=[{"loader": "alpaca", "path": str(ALPACA)}]),
                     training_config=TrainingConfig(learning_rate=-1), output_dir=str(tmp_path))
    with pytest.raises(FtkError, match=r"adapter.r: 0 is less than the minimum"):
        LLAMATrainer(model_config=ModelConfig(name=str(MODEL_DIR)), lora_config=LoRAConfig(r=0),
                     data_config=DataConfig(datasets=[{"loader": "alpaca", "path": str(ALPACA)}]),
                     output_dir=str(tmp_path))


def test_train_and_evaluate(tmp_path):
    t = LLAMATrainer(
        model_config=ModelConfig(name=str(MODEL_DIR), quantization="nf4"),
        lora_config=LoRAConfig(r=4, alpha=8),
        data_config=DataConfig(datasets=[{"loader": "alpaca", "path": str(ALPACA), "max_examples": 40}],
                               max_length=64, validation_size=8, options={"cache": False}),
        training_config=TrainingConfig(max_steps=3, batch_size=4, gradient_accumulation_steps=1,
                                       learning_rate=2e-3, report_to=["none"]),
        eval_config=EvalConfig(metrics=["perplexity", "bleu"], max_samples=2, compare_base=True,
                               generation={"max_new_tokens": 8, "num_beams": 1}),
        output_dir=str(tmp_path / "out"))
    m = t.train()
    assert m["steps"] == 3 and m["eval_loss_after"] < m["eval_loss_before"]
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["adapter"]["r"] == 4
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    res = t.evaluate()
    assert res["finetuned"]["perplexity"] < res["base"]["perplexity"]
    gen = t.evaluate(test_prompts=["Once upon a time"], test_references=["there was a girl"])
    assert len(gen["predictions"]) == 1 and 0 <= gen["bleu"] <= 1 and "rouge1" in gen
    # the same generation as plain greedy decoding with the model
    ids = t.tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        t.model.eval()
        want = t.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, num_beams=1)
    text = t.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    assert gen["predictions"][0] == text
