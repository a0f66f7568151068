"""Training methods are components (`trainer` kind): the built-in `sft` is the default, a third-party
trainer registered in-process is selected by `trainer.method`, supplies its own Trainer subclass and
loss, and trains through the core's machinery (guard, callbacks, adapter save, manifest); recipe
validation names `trainer.*` paths."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ALPACA, MODEL_DIR
from ftk.components import KINDS, TrainerPlan
from ftk.errors import FtkError, PluginError, RunError
from ftk.hookspecs import hookimpl
from ftk.recipe import composed_schema, load_recipe

torch.set_num_threads(1)

SCALE_SCHEMA = {"type": "object",
                "properties": {"scale": {"type": "number", "exclusiveMinimum": 0, "default": 2.0}}}


class ScaledTrainer:
    """A third-party training method: its own Trainer subclass, a loss scaled by an option, and its own
    TrainingArguments adjustment; records what the core did with each."""

    def __init__(self, detach: bool = False, data: str = "rows", trainer_class=None):
        self.detach, self.data, self.custom_class = detach, data, trainer_class
        self.calls: list = []  # (trainer class name, raw loss, scaled loss)
        self.options: list = []
        self.args: list = []

    def plan(self, options, ctx):
        self.options.append((options, ctx.output_dir, ctx.recipe["trainer"]["method"]))

        def trainer_class(base):
            if self.custom_class is not None:
                return self.custom_class

            class ScaledFtkTrainer(base):
                pass

            return ScaledFtkTrainer

        def compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            loss = out.loss * options["scale"]
            if self.detach:
                loss = loss.detach()
            self.calls.append((type(trainer).__name__, out.loss.item(), loss.item()))
            return (loss, out) if return_outputs else loss

        def training_arguments(args):
            self.args.append(args.max_steps)
            return args

        return TrainerPlan(data=self.data, trainer_class=trainer_class, compute_loss=compute_loss,
                           training_arguments=training_arguments, notes=[f"loss scaled by {options['scale']}"])

    @hookimpl
    def ftk_register_trainers(self, register):
        register("scaled", self.plan, description="Supervised loss times a constant (a test trainer)",
                 options_schema=SCALE_SCHEMA)


def raw_recipe(out, **sections) -> dict:
    r = {
        "model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 24}],
                 "max_length": 64, "validation_size": 0, "cache": False},
        "training": {"max_steps": 3, "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-3,
                     "warmup_ratio": 0, "optimizer": "adamw_torch", "report_to": ["none"], "precision": "fp32",
                     "compile": False},
        "evaluation": {"metrics": []},
        "output_dir": str(out),
    }
    r.update(sections)
    return r


def with_plugin(fresh_manager, plugin) -> object:
    fresh_manager.register(plugin, name="scaled-plugin", package="ftk-scaled", version="0.1.0")
    return fresh_manager


# -- registry and recipe --------------------------------------------------------------------------
def test_sft_is_a_builtin_trainer_and_the_default(fresh_manager, tmp_path):
    assert "trainer" in KINDS
    rec = fresh_manager.records["sft"]
    assert rec.package == "ftk" and rec.module == "ftk.plugins.trainer_sft"
    assert fresh_manager.plugin_list() and rec.provides == ["trainer:sft"]
    r = load_recipe(data=raw_recipe(tmp_path / "out"), manager=fresh_manager)
    assert r["trainer"] == {"method": "sft", "chunked_loss": "auto", "chunk_tokens": 1024}  # its defaults filled
    schema = composed_schema(fresh_manager)
    assert "sft" in schema["properties"]["trainer"]["properties"]["method"]["enum"]


def test_plugins_list_and_show_trainer(fresh_manager):
    from click.testing import CliRunner

    from ftk.cli import cli

    res = CliRunner().invoke(cli, ["plugins", "list"], obj={"manager": fresh_manager})
    assert res.exit_code == 0 and "trainer:sft" in res.output
    res = CliRunner().invoke(cli, ["plugins", "show", "trainer:sft"], obj={"manager": fresh_manager})
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert (shown["kind"], shown["name"], shown["package"]) == ("trainer", "sft", "ftk")


def test_unknown_trainer_is_one_line_naming_the_path(fresh_manager, tmp_path):
    with pytest.raises(FtkError) as e:
        load_recipe(data=raw_recipe(tmp_path, trainer={"method": "ppo"}), manager=fresh_manager)
    assert len(e.value.messages) == 1
    msg = e.value.messages[0]
    assert msg.startswith("trainer.method: unknown trainer 'ppo'; available: dpo, kto, orpo, sft") and "\n" not in msg


def test_trainer_options_are_validated_by_its_schema(fresh_manager, tmp_path):
    mgr = with_plugin(fresh_manager, ScaledTrainer())
    with pytest.raises(FtkError) as e:
        load_recipe(data=raw_recipe(tmp_path, trainer={"method": "scaled", "scale": -1, "foo": 1}), manager=mgr)
    assert sorted(e.value.messages) == ["trainer.foo: unknown key 'foo'; allowed: method, scale",
                                        "trainer.scale: -1 is less than or equal to the minimum of 0"]
    with pytest.raises(FtkError, match=r"^trainer\.foo: unknown key 'foo'"):
        load_recipe(data=raw_recipe(tmp_path, trainer={"method": "sft", "foo": 1}), manager=mgr)
    r = load_recipe(data=raw_recipe(tmp_path, trainer={"method": "scaled"}), manager=mgr)
    assert r["trainer"] == {"method": "scaled", "scale": 2.0}  # the trainer's defaults filled
    assert mgr.get("trainer", "scaled").package == "ftk-scaled"


# -- the plan's contract --------------------------------------------------------------------------
def test_data_form_is_checked_before_any_data(fresh_manager, tmp_path):
    from ftk import train as T

    mgr = with_plugin(fresh_manager, ScaledTrainer(data="images"))
    r = load_recipe(data=raw_recipe(tmp_path / "out", trainer={"method": "scaled"}), manager=mgr)
    with pytest.raises(FtkError, match=r"^trainer\.method: trainer 'scaled' \(plugin 'scaled-plugin', package "
                                       r"ftk-scaled\) trains on 'images' data, which this ftk cannot prepare "
                                       r"\(it prepares: rows, pairs\)"):
        T.trainer_plan(r, mgr, str(tmp_path / "out"))
    # ftk validate asks the trainer too: a recipe it accepts can be prepared
    from click.testing import CliRunner

    from ftk.cli import cli

    (tmp_path / "r.json").write_text(json.dumps(raw_recipe(tmp_path / "out", trainer={"method": "scaled"})))
    res = CliRunner().invoke(cli, ["validate", str(tmp_path / "r.json")], obj={"manager": mgr})
    assert res.exit_code != 0 and "trains on 'images' data" in str(res.exception)


def test_trainer_kwargs_cannot_replace_what_ftk_sets(fresh_manager, tmp_path):
    from ftk import train as T

    class Kw:
        @hookimpl
        def ftk_register_trainers(self, register):
            kwargs = {"callbacks": [], "optimizers": (None, None)}
            register("kw", lambda options, ctx: TrainerPlan(trainer_kwargs=kwargs))

    fresh_manager.register(Kw(), name="kw-plugin")
    r = load_recipe(data=raw_recipe(tmp_path / "out", trainer={"method": "kw"}), manager=fresh_manager)
    with pytest.raises(PluginError, match=r"trainer 'kw' .*: trainer_kwargs may not set callbacks \(ftk sets them\)"):
        T.trainer_plan(r, fresh_manager, str(tmp_path / "out"))


def test_trainer_class_must_subclass_ftk_trainer(fresh_manager, tmp_path):
    from transformers import Trainer

    from ftk import train as T

    mgr = with_plugin(fresh_manager, ScaledTrainer(trainer_class=Trainer))
    r = load_recipe(data=raw_recipe(tmp_path / "out", trainer={"method": "scaled"}), manager=mgr)
    plan = T.trainer_plan(r, mgr, str(tmp_path / "out"))
    with pytest.raises(PluginError, match="not a subclass of the class it was given"):
        T._plan_trainer_class(plan, r)


def test_trainer_class_can_build_on_another_librarys_trainer(fresh_manager, tmp_path):
    """What a TRL-based plugin does (``class MyDPO(base, trl.DPOTrainer)``): ftk's loss check runs first
    and hands over to the other library's compute_loss."""
    from transformers import Trainer

    from ftk import train as T

    class OtherLibraryTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return "other"

    plan = TrainerPlan(trainer_class=lambda base: type("Mixed", (base, OtherLibraryTrainer), {}))
    cls = T._plan_trainer_class(plan, {})
    mro = [c.__name__ for c in cls.__mro__]
    assert mro[:4] == ["Mixed", "FtkTrainer", "OtherLibraryTrainer", "Trainer"]
    assert cls.compute_loss is cls.__mro__[1].compute_loss


