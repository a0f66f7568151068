"""Training through the real pipeline (ftk.data + ftk.model + ftk.train) on stories260K with a few steps:
logs, adapter reload, resume == uninterrupted, NaN stop, Ctrl-C checkpoint, merge."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ALPACA, MODEL_DIR
from ftk import model as M
from ftk import train as T
from ftk.errors import RunError
from ftk.hookspecs import hookimpl
from ftk.plugins.quant_bnb import keep_trainable_layout

torch.set_num_threads(1)


def make_recipe(out, **training):
    from ftk.recipe import load_recipe

    return load_recipe(data={
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "nf4"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 48}],
                 "max_length": 64, "validation_size": 8, "cache": False},
        # fp32 on every CPU: "auto" is bf16 on AVX512-BF16/AMX CPUs, where training keeps frozen weights in
        # bf16 and a plain PEFT reload (fp32) could not give bit-identical logits
        "training": {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 2e-3,
                     "report_to": ["tensorboard"], "save_steps": 2, "precision": "fp32", **training},
        "output_dir": str(out),
    })


def run(out, manager, resume=None, **training):
    from ftk import data as D

    r = make_recipe(out, **training)
    tok = M.load_tokenizer(r)
    prepared = D.prepare_data(r, tok, manager)
    model, _ = M.load_model(r, manager, tok)
    return T.train(model, tok, prepared, r, manager, str(out), resume=resume), model, tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ftk.manager import FtkPluginManager

    out = tmp_path_factory.mktemp("run") / "out"
    metrics, model, tok = run(out, FtkPluginManager())
    return out, metrics, model, tok


def test_training_outputs(trained):
    out, metrics, _, _ = trained
    assert metrics["steps"] == 4 and metrics["tokens"] > 0
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["lr"] is not None and r["grad_norm"] > 0 for r in steps)
    assert steps[0]["loss"] == metrics["first_loss"] and steps[-1]["loss"] == metrics["final_loss"]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4]
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "tokenizer_config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter")]  # no temp folder left


def test_adapter_reload_gives_identical_logits(trained):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out, _, model, tok = trained
    ids = tok("Give three tips for staying healthy.", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(want, base_logits)  # the adapter learned something
    qcfg = model.base_model.model.config.quantization_config
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, quantization_config=qcfg)
    keep_trainable_layout(base)  # what ftk's loading does
    again = PeftModel.from_pretrained(base, out / "adapter").eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(out / "adapter", quantization_config=qcfg).eval()
    keep_trainable_layout(auto)  # same kernels as ftk (AVX512-BF16 CPUs would otherwise repack)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)
        assert torch.equal(auto(input_ids=ids).logits, want)


def test_resume_after_ctrl_c_equals_uninterrupted(trained, tmp_path):
    """Interrupt at step 3 (Ctrl-C), resume with "latest": the final adapter is the uninterrupted one."""
    from ftk.manager import FtkPluginManager

    out_a = trained[0]

    class CtrlC:
        @hookimpl
        def ftk_trainer_callbacks(self, recipe, output_dir):
            from transformers import TrainerCallback

            class Stop(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step == 3:
                        raise KeyboardInterrupt

            return [Stop()]

    mgr = FtkPluginManager()
    mgr.register(CtrlC(), name="ctrl-c")
    out_b = tmp_path / "out"
    with pytest.raises(RunError, match=r"interrupted at step 3; checkpoint saved in .*checkpoint-3.*--resume"):
        run(out_b, mgr)
    assert (out_b / "checkpoints" / "checkpoint-3" / "optimizer.pt").is_file()
    metrics, _, _ = run(out_b, FtkPluginManager(), resume="latest")
    assert metrics["resumed_from"].endswith("checkpoint-3") and metrics["steps"] == 4
    a = load_file(out_a / "adapter" / "adapter_model.safetensors")
    b = load_file(out_b / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 20
    delta = max((a[k] - b[k]).abs().max().item() for k in a)
    assert delta <= 1e-6, delta
    # the log holds each step at most once (step 3's loss was never logged: Ctrl-C came first)
    steps = [json.loads(x)["step"] for x in (out_b / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 4]


def test_nan_loss_stops_with_step(tmp_path):
    from ftk.manager import FtkPluginManager

    class Poison:
        @hookimpl
        def ftk_trainer_callbacks(self, recipe, output_dir):
            from transformers import TrainerCallback

            class P(TrainerCallback):
                def on_step_end(self, args, state, control, model=None, **kw):
                    if state.global_step == 2:
                        for n, p in model.named_parameters():
                            if "lora_A" in n:
                                p.data.fill_(float("nan"))

            return [P()]

    mgr = FtkPluginManager()
    mgr.register(Poison(), name="poison")
    with pytest.raises(RunError, match=r"training stopped at step 3: loss is nan .*last good checkpoint is "
                                       r".*checkpoint-2"):
        run(tmp_path / "out", mgr)
    assert not (tmp_path / "out" / "adapter").exists()


def test_resume_errors(tmp_path):
    from ftk.errors import FtkError

    with pytest.raises(FtkError, match="--resume: no checkpoint in"):
        T.resolve_resume("latest", str(tmp_path))
    with pytest.raises(FtkError, match="is not a training checkpoint"):
        T.resolve_resume(str(tmp_path), str(tmp_path))


def test_merge_equals_base_plus_adapter(trained, tmp_path):
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftk.cmd_model import merge

    out, _, _, tok = trained
    res = CliRunner().invoke(merge, [str(out / "adapter"), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR), out / "adapter").eval()
    ids = tok("Name three colors.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    res = CliRunner().invoke(merge, [str(out / "adapter"), "--out", str(tmp_path / "merged")])
    assert res.exit_code != 0 and "not an empty folder" in str(res.exception)
