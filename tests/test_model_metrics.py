"""The metric input "model": a metric that runs the scored model its own way (a benchmark harness) gets the
fine-tuned model, then the base (the same model, adapter disabled), in eval mode without grad, with the run's
tokenizer and a MetricContext; the caller's training mode and random states come back. Its directions may be a
function of its options, and an error line its factory starts with an option's path names the recipe path."""
from __future__ import annotations

import random

import pytest

from conftest import MODEL_DIR
from ftk.components import MetricInfo
from ftk.errors import FtkError
from ftk.evaluate import build_metrics, evaluate_model, metric_directions
from ftk.hookspecs import hookimpl

SEEN = []


class LogitSum:
    """The summed logits of one fixed input under the model it gets; it also reseeds and draws, as lm-eval does."""

    requires = "model"

    def __init__(self, options):
        if options.get("prompt") == "":
            raise FtkError("prompt: must not be empty")
        if options.get("prompt") == "boom":
            raise FtkError("metric 'logit_sum' refuses boom")
        self.options = options

    def compute(self, model, tokenizer, context):
        import torch

        random.seed(0), torch.manual_seed(0)
        random.random(), torch.rand(3)
        ids = tokenizer(self.options["prompt"], return_tensors="pt")["input_ids"]
        SEEN.append({"training": model.training, "grad": torch.is_grad_enabled(), "scoring": context.scoring,
                     "batch_size": context.batch_size, "seed": context.seed})
        return {f"{self.options['key']}/logit_sum": float(model(input_ids=ids).logits.double().sum()),
                f"{self.options['key']}/seconds": 0.0}


SCHEMA = {"type": "object", "properties": {"key": {"type": "string", "default": "probe"},
                                           "prompt": {"type": "string", "default": "Once upon a time"}}}


class Plugin:
    @hookimpl
    def ftk_register_metrics(self, register):
        register("logit_sum", LogitSum, options_schema=SCHEMA,
                 info=MetricInfo(keys=lambda o: [f"{o['key']}/logit_sum", f"{o['key']}/seconds"],
                                 higher_is_better=lambda o: {f"{o['key']}/logit_sum": True}, requires="model"))


@pytest.fixture
def mgr(fresh_manager):
    fresh_manager.register(Plugin(), name="probe", package="ftk-probe", version="1.0")
    SEEN.clear()
    return fresh_manager


def test_the_metric_gets_each_model_in_eval_mode_and_the_callers_state_comes_back(mgr):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftk.components import PreparedData

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL_DIR),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    model.train()
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ft_ref = float(model.eval()(input_ids=ids).logits.double().sum())
        with model.disable_adapter():
            base_ref = float(model(input_ids=ids).logits.double().sum())
    model.train()

    recipe = {"training": {"batch_size": 3, "seed": 7},
              "evaluation": {"metrics": [{"name": "logit_sum", "key": "probe", "prompt": "Once upon a time"}],
                             "compare_base": True}}
    prepared = PreparedData(train=[], validation=None, collator=None)
    random.seed(5), torch.manual_seed(5)
    out = evaluate_model(model, tok, prepared, recipe, mgr)
    drawn = (random.random(), float(torch.rand(1)))
    random.seed(5), torch.manual_seed(5)
    assert drawn == (random.random(), float(torch.rand(1)))  # the metric's seeding did not leak
    assert model.training
    assert out["finetuned"]["probe/logit_sum"] == pytest.approx(ft_ref, rel=1e-9)
    assert out["base"]["probe/logit_sum"] == pytest.approx(base_ref, rel=1e-9)
    assert ft_ref != pytest.approx(base_ref, rel=1e-4)
    assert SEEN == [{"training": False, "grad": False, "scoring": s, "batch_size": 3, "seed": 7}
                    for s in ("finetuned", "base")]


def test_directions_may_depend_on_the_options(mgr):
    recipe = {"evaluation": {"metrics": [{"name": "logit_sum", "key": "a"}, {"name": "logit_sum", "key": "b"}]}}
    directions = metric_directions(recipe, mgr)
    assert directions == {"a/logit_sum": True, "b/logit_sum": True}  # "*/seconds": declared, no direction


def test_a_factory_error_on_an_option_names_its_recipe_path(mgr):
    with pytest.raises(FtkError) as e:
        build_metrics({"evaluation": {"metrics": ["perplexity", {"name": "logit_sum", "prompt": ""}]}}, mgr)
    assert e.value.messages == ["evaluation.metrics[1].prompt: must not be empty"]
    with pytest.raises(FtkError) as e:  # a line that names no option is shown as written
        build_metrics({"evaluation": {"metrics": [{"name": "logit_sum", "prompt": "boom"}]}}, mgr)
    assert e.value.messages == ["metric 'logit_sum' refuses boom"]
