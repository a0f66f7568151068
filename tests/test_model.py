"""Model loading, bitsandbytes quantizers and the LoRA adapter on the real stories260K checkpoint."""
from __future__ import annotations

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import model as M
from ftk.errors import FtkError

torch.set_num_threads(1)


def recipe(quant=None, adapter=None, training=None, **model_keys):
    from ftk.recipe import load_recipe

    return load_recipe(data={
        "model": {"name": str(MODEL_DIR), "quantization": quant or {"method": "nf4"}, **model_keys},
        "adapter": {"method": "lora", **(adapter or {})},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA)}]},
        "training": training or {},
    })


def load(fresh_manager, **kw):
    r = recipe(**kw)
    tok = M.load_tokenizer(r)
    return M.load_model(r, fresh_manager, tok), tok


def linear4bit(model):
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("qtype,nested", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_4bit_layers_are_real_bnb(fresh_manager, qtype, nested, capsys):
    (model, info), _ = load(fresh_manager, quant={"method": qtype, "nested": nested})
    q = linear4bit(model)
    # attention projections are 64 wide (q/o) and 32 wide (k/v): all quantized, in all 5 layers
    assert sorted({n.split(".")[-2] if n.endswith(("base_layer",)) else n.split(".")[-1] for n in q}) == \
        ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(q) == 20 and info["quantization"]["quantized_layers"] == 20
    for mod in q.values():
        assert mod.weight.dtype == torch.uint8  # packed 4-bit storage, not a float weight
        qs = mod.weight.quant_state
        assert qs.quant_type == qtype
        assert qs.nested is nested
        assert qs.blocksize == 64
    # the 172-wide MLP is left unquantized, with a note saying why
    mlp = dict(model.named_modules())["base_model.model.model.layers.0.mlp.up_proj"]
    assert type(mlp) is torch.nn.Linear
    assert any("172" in n and "up_proj" in n for n in info["quantization"]["notes"])
    out = capsys.readouterr().out
    assert f"trainable params: {info['trainable_parameters']:,} (" in out
    assert "left unquantized" in out


def test_4bit_dequantizes_close_to_fp32(fresh_manager):
    """The packed weights are the checkpoint's weights: dequantizing them gives back the fp32 values
    to 4-bit precision (NF4 error bounded by half a quantization step times the block absmax)."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    (model, _), _ = load(fresh_manager, quant={"method": "nf4", "nested": True})
    ref = AutoModelForCausalLM.from_pretrained(MODEL_DIR).model.layers[2].self_attn.q_proj.weight
    mod = linear4bit(model)["base_model.model.model.layers.2.self_attn.q_proj.base_layer"]
    deq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    err = (deq - ref).abs()
    assert err.max() < 0.2 * ref.abs().max()
    assert 0 < err.mean() < 0.1 * ref.abs().mean() * 10


def test_int8_and_none(fresh_manager):
    import bitsandbytes as bnb

    (m8, info8), _ = load(fresh_manager, quant={"method": "int8"})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in m8.modules())
    assert info8["quantization"]["quantized_layers"] > 0
    (m0, info0), _ = load(fresh_manager, quant={"method": "none"})
    assert info0["quantization"]["quantized_layers"] == 0
    assert not any("bitsandbytes" in type(m).__module__ for m in m0.modules())


def test_incompatible_layers_can_be_refused(fresh_manager):
    with pytest.raises(FtkError, match=r"cannot quantize model\.layers\.0\.mlp\.gate_proj"):
        load(fresh_manager, quant={"method": "nf4", "on_incompatible": "error"})


def test_lora_only_on_chosen_modules(fresh_manager):
    (model, info), _ = load(fresh_manager, adapter={"target_modules": ["q_proj", "v_proj"], "r": 4})
    lora_parents = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in model.named_modules()
                    if n.endswith(".lora_A")}
    assert lora_parents == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    # 5 layers x (q: 4*64 + 64*4, v: 4*64 + 32*4)
    assert info["trainable_parameters"] == 5 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


def test_all_linear_preset_comes_from_the_hook(fresh_manager):
    from ftk.hookspecs import hookimpl

    class OtherArch:
        @hookimpl(tryfirst=True)
        def ftk_adapter_targets(self, model_type, preset):
            return ["o_proj"] if preset == "all-linear" else None

    (model, _), _ = load(fresh_manager, adapter={"target_modules": "all-linear"})
    names = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    fresh_manager.register(OtherArch(), name="other-arch")
    (model, _), _ = load(fresh_manager, adapter={"target_modules": "all-linear"})
    names = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert names == {"o_proj"}


def test_unknown_target_module_is_an_error(fresh_manager):
    with pytest.raises(FtkError, match=r"adapter\.target_modules: no module named 'qproj'"):
        load(fresh_manager, adapter={"target_modules": ["q_proj", "qproj"]})
    # a bare suffix of a name is no match for PEFT either
    with pytest.raises(FtkError, match=r"adapter\.target_modules: no module named 'proj'"):
        load(fresh_manager, adapter={"target_modules": ["q_proj", "proj"]})
    load(fresh_manager, adapter={"target_modules": ["self_attn.q_proj"]})  # a dotted suffix is one


def test_rslora_dora_modules_to_save(fresh_manager):
    (model, _), _ = load(fresh_manager, quant={"method": "none"},
                         adapter={"use_rslora": True, "use_dora": True, "r": 4, "alpha": 8,
                                  "modules_to_save": ["lm_head"]})
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora and "lm_head" in cfg.modules_to_save
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA magnitude vector


def test_eval_no_grad_generate_of_quantized_lora(fresh_manager):
    """ftk keeps every 4-bit layer off bitsandbytes' CPU inference layout (no backward pass), also after
    an eval/no-grad pass; generation works and a freshly attached adapter (B = 0) leaves the quantized
    base's outputs unchanged."""
    (model, _), tok = load(fresh_manager, quant={"method": "nf4"})
    layers = linear4bit(model).values()
    assert layers and all(mod.support_avx512bf16_for_cpu is False for mod in layers)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        with model.disable_adapter():
            b = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    assert out.shape[1] == ids.shape[1] + 8
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_gradient_checkpointing_with_kbit_trains(fresh_manager):
    """k-bit preparation + checkpointing: the LoRA weights get gradients (the 'does not require grad' trap)."""
    (model, info), tok = load(fresh_manager, gradient_checkpointing=True)
    assert info["gradient_checkpointing"] and model.base_model.model.is_gradient_checkpointing
    model.train()
    ids = tok("Once upon a time there was a dog", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for n, g in ((n, p.grad) for n, p in model.named_parameters() if "lora_B" in n))


def test_precision_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FtkError, match="training.precision: fp16 .* needs a CUDA GPU"):
        M.resolve_precision("fp16")
    assert M.resolve_precision("fp32") == "fp32"
    assert M.resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(M, "cpu_has_fast_bf16", lambda: True)
    assert M.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(M, "cpu_has_fast_bf16", lambda: False)
    assert M.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    assert M.resolve_precision("auto") == "fp16"
    with pytest.raises(FtkError, match=r"Tesla T4\) has no bf16"):
        M.resolve_precision("bf16")


