"""Training trains on every machine (issue 12). Invariants that hold on any CPU: after a short run every
LoRA B tensor moved and the loss on a fixed batch went down, for each quantizer, with and without an
evaluation before (and during) training, with compile and checkpointing; no 4-bit weight is ever in
bitsandbytes' CPU inference layout while training; and a run that cannot learn stops with one line."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk import data as D
from ftk import model as M
from ftk import train as T
from ftk.errors import RunError
from ftk.hookspecs import hookimpl

torch.set_num_threads(1)

QUANTIZERS = {
    "nf4": {"method": "nf4"},
    "nf4-flat": {"method": "nf4", "nested": False},
    "fp4": {"method": "fp4"},
    "int8": {"method": "int8"},
    "none": {"method": "none"},
}


def recipe_data(out, quant=None, validation=8, model=None, **training) -> dict:
    return {
        "model": {"name": str(MODEL_DIR), "quantization": quant or {"method": "nf4"}, **(model or {})},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                 "max_length": 64, "validation_size": validation, "cache": False},
        "training": {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                     "warmup_ratio": 0, "report_to": ["none"], **training},
        "evaluation": {"metrics": ["perplexity"], "compare_base": True, "max_samples": 2},
        "output_dir": str(out),
    }


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def inference_layout(model) -> list:
    """4-bit layers whose weight is in, or may be repacked into, bitsandbytes' CPU inference layout."""
    return [m for m in four_bit_layers(model)
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False) or m.support_avx512bf16_for_cpu]


class LayoutSpy:
    """A callback plugin that records, at every training step, 4-bit layers that could not backpropagate."""

    def __init__(self):
        self.steps, self.bad = 0, []

    @hookimpl
    def ftk_trainer_callbacks(self, recipe, output_dir):
        from transformers import TrainerCallback

        spy = self

        class Check(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kw):
                spy.steps += 1
                spy.bad += inference_layout(model)

            on_step_end = on_step_begin

        return [Check()]


