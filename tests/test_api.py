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
    # the message names the argument the user wrote and the recipe key it fills
    with pytest.raises(FtkError, match=r"TrainingConfig.learning_rate \(recipe training.learning_rate\): -1 is less "
                                       r"than the minimum"):
        LLAMATrainer(model_config=ModelConfig(name=str(MODEL_DIR)),
                     data_config=DataConfig(datasets=[{"loader": "alpaca", "path": str(ALPACA)}]),
                     training_config=TrainingConfig(learning_rate=-1), output_dir=str(tmp_path))
    with pytest.raises(FtkError, match=r"LoRAConfig.r \(recipe adapter.r\): 0 is less than the minimum"):
        LLAMATrainer(model_config=ModelConfig(name=str(MODEL_DIR)), lora_config=LoRAConfig(r=0),
                     data_config=DataConfig(datasets=[{"loader": "alpaca", "path": str(ALPACA)}]),
                     output_dir=str(tmp_path))


SPEC_MODEL = dict(use_4bit=True, bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_type="nf4",
                  use_nested_quant=True, cache_dir=None)
SPEC_LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"], lora_dropout=0.05, bias="none",
                 task_type="CAUSAL_LM")


def test_the_specifications_keywords_are_the_same_settings():
    """Section 6's calls, verbatim, make exactly the recipe ftk's own names make."""
    spec = ModelConfig(model_name=str(MODEL_DIR), **SPEC_MODEL)
    own = ModelConfig(name=str(MODEL_DIR), quantization="nf4", compute_dtype="bfloat16", nested=True)
    assert spec == own and spec.to_recipe() == own.to_recipe()
    assert spec.to_recipe()["quantization"] == {"method": "nf4", "nested": True, "compute_dtype": "bfloat16"}
    assert (spec.model_name, spec.use_4bit, spec.bnb_4bit_quant_type, spec.use_nested_quant,
            spec.bnb_4bit_compute_dtype) == (str(MODEL_DIR), True, "nf4", True, "bfloat16")
    fp4 = ModelConfig(model_name="m", bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    assert fp4.to_recipe()["quantization"] == {"method": "fp4", "nested": True, "compute_dtype": "float32"}
    assert ModelConfig(model_name="m", use_4bit=False).to_recipe()["quantization"] == {"method": "none"}

    lora = LoRAConfig(**SPEC_LORA)
    assert lora == LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj"], dropout=0.05, bias="none")
    assert (lora.lora_alpha, lora.lora_dropout, lora.task_type) == (16, 0.05, "CAUSAL_LM")
    assert lora.to_recipe()["alpha"] == 16 and "task_type" not in lora.to_recipe()


@pytest.mark.parametrize("call, message", [
    (lambda: ModelConfig(model_name="m", bnb_4bit_quant_type="nf5"), r"ModelConfig.bnb_4bit_quant_type: 'nf5'"),
    (lambda: ModelConfig(model_name="m", use_4bit=False, bnb_4bit_quant_type="nf4"), r"ModelConfig.use_4bit: False"),
    (lambda: ModelConfig(model_name="m", quantization="int8", use_4bit=True), r"quantization='int8' contradicts"),
    (lambda: ModelConfig(model_name="m", name="other"), r"model_name= and name= are the same setting"),
    (lambda: ModelConfig(model_name="m", use_8bit=True), r"ModelConfig: unknown argument use_8bit="),
    (lambda: ModelConfig(name="m", quantization="int8", use_nested_quant=True).to_recipe(),
     r"ModelConfig.nested: quantizer 'int8' has no 'nested' option"),
    (lambda: LoRAConfig(task_type="SEQ_CLS"), r"LoRAConfig.task_type: .*'SEQ_CLS' is not CAUSAL_LM"),
    (lambda: LoRAConfig(lora_alpha=16, alpha=32), r"lora_alpha= and alpha= are the same setting"),
])
def test_a_wrong_call_is_one_ftk_error_naming_the_argument(call, message):
    with pytest.raises(FtkError, match=message):
        call()


def test_wrong_values_name_the_argument_not_only_the_recipe_key(tmp_path):
    data = DataConfig(datasets=[{"loader": "alpaca", "path": str(ALPACA)}])
    with pytest.raises(FtkError, match=r"ModelConfig.quantization \(recipe model.quantization.method\): "
                                       r"unknown quantizer 'nf5'"):
        LLAMATrainer(model_config=ModelConfig(name=str(MODEL_DIR), quantization="nf5"), data_config=data,
                     output_dir=str(tmp_path))
    with pytest.raises(FtkError, match=r"DataConfig.datasets\[0\].path \(recipe data.datasets\[0\].path\): "
                                       r".*missing.json does not exist"):
        LLAMATrainer(model_config=ModelConfig(name=str(MODEL_DIR)), output_dir=str(tmp_path),
                     data_config=DataConfig(datasets=[{"loader": "alpaca", "path": str(tmp_path / "missing.json")}]))


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


# -- the specification's extension objects: bad ones are one error naming them ---------------------
class RaisingLoader:
    def __init__(self, tokenizer, max_length):
        pass

    def load(self):
        raise ValueError("the database is down")


class ListLoader(RaisingLoader):
    def load(self):
        return [{"text": "a"}]


class RaisingMetric:
    def compute_metric(self, predictions, references):
        raise ZeroDivisionError("division by zero")


class TextMetric:
    def compute_metric(self, predictions, references):
        return "good"


def _spec_trainer(tmp_path, datasets, metrics=("perplexity",)):
    return LLAMATrainer(model_config=ModelConfig(model_name=str(MODEL_DIR), use_4bit=True),
                        data_config=DataConfig(datasets=list(datasets), max_length=64, validation_size=4),
                        training_config=TrainingConfig(max_steps=1, report_to=["none"]),
                        eval_config=EvalConfig(metrics=list(metrics), max_samples=2, compare_base=False,
                                               generation={"max_new_tokens": 4}),
                        output_dir=str(tmp_path / "out"))


def test_a_failing_or_wrong_loader_class_is_one_error_naming_it(tmp_path):
    from ftk.errors import DataError, PluginFailure

    with pytest.raises(PluginFailure, match=r"plugin 'local:dataset:RaisingLoader' \(local\), dataset 'RaisingLoader', "
                                            r"while loading data: ValueError: the database is down"):
        _spec_trainer(tmp_path, [RaisingLoader]).train()
    with pytest.raises(DataError, match=r"ListLoader.load\(\): returned list; a datasets.DatasetDict"):
        _spec_trainer(tmp_path, [ListLoader]).train()
    with pytest.raises(FtkError, match=r"DataConfig.datasets: .* is neither a"):
        _spec_trainer(tmp_path, [object()])


def test_a_failing_or_wrong_metric_object_is_one_error_naming_it(tmp_path):
    from ftk.errors import PluginFailure

    data = [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 16}]
    with pytest.raises(PluginFailure, match=r"plugin 'local:metric:RaisingMetric' .*ZeroDivisionError"):
        _spec_trainer(tmp_path, data, ["perplexity", RaisingMetric()]).evaluate()
    with pytest.raises(FtkError, match=r"TextMetric.compute_metric: returned str 'good'; a number is required"):
        _spec_trainer(tmp_path, data, [TextMetric()]).evaluate()
