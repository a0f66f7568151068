"""What only a component knows comes from the component: `ftk plan` uses a third-party quantizer's and
adapter's declarations (with no built-in quantizer or adapter loaded), says "unknown" for what a
component does not declare, and the run's `quantized_layers` is the quantizer's own count."""
from __future__ import annotations

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import hookimpl
from ftk.components import AdapterInfo, QuantizationPlan
from ftk.testing import make_manager, register_on

torch.set_num_threads(1)

# stories260K: 5 layers, hidden 64, 8 heads / 4 kv heads (k/v 32 wide), MLP 172 wide, vocab 512 (tied)
LAYERS, H, KV, I = 5, 64, 32, 172
LINEAR = LAYERS * (2 * H * H + 2 * H * KV + 3 * H * I)


def plan_halfq(options, ctx):
    return QuantizationPlan(from_pretrained_kwargs={}, notes=["halfq: q_proj only"], kbit=False,
                            bytes_per_weight=0.25, quantizes=lambda name, i, o: name.endswith(".q_proj"),
                            count_quantized=lambda model: sum(1 for n, _ in model.named_modules()
                                                              if n.endswith("q_proj")))


def plan_opaque(options, ctx):  # a quantizer written against the hooks as documented before 0.1.0
    return QuantizationPlan(from_pretrained_kwargs={}, notes=[])


def norms_only(model, options, ctx):
    for name, p in model.named_parameters():
        p.requires_grad = "norm" in name
    return model


def norm_count(options, linears, ctx):
    cfg = ctx.model_config
    return cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)


def norm_activations(options, linears, ctx, compute_bytes):
    assert len(linears) == 7  # one decoder layer's
    return 1000 * compute_bytes


class ThirdParty:
    @hookimpl
    def ftk_register_quantizers(self, register):
        register("halfq", plan_halfq, description="q_proj at 2 bits (declares its sizes)",
                 options_schema={"type": "object"})
        register("opaque", plan_opaque, description="declares nothing", options_schema={"type": "object"})

    @hookimpl
    def ftk_register_adapters(self, register):
        register("norms", norms_only, description="norm weights (declares its count)",
                 options_schema={"type": "object"},
                 info=AdapterInfo(trainable_parameters=norm_count, activation_bytes=norm_activations))
        register("mystery", norms_only, description="declares nothing", options_schema={"type": "object"})


@pytest.fixture
def manager():
    """No built-in quantizer or adapter: only the third party's, plus the alpaca loader and sft trainer."""
    import ftk.plugins.data_alpaca
    import ftk.plugins.trainer_sft

    mgr = make_manager(load_entrypoints=False)
    register_on(mgr, ftk.plugins.data_alpaca, "alpaca", package="ftk")
    register_on(mgr, ftk.plugins.trainer_sft, "sft", package="ftk")
    register_on(mgr, ThirdParty(), "thirdparty", package="ftk-thirdparty", version="1.0")
    assert set(mgr.components("quantizer")) == {"halfq", "opaque"}
    assert set(mgr.components("adapter")) == {"norms", "mystery"}
    return mgr


def recipe(manager, quant, adapter, tmp_path):
    from ftk.recipe import load_recipe

    return load_recipe(data={
        "model": {"name": str(MODEL_DIR), "quantization": {"method": quant}},
        "adapter": {"method": adapter},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 20}],
                 "cache_dir": str(tmp_path)},
        "training": {"precision": "fp32", "report_to": ["none"]},
        "evaluation": {"metrics": []},
        "output_dir": str(tmp_path / "run"),
    }, manager=manager)


def test_plan_uses_the_third_party_declarations(manager, tmp_path):
    from ftk.plan import format_plan, plan

    p = plan(recipe(manager, "halfq", "norms", tmp_path), manager, with_data=False)
    emb, norms = 512 * H, H * (2 * LAYERS + 1)
    assert p["parameters"] == LINEAR + emb + norms
    assert p["trainable_parameters"] == norms
    assert p["assumptions"]["quantized_linear_parameters"] == LAYERS * H * H
    store = p["assumptions"]["compute_bytes"]
    assert p["bytes"]["weights"] == int(LAYERS * H * H * 0.25 + (LINEAR - LAYERS * H * H + emb + norms) * store)
    assert p["bytes"]["lora_weights"] == p["bytes"]["gradients"] == 4 * norms
    assert p["bytes"]["total"] == sum(v for k, v in p["bytes"].items() if k != "total")
    assert p["unknown"] == []
    assert "unknown" not in format_plan(p)
    # the adapter's declared activations come on top of the base layers' own, in every kept layer
    base = plan(recipe(manager, "halfq", "mystery", tmp_path), manager, with_data=False)
    tokens, ckpt = p["assumptions"]["tokens_per_micro_batch"], p["assumptions"]["gradient_checkpointing"]
    assert not ckpt
    assert p["bytes"]["activations"] - base["bytes"]["activations"] == tokens * (LAYERS + 1) * 1000 * store


