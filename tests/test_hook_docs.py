"""docs/plugins/hooks.md is true: every hookspec appears with its exact signature (built from
pluggy's ``hook.spec.argnames``), and every hook's example in it runs: it is registered as a
throwaway plugin on a fresh manager and its effect asserted. A new hook without docs, or without
a check here, fails ``test_every_hook_is_documented_and_tested``."""
from __future__ import annotations

import re
import types

import pytest

from conftest import ROOT
from ftk.testing import load_dataset, make_manager, make_metric, register_on

HOOKS_MD = ROOT / "docs" / "plugins" / "hooks.md"


def hookspecs() -> dict[str, tuple[str, ...]]:
    hook = make_manager(load_entrypoints=False).pm.hook
    return {name: caller.spec.argnames for name, caller in vars(hook).items()
            if name.startswith("ftk_") and getattr(caller, "spec", None) is not None}


def sections() -> dict[str, str]:
    """``## `signature` `` heading -> the text up to the next heading."""
    text = HOOKS_MD.read_text()
    parts = re.split(r"^## `([^`]+)`\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def example_plugin(hook: str, argnames) -> types.ModuleType:
    body = sections()[f"{hook}({', '.join(argnames)})"]
    code = re.search(r"```python\n(.*?)```", body, re.S)
    assert code, f"hooks.md: {hook} has no python example"
    mod = types.ModuleType(f"hookdoc_{hook}")
    exec(compile(code.group(1), f"{HOOKS_MD}:{hook}", "exec"), mod.__dict__)  # noqa: S102 - our own docs
    return mod


@pytest.fixture
def mgr_with_example(request):
    """A fresh manager (built-ins loaded) plus the docs' example for the hook named by the test."""
    hook = request.param
    mgr = make_manager()
    rec = register_on(mgr, example_plugin(hook, hookspecs()[hook]), name=f"doc-{hook}")
    return mgr, rec


# -- one check per hook: the example's effect through the manager ----------------------------------
def check_ftk_register_datasets(mgr, rec, tmp_path):
    assert rec.provides == ["dataset:echo"]
    data = load_dataset(mgr, {"loader": "echo", "count": 2})
    assert [ex.text for ex in data.train] == ["Repeat 0: 0", "Repeat 1: 1"]
    assert [s.train for s in data.train[1].segments] == [False, True]
    data = load_dataset(mgr, {"loader": "echo"})  # the schema's default reached the factory
    assert len(data.train) == 3


def check_ftk_register_quantizers(mgr, rec, tmp_path):
    import torch

    from ftk.components import ModelContext, QuantizationPlan

    assert rec.provides == ["quantizer:fp32"]
    plan = mgr.get("quantizer", "fp32").factory({}, ModelContext(model_config=None, recipe={}))
    assert isinstance(plan, QuantizationPlan) and plan.from_pretrained_kwargs == {"dtype": torch.float32}
    assert plan.kbit is False
    assert plan.quantizes("model.layers.0.self_attn.q_proj", 64, 64) is False and plan.count_quantized(None) == 0


def check_ftk_register_adapters(mgr, rec, tmp_path):
    import torch

    assert rec.provides == ["adapter:norm_tuning"]
    model = torch.nn.ModuleDict({"input_norm": torch.nn.LayerNorm(4), "proj": torch.nn.Linear(4, 4)})
    out = mgr.get("adapter", "norm_tuning").factory(model, {}, None)
    assert {n for n, p in out.named_parameters() if p.requires_grad} == {"input_norm.weight", "input_norm.bias"}
    cfg = types.SimpleNamespace(hidden_size=64, num_hidden_layers=5)
    ctx = types.SimpleNamespace(model_config=cfg)
    assert mgr.get("adapter", "norm_tuning").info.trainable_parameters({}, {}, ctx) == 64 * 11


def check_ftk_register_metrics(mgr, rec, tmp_path):
    assert rec.provides == ["metric:length_ratio"]
    preds, refs = ["a b c", "d"], ["a b", "c d"]
    assert make_metric(mgr, "length_ratio").compute(predictions=preds, references=refs) == {"length_ratio": 1.0}
    chars = make_metric(mgr, {"name": "length_ratio", "unit": "chars"})
    assert chars.compute(predictions=preds, references=refs) == {"length_ratio": 6 / 6}
    assert chars.compute(predictions=["abcdef"], references=["abc"]) == {"length_ratio": 2.0}
    info = mgr.components("metric")["length_ratio"].info
    assert info.keys_for({"unit": "words"}) == ["length_ratio"] and info.direction("length_ratio") is None


def check_ftk_register_trainers(mgr, rec, tmp_path):
    import torch

    from ftk.components import TrainerContext, TrainerPlan
    from ftk.recipe import load_recipe

    assert rec.provides == ["trainer:sft_zloss"]
    raw = {"model": {"name": "not-loaded"}, "data": {"datasets": [{"loader": "custom", "path": "x"}]},
           "trainer": {"method": "sft_zloss"}}
    recipe = load_recipe(data=raw, manager=mgr, base_dir=tmp_path)
    assert recipe["trainer"] == {"method": "sft_zloss", "weight": 0.0001}  # the schema's default
    plan = mgr.get("trainer", "sft_zloss").factory({"weight": 0.5}, TrainerContext(recipe, str(tmp_path)))
    assert isinstance(plan, TrainerPlan) and plan.data == "rows" and plan.notes == ["z-loss weight 0.5"]
    logits = torch.zeros(1, 3, 4)  # logsumexp of 4 equal logits: log(4)
    out = types.SimpleNamespace(loss=torch.tensor(1.0), logits=logits)
    loss = plan.compute_loss(None, lambda **kw: out, {"input_ids": None})
    assert torch.isclose(loss, 1.0 + 0.5 * torch.log(torch.tensor(4.0)) ** 2)
    assert plan.compute_loss(None, lambda **kw: out, {}, return_outputs=True)[1] is out


def check_ftk_register_callbacks(mgr, rec, tmp_path):
    from transformers import TrainerCallback, TrainerControl, TrainerState

    from ftk.recipe import load_recipe

    assert rec.provides == ["callback:loss_printer"]
    assert mgr.trainer_callbacks({"training": {}}, str(tmp_path)) == []  # not named: not attached
    raw = {"model": {"name": "not-loaded"}, "data": {"datasets": [{"loader": "custom", "path": "x"}]},
           "callbacks": [{"name": "loss_printer"}]}
    recipe = load_recipe(data=raw, manager=mgr, base_dir=tmp_path)
    assert recipe["callbacks"] == [{"name": "loss_printer", "enabled": True, "every": 1}]  # defaults
    cbs = mgr.trainer_callbacks(recipe, str(tmp_path))
    assert len(cbs) == 1 and isinstance(cbs[0], TrainerCallback)
    state = TrainerState()
    state.global_step = 3
    cbs[0].on_log(None, state, TrainerControl(), logs={"loss": 1.5})  # runs without error


def check_ftk_register_exporters(mgr, rec, tmp_path):
    from click.testing import CliRunner

    from conftest import MODEL_DIR
    from ftk.cmd_export import export

    assert rec.provides == ["exporter:hf_folder"]
    out = tmp_path / "exported"
    res = CliRunner().invoke(export, [str(MODEL_DIR), "--format", "hf_folder", "--type", "float16", "--out", str(out)],
                             obj={"manager": mgr})
    assert res.exit_code == 0, res.output
    assert f"note: model {MODEL_DIR} as a float16 folder" in res.output  # a model source: its own folder
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in MODEL_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # nothing else left behind
    res = CliRunner().invoke(export, [str(MODEL_DIR), "--format", "hf_folder", "--type", "int4", "--out",
                                      str(tmp_path / "x")], obj={"manager": mgr})
    assert "--type: 'int4' is not one of 'float32', 'bfloat16', 'float16'" in str(res.exception)


def check_ftk_adapter_targets(mgr, rec, tmp_path):
    assert mgr.adapter_targets("gpt_neox", "default") == ["query_key_value"]
    assert mgr.adapter_targets("gpt_neox", "all-linear")[0] == "query_key_value"
    # returning None let the built-in answer for llama
    assert mgr.adapter_targets("llama", "default") == ["q_proj", "v_proj"]


def check_ftk_register_commands(mgr, rec, tmp_path):
    import click
    from click.testing import CliRunner

    @click.group()
    def cli():
        pass

    mgr.add_commands(cli)
    assert rec.status == "ok"
    res = CliRunner().invoke(cli, ["hello", "you"])
    assert res.exit_code == 0 and res.output == "hello, you\n"


def check_ftk_trainer_callbacks(mgr, rec, tmp_path):
    from transformers import TrainerCallback, TrainerControl, TrainerState

    cbs = mgr.trainer_callbacks({"training": {}}, str(tmp_path))
    assert len(cbs) == 1 and isinstance(cbs[0], TrainerCallback)
    state = TrainerState()
    state.global_step = 3
    cbs[0].on_log(None, state, TrainerControl(), logs={"loss": 1.5})  # runs without error


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_hook_is_documented_and_tested():
    specs = hookspecs()
    assert specs, "no hookspecs found"
    documented = sections()
    for name, argnames in specs.items():
        sig = f"{name}({', '.join(argnames)})"
        assert sig in documented, f"docs/plugins/hooks.md lacks a heading `## \\`{sig}\\``"
    assert set(CHECKS) == set(specs), "each hook needs a check_<hook> function in this file"
    stale = {s for s in documented if s.split("(")[0] not in specs}
    assert not stale, f"hooks.md documents hooks that do not exist: {stale}"


def test_each_hook_section_has_arguments_a_return_and_a_builtin():
    for name, argnames in hookspecs().items():
        body = sections()[f"{name}({', '.join(argnames)})"]
        for arg in argnames:
            assert re.search(rf"^- `{arg}`", body, re.M), f"{name}: argument {arg} not described"
        assert "return" in body and "Built-in" in body, name


@pytest.mark.parametrize("mgr_with_example", sorted(CHECKS), indirect=True)
def test_hook_example_runs(mgr_with_example, tmp_path, request):
    mgr, rec = mgr_with_example
    CHECKS[request.node.callspec.params["mgr_with_example"]](mgr, rec, tmp_path)