def test_model_errors_are_one_line(fresh_manager, tmp_path):
    with pytest.raises(FtkError, match="model.attn_implementation: flash_attention_2 needs"):
        load(fresh_manager, attn_implementation="flash_attention_2")
    bad = recipe()
    bad["model"]["name"] = str(tmp_path / "nope")
    with pytest.raises(FtkError, match="model.name: cannot load a tokenizer"):
        M.load_tokenizer(bad)


def test_merge_and_generate_load_an_adapter_trained_with_an_added_token(tmp_path):
    """Training resizes the embeddings when the tokenizer gains a pad token; PEFT then saves the
    resized embedding layer, so merge/generate must resize the base the same way before loading it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    base = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(str(adapter))
    tok.save_pretrained(str(adapter))
    model, loaded_tok = M.load_unquantized(str(MODEL_DIR), adapter)
    assert len(loaded_tok) == len(tok) == model.get_input_embeddings().weight.shape[0]
    out = M.merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)


def test_bf16_keeps_frozen_weights_bf16_and_adapter_fp32(fresh_manager, tmp_path):
    """With bf16 compute, frozen non-quantized weights stay bf16 (no fp32 copies to cast on every use)
    while the trainable adapter stays fp32, and a training step gives a finite loss."""
    from ftk.recipe import load_recipe

    r = load_recipe(data={"model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}},
                          "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA)}]},
                          "training": {"precision": "bf16"}, "output_dir": str(tmp_path)}, manager=fresh_manager)
    model, info = M.load_model(r, fresh_manager, None)
    assert info["precision"] == "bf16"
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_float = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen_float and all(p.dtype == torch.bfloat16 for p in frozen_float)
    ids = torch.randint(3, 500, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable)