def test_recipe_without_trainer_section_uses_the_default(fresh_manager, tmp_path):
    from ftk import train as T

    plan = T.trainer_plan({"model": {}}, fresh_manager, str(tmp_path))
    assert isinstance(plan, TrainerPlan) and plan.data == "rows" and plan.trainer_class is None
    assert T._plan_trainer_class(plan, {}).__name__ == "FtkTrainer"


# -- training through a third-party trainer --------------------------------------------------------
def _prepared_run(mgr, out, **sections):
    from ftk.run import prepare_run

    recipe = load_recipe(data=raw_recipe(out, **sections), manager=mgr)
    return prepare_run(recipe, mgr)


def test_third_party_trainer_trains_through_the_core(fresh_manager, tmp_path, capsys):
    from ftk.run import train_run

    plugin = ScaledTrainer()
    mgr = with_plugin(fresh_manager, plugin)
    out = tmp_path / "out"
    state = _prepared_run(mgr, out, trainer={"method": "scaled", "scale": 3.0})
    assert "trainer:scaled (scaled-plugin)" in state.manifest["components"]
    assert "ftk-scaled==0.1.0" in state.manifest["plugins"]
    before = {n: p.detach().clone() for n, p in state.model.named_parameters() if p.requires_grad}
    metrics = train_run(state)
    assert metrics["steps"] == 3
    assert plugin.options == [({"scale": 3.0}, str(out), "scaled")]  # options without `method`
    assert plugin.args == [3]
    assert plugin.calls and {c[0] for c in plugin.calls} == {"ScaledFtkTrainer"}
    assert all(scaled == pytest.approx(3.0 * raw) for _, raw, scaled in plugin.calls)
    assert "note: loss scaled by 3.0" in capsys.readouterr().out
    after = dict(state.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)  # the adapter changed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the core's JSONL log callback ran