def lora_b(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def fixed_batch_loss(model, prepared) -> float:
    # train mode with grad enabled: measuring must not itself be an eval/no-grad pass
    model.train()
    batch = prepared.collator(list(prepared.train)[:4])
    with torch.enable_grad():
        return model(**batch).loss.item()


def train_once(tmp_path, manager, **kw):
    from ftk.recipe import load_recipe

    r = load_recipe(data=recipe_data(tmp_path / "out", **kw))
    tok = M.load_tokenizer(r)
    prepared = D.prepare_data(r, tok, manager)
    model, info = M.load_model(r, manager, tok)
    return r, tok, prepared, model, info


CASES = [pytest.param(q, v, {}, {}, id=f"{q}-{'eval' if v else 'noeval'}") for q in QUANTIZERS for v in (8, 0)]
CASES += [pytest.param("nf4", 8, {"compile": True}, {}, id="nf4-compile"),
          pytest.param("nf4", 8, {}, {"gradient_checkpointing": True}, id="nf4-checkpointing"),
          pytest.param("nf4", 8, {"precision": "bf16"}, {}, id="nf4-bf16"),
          pytest.param("int8", 8, {"precision": "bf16"}, {}, id="int8-bf16")]


@pytest.mark.parametrize("quant,validation,training,model_opts", CASES)
def test_training_moves_every_adapter_tensor(tmp_path, fresh_manager, quant, validation, training, model_opts):
    spy = LayoutSpy()
    fresh_manager.register(spy, name="layout-spy")
    # evaluation during training too (eval_steps): a no-grad pass between steps must not break the next
    extra = {"eval_steps": 2} if validation else {}
    r, tok, prepared, model, _ = train_once(tmp_path, fresh_manager, quant=QUANTIZERS[quant], validation=validation,
                                            model=model_opts, **extra, **training)
    before_b, before_loss = lora_b(model), fixed_batch_loss(model, prepared)
    metrics = T.train(model, tok, prepared, r, fresh_manager, str(tmp_path / "out"))
    after_b, after_loss = lora_b(model), fixed_batch_loss(model, prepared)
    assert metrics["steps"] == 4 and ("eval_loss_before" in metrics) == bool(validation)
    assert before_b.keys() == after_b.keys() and len(before_b) == 10  # q and v in 5 layers
    unmoved = [n for n in before_b if torch.equal(before_b[n], after_b[n])]
    assert not unmoved, f"LoRA B tensors that did not train: {unmoved}"
    assert after_loss < before_loss
    assert spy.steps == 2 * 4 and not spy.bad  # checked at every step's begin and end
    if quant in ("nf4", "nf4-flat", "fp4"):
        assert four_bit_layers(model)


def test_loaded_model_never_repacks_even_after_an_eval_pass(fresh_manager, tmp_path):
    """Structural, on every CPU: ftk's loading switches the repacking off, so an eval/no-grad pass (what
    Trainer.evaluate does) leaves every 4-bit weight in the layout that backpropagates."""
    _, tok, prepared, model, info = train_once(tmp_path, fresh_manager)
    assert four_bit_layers(model) and not inference_layout(model)
    model.eval()
    with torch.no_grad():
        model(**prepared.collator(list(prepared.train)[:2]))
    assert not inference_layout(model)
    from bitsandbytes.functional import has_avx512bf16

    noted = any("inference layout" in n for n in info["quantization"]["notes"])
    assert noted == bool(has_avx512bf16())  # the note appears only where it applies


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_bnb_inference_layout_is_reached_and_undone():
    """docs/bitsandbytes-cpu-autograd.md, on a CPU where it applies: an eval/no-grad pass repacks the
    weight; keep_trainable_layout unpacks it and the layer backpropagates exactly as before."""
    import bitsandbytes as bnb

    from ftk.plugins.quant_bnb import keep_trainable_layout

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(torch.nn.Linear(64, 64, bias=False).state_dict())
    layer = layer.to("cpu")
    x = torch.randn(4, 64, requires_grad=True)

    def input_grad():
        x.grad = None
        layer.train()
        layer(x).sum().backward()
        return x.grad.clone()

    want = input_grad()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert layer.weight.quant_state.packing_format_for_cpu  # the inference path was reached
    notes = keep_trainable_layout(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert any("unpacked" in n for n in notes)
    # the backward pass is back: d(sum(x W^T))/dx is the weight the layer now holds, dequantized
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    got = input_grad()
    torch.testing.assert_close(got, torch.ones(4, 64) @ w)
    # and close to the original: the repacking rounded the block scales to bf16 (it is lossy)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_guard_catches_the_real_bnb_layout_bug(tmp_path, fresh_manager, monkeypatch):
    """Without ftk's fix, bitsandbytes' own behaviour on this CPU: the guard stops the run at step 1."""
    from ftk.plugins import quant_bnb

    monkeypatch.setattr(quant_bnb, "keep_trainable_layout", lambda model: None)
    r, tok, prepared, model, _ = train_once(tmp_path, fresh_manager)
    with pytest.raises(RunError, match=r"^training cannot learn: the 20 trainable tensors got no gradient at the "
                                       r"first optimizer step \(global norm 0\)"):
        T.train(model, tok, prepared, r, fresh_manager, str(tmp_path / "out"))


def _detach_4bit_outputs(monkeypatch):
    """A stand-in for any library change that cuts the backward pass of 4-bit layers."""
    import bitsandbytes as bnb

    real = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: real(self, x).detach())


def test_no_gradient_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    from ftk.cli import main

    _detach_4bit_outputs(monkeypatch)
    (tmp_path / "r.json").write_text(json.dumps(recipe_data(tmp_path / "out")))
    with pytest.raises(SystemExit) as e:
        main(["run", str(tmp_path / "r.json")])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert e.value.code == 1 and "Traceback" not in stderr
    assert errors == ["error: training cannot learn: the training loss does not depend on any trainable parameter "
                      "(no gradient can flow back from it); check adapter.target_modules and the quantizer "
                      "(docs/reliability.md, \"Training that cannot learn\")"], stderr[-500:]
    assert stderr.rstrip().endswith(errors[0])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == errors[0].removeprefix("error: ")
    assert not (tmp_path / "out" / "adapter").exists() and not (tmp_path / "out" / "report.md").exists()


def test_zero_gradients_stop_the_run_at_the_first_step(tmp_path, fresh_manager):
    """The loss depends on the adapter but every gradient arrives as zero (what the bitsandbytes layout bug
    looked like): stopped at the first optimizer step, before any checkpoint."""
    r, tok, prepared, model, _ = train_once(tmp_path, fresh_manager, save_steps=1)
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(torch.zeros_like)
    with pytest.raises(RunError, match=r"^training cannot learn: the 20 trainable tensors got no gradient at the "
                                       r"first optimizer step \(global norm 0\)"):
        T.train(model, tok, prepared, r, fresh_manager, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())


def test_unchanged_adapter_stops_the_run(tmp_path, fresh_manager):
    """Gradients flow but nothing moves (learning rate 0): 'training changed nothing', no adapter saved."""
    r, tok, prepared, model, _ = train_once(tmp_path, fresh_manager, learning_rate=0.0)
    with pytest.raises(RunError, match=r"^training changed nothing: after 4 optimizer step\(s\) every trainable "
                                       r"weight is bit-identical to where it started; check training.learning_rate"):
        T.train(model, tok, prepared, r, fresh_manager, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "adapter").exists()


def test_nothing_trainable_stops_before_training(tmp_path, fresh_manager):
    r, tok, prepared, model, _ = train_once(tmp_path, fresh_manager)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(RunError, match=r"^training cannot learn: no parameter of the model requires a gradient"):
        T.train(model, tok, prepared, r, fresh_manager, str(tmp_path / "out"))


def test_a_completed_run_says_so(tmp_path):
    """The other side of the guard: a run that learned is marked completed and its report shows no warning."""
    from ftk.cli import main

    (tmp_path / "r.json").write_text(json.dumps(recipe_data(tmp_path / "out")))
    with pytest.raises(SystemExit) as e:
        main(["run", str(tmp_path / "r.json")])
    assert e.value.code == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    # which CPU path ran is on record (bf16 speed and bitsandbytes' kernels depend on these flags)
    from ftk.model import CPU_FEATURES

    flags = set(open("/proc/cpuinfo").read().split())
    assert manifest["hardware"]["cpu"]["features"] == [f for f in CPU_FEATURES if f in flags]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finetuned"]["perplexity"] < metrics["base"]["perplexity"]
    assert "Warning" not in (out / "report.md").read_text()


def test_same_scores_are_never_shown_without_a_warning(tmp_path):
    from ftk.cmd_eval import format_table
    from ftk.report import write_report

    same = {"base": {"perplexity": 49.46, "bleu": 0.1}, "finetuned": {"perplexity": 49.46, "bleu": 0.2}}
    table = format_table(same)
    assert "same" in table and table.splitlines()[-1].startswith(
        "warning: the fine-tuned model scores exactly as the base on perplexity: the adapter may have learned nothing")
    text = write_report(tmp_path, {}, same).read_text()
    assert "**Warning**: the fine-tuned model scores exactly as the base on perplexity" in text
    differ = {"base": {"perplexity": 49.46}, "finetuned": {"perplexity": 45.2}}
    assert "warning" not in format_table(differ).lower()
    assert "Warning" not in write_report(tmp_path, {}, differ).read_text()


def test_missing_tensorboard_is_a_note_not_a_crash(tmp_path, monkeypatch, capsys):
    from transformers.integrations import TensorBoardCallback

    def no_writer(self, *a, **k):
        raise RuntimeError("TensorBoardCallback requires tensorboard to be installed.")

    monkeypatch.setattr(TensorBoardCallback, "__init__", no_writer)
    assert T._tensorboard_callback(tmp_path / "logs") is None
    assert "note: training.report_to names tensorboard but it is not installed" in capsys.readouterr().out