def test_plan_says_what_an_undeclared_component_does_not_tell(manager, tmp_path):
    from ftk.plan import format_plan, plan

    p = plan(recipe(manager, "opaque", "mystery", tmp_path), manager, with_data=False)
    assert p["parameters"] > 0 and p["bytes"]["activations"] > 0  # what ftk knows by itself
    assert p["trainable_parameters"] is None and p["bytes"]["weights"] is None and p["bytes"]["total"] is None
    text = format_plan(p)
    assert "trainable (adapter) parameters: unknown" in text
    assert "unknown for quantizer 'opaque'" in text and "unknown for adapter 'mystery'" in text
    assert "adapter 'mystery' declares no activation_bytes" in text


def test_quantized_layers_is_the_quantizers_count(manager, tmp_path):
    from ftk import model as M

    r = recipe(manager, "halfq", "norms", tmp_path)
    model, info = M.load_model(r, manager, M.load_tokenizer(r))
    assert info["quantization"]["quantized_layers"] == LAYERS  # its count, not bitsandbytes class names
    assert info["trainable_parameters"] == H * (2 * LAYERS + 1)
    r = recipe(manager, "opaque", "norms", tmp_path)
    _, info = M.load_model(r, manager, M.load_tokenizer(r))
    assert info["quantization"]["quantized_layers"] is None  # undeclared: unknown, not a wrong 0


def test_a_third_party_adapter_over_nf4_counts_the_packed_weights(fresh_manager, tmp_path):
    """bitsandbytes' packed 4-bit storage is counted by the quantizer's weights_in, not by the core."""
    from ftk import model as M

    register_on(fresh_manager, ThirdParty(), "thirdparty", package="ftk-thirdparty", version="1.0")
    r = recipe(fresh_manager, "nf4", "norms", tmp_path)
    _, info = M.load_model(r, fresh_manager, M.load_tokenizer(r))
    assert info["parameters"] == 512 * H + LINEAR + H * (2 * LAYERS + 1)  # what the unquantized model has
    assert info["quantization"]["quantized_layers"] == 20  # bitsandbytes' count: q, k, v, o in 5 layers


def test_api_gives_nested_only_to_quantizers_that_take_it(manager):
    from ftk.api import ModelConfig

    assert ModelConfig(name="m", quantization="halfq").to_recipe(manager)["quantization"] == {"method": "halfq"}
    assert ModelConfig(name="m", nested=False).to_recipe()["quantization"] == \
        {"method": "nf4", "nested": False, "compute_dtype": "auto"}


def test_adapter_info_must_be_adapter_info():
    class Bad:
        @hookimpl
        def ftk_register_adapters(self, register):
            register("bad", norms_only, info={"trainable_parameters": 3})

    mgr = make_manager(load_entrypoints=False)
    rec = mgr.register(Bad(), name="bad")
    mgr.plugin_list()
    assert rec.status == "error" and "AdapterInfo" in rec.error


def test_a_declaration_that_raises_names_its_plugin(manager, tmp_path):
    from ftk.errors import PluginFailure
    from ftk.plan import plan

    def plan_broken(options, ctx):
        return QuantizationPlan(from_pretrained_kwargs={}, bytes_per_weight=1.0, quantizes=lambda n, i, o: 1 / 0)

    class Broken:
        @hookimpl
        def ftk_register_quantizers(self, register):
            register("broken", plan_broken, options_schema={"type": "object"})

    register_on(manager, Broken(), "broken", package="ftk-broken", version="2.0")
    with pytest.raises(PluginFailure, match=r"plugin 'broken' \(ftk-broken 2.0\), quantizer 'broken', while "
                                             r"estimating memory: ZeroDivisionError"):
        plan(recipe(manager, "broken", "norms", tmp_path), manager, with_data=False)