def test_ftk_loss_check_applies_to_a_trainers_own_loss(fresh_manager, tmp_path):
    from ftk.run import train_run

    mgr = with_plugin(fresh_manager, ScaledTrainer(detach=True))
    state = _prepared_run(mgr, tmp_path / "out", trainer={"method": "scaled"})
    with pytest.raises(RunError, match="training cannot learn: the training loss does not depend on any trainable"):
        train_run(state)


# -- what the core offers every trainer -----------------------------------------------------------
def test_plan_declarations_are_checked(fresh_manager, tmp_path):
    from ftk import train as T

    class Bad:
        @hookimpl
        def ftk_register_trainers(self, register):
            register("bad", lambda options, ctx: TrainerPlan(sequences_per_example=0))

    fresh_manager.register(Bad(), name="bad-plugin")
    r = load_recipe(data=raw_recipe(tmp_path / "out", trainer={"method": "bad"}), manager=fresh_manager)
    with pytest.raises(PluginError, match=r"trainer 'bad' .*: TrainerPlan.sequences_per_example must be a whole "
                                          r"number >= 1, got 0"):
        T.trainer_plan(r, fresh_manager, str(tmp_path / "out"))


def test_train_log_keeps_every_number_a_trainer_logs(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ftk import train as T

    JsonlLog = T._callback_classes()[0]
    cb = JsonlLog(tmp_path / "log.jsonl")
    state = TrainerState(global_step=3, epoch=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    cb.on_log(args, state, TrainerControl(), logs={
        "loss": 0.5, "learning_rate": 1e-3, "grad_norm": 2.0, "rewards/margins": 0.25, "kl": 0, "note": "text",
        "flag": True, "train_runtime": 1.0, "train_tokens_per_second": 9.0, "epoch": 0.5})
    cb.on_log(args, state, TrainerControl(), logs={
        "eval_loss": 0.4, "eval_rewards/accuracies": 0.75, "eval_runtime": 0.1, "eval_samples_per_second": 3.0,
        "eval_model_preparation_time": 0.01})
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "epoch": 0.5, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0, "rewards/margins": 0.25,
                     "kl": 0},
                    {"step": 3, "epoch": 0.5, "eval_loss": 0.4, "eval_rewards/accuracies": 0.75}]


def test_a_component_can_be_registered_as_unavailable(fresh_manager, tmp_path):
    """A plugin whose optional dependency is missing registers its components with ``unavailable=``: they
    are listed (the plugin as unavailable, with why), and a recipe naming one fails in one line."""
    from click.testing import CliRunner

    from ftk.cli import cli

    class NeedsFoo:
        @hookimpl
        def ftk_register_trainers(self, register):
            register("foo", lambda options, ctx: TrainerPlan(), unavailable="needs foo: pip install 'ftk-foo[foo]'")

    fresh_manager.register(NeedsFoo(), name="foo-plugin", package="ftk-foo", version="0.1.0")
    res = CliRunner().invoke(cli, ["plugins", "list"], obj={"manager": fresh_manager})
    line = next(x for x in res.output.splitlines() if x.startswith("foo-plugin"))
    assert line.split()[3] == "unavailable" and line.endswith("trainer:foo (needs foo: pip install 'ftk-foo[foo]')")
    assert "trainer:foo" in fresh_manager.records["foo-plugin"].provides
    with pytest.raises(FtkError) as e:
        load_recipe(data=raw_recipe(tmp_path, trainer={"method": "foo"}), manager=fresh_manager)
    assert e.value.messages == ["trainer.method: trainer 'foo' needs foo: pip install 'ftk-foo[foo]'"]

    class Wrong:
        @hookimpl
        def ftk_register_trainers(self, register):
            register("wrong", lambda options, ctx: TrainerPlan(), unavailable="")

    rec = fresh_manager.register(Wrong(), name="wrong-plugin")
    fresh_manager.plugin_list()
    assert rec.status == "error" and "unavailable must be None or a non-empty string" in rec.error
