"""Plugin identity: qualified component names (``DISTRIBUTION/NAME``), bare names that never let a third
party shadow a built-in whatever the install order, entry-point name clashes, and run callbacks as
per-recipe components (``ftk_register_callbacks``, the recipe's ``callbacks`` section)."""
from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap

import pytest
from click.testing import CliRunner

from ftk.errors import FtkError, PluginError, PluginFailure
from ftk.hookspecs import hookimpl
from ftk.manager import FtkPluginManager
from ftk.recipe import composed_schema, load_recipe, validate_recipe
from test_manager import FakeDist

# a third party's components named like built-ins (alpaca, bleu), plus one of its own
EXTRAS = """
from ftk.hookspecs import hookimpl
from ftk.components import LoadedData
def load(options, ctx): return LoadedData(train=[])
@hookimpl
def ftk_register_datasets(register):
    register("alpaca", load, description="extras alpaca", options_schema={"type": "object",
             "properties": {"path": {"type": "string"}, "flavour": {"type": "string"}}, "required": ["path"]})
    register("shared", load, description="extras shared")
@hookimpl
def ftk_register_metrics(register):
    register("bleu", lambda o: None, description="extras bleu")
"""
OTHER = """
from ftk.hookspecs import hookimpl
@hookimpl
def ftk_register_datasets(register):
    register("shared", lambda o, c: None, description="other shared")
"""


@pytest.fixture
def dists(monkeypatch, tmp_path):
    """``dists(name, version, modules, eps, first=False)``: a fake installed distribution, listed before
    the real ones when ``first`` (install order must not matter)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before: list[FakeDist] = []
    after: list[FakeDist] = []
    real = md.distributions

    def distributions():
        yield from before
        yield from real()
        yield from after

    monkeypatch.setattr("ftk.manager.md.distributions", distributions)

    def add(name, version, modules, eps, first=False):
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
            sys.modules.pop(mod, None)
        (before if first else after).append(FakeDist(name, version, eps))

    yield add
    for d in before + after:
        for ep in d.entry_points:
            sys.modules.pop(ep.value, None)


def _recipe(tmp_path, **sections):
    raw = {"model": {"name": "not-loaded"}, "data": {"datasets": [{"loader": "custom", "path": "x"}]},
           "evaluation": {"metrics": []}}
    raw.update(sections)
    return raw


# -- B: names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", [False, True], ids=["installed-after", "installed-before"])
def test_bare_name_picks_the_builtin_whatever_the_install_order(dists, capsys, first):
    dists("ftk-extras", "1.0", {"ftk_extras_mod": EXTRAS}, {"extras": "ftk_extras_mod"}, first=first)
    mgr = FtkPluginManager()
    assert mgr.get("dataset", "alpaca").package == "ftk"
    assert mgr.get("dataset", "alpaca").package == "ftk"
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "'ftk-extras/alpaca'" in err  # once, naming how to pick the other
    assert mgr.get("dataset", "ftk-extras/alpaca").description == "extras alpaca"
    assert mgr.get("dataset", "ftk/alpaca").package == "ftk"
    assert mgr.get("metric", "bleu").package == "ftk"
    assert mgr.get("dataset", "shared").package == "ftk-extras"  # unique: its bare name works
    assert mgr.duplicates() == {}


@pytest.mark.parametrize("first", [False, True], ids=["installed-after", "installed-before"])
def test_entry_point_named_like_a_builtin_loads_beside_it(dists, first):
    dists("ftk-extras", "1.0", {"ftk_extras_mod": EXTRAS}, {"alpaca": "ftk_extras_mod"}, first=first)
    mgr = FtkPluginManager()
    recs = {r.name: r for r in mgr.plugin_list()}
    assert recs["alpaca"].package == "ftk" and recs["alpaca"].status == "ok"
    assert "dataset:alpaca" in recs["alpaca"].provides
    extra = recs["ftk-extras/alpaca"]
    assert extra.status == "ok", extra.error
    assert {"dataset:ftk-extras/alpaca", "dataset:shared", "metric:ftk-extras/bleu"} <= set(extra.provides)


def test_ambiguous_between_third_parties_is_one_line_naming_both(dists, tmp_path):
    dists("ftk-extras", "1.0", {"ftk_extras_mod": EXTRAS}, {"extras": "ftk_extras_mod"})
    dists("ftk-other", "2.0", {"ftk_other_mod": OTHER}, {"other": "ftk_other_mod"})
    mgr = FtkPluginManager()
    with pytest.raises(PluginError) as e:
        mgr.get("dataset", "shared")
    (msg,) = e.value.messages
    assert "'ftk-extras/shared'" in msg and "'ftk-other/shared'" in msg
    assert mgr.get("dataset", "ftk-other/shared").package == "ftk-other"
    raw = _recipe(tmp_path, data={"datasets": [{"loader": "shared"}]})
    errors = validate_recipe(raw, mgr)
    assert any(x.startswith("data.datasets[0].loader: ") and "'ftk-other/shared'" in x for x in errors), errors


def test_qualified_names_anywhere_a_recipe_names_a_component(dists, tmp_path):
    dists("ftk-extras", "1.0", {"ftk_extras_mod": EXTRAS}, {"extras": "ftk_extras_mod"})
    mgr = FtkPluginManager()
    raw = _recipe(tmp_path, model={"name": "not-loaded", "quantization": {"method": "ftk/nf4"}},
                  adapter={"method": "ftk/lora"}, trainer={"method": "ftk/sft"},
                  data={"datasets": [{"loader": "ftk-extras/alpaca", "path": "a.json", "flavour": "x"}]},
                  evaluation={"metrics": ["ftk-extras/bleu", {"name": "ftk/rouge"}]})
    recipe = load_recipe(data=raw, manager=mgr, base_dir=tmp_path)
    assert recipe["data"]["datasets"][0]["loader"] == "ftk-extras/alpaca"
    assert recipe["adapter"]["r"] == mgr.get("adapter", "lora").options_schema["properties"]["r"]["default"]
    # the options are the qualified component's: the built-in alpaca has no "flavour"
    raw["data"]["datasets"][0]["loader"] = "alpaca"
    errors = validate_recipe(raw, mgr)
    assert any(x.startswith("data.datasets[0].flavour: unknown key") for x in errors), errors
    raw["data"]["datasets"][0]["loader"] = "nobody/alpaca"
    assert any(x.startswith("data.datasets[0].loader: unknown dataset 'nobody/alpaca'")
               for x in validate_recipe(raw, mgr))


def test_plugins_list_shows_both_and_schema_offers_both(dists):
    from ftk.cli import cli

    dists("ftk-extras", "1.0", {"ftk_extras_mod": EXTRAS}, {"extras": "ftk_extras_mod"})
    mgr = FtkPluginManager()
    res = CliRunner().invoke(cli, ["plugins", "list"], obj={"manager": mgr})
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert "dataset:alpaca" in rows["alpaca"]
    assert "dataset:ftk-extras/alpaca" in rows["extras"] and "metric:ftk-extras/bleu" in rows["extras"]
    assert "note: dataset:alpaca is provided by 'ftk/alpaca', 'ftk-extras/alpaca'" in res.output
    show = CliRunner().invoke(cli, ["plugins", "show", "dataset:ftk-extras/alpaca"], obj={"manager": mgr})
    assert show.exit_code == 0 and '"qualified": "ftk-extras/alpaca"' in show.output
    items = composed_schema(mgr)["properties"]["data"]["properties"]["datasets"]["items"]
    assert {"alpaca", "ftk-extras/alpaca", "shared"} <= set(items["properties"]["loader"]["enum"])


def test_block_and_load_take_qualified_entry_point_names(dists, monkeypatch):
    dists("ftk-extras", "1.0", {"ftk_extras_mod": EXTRAS}, {"alpaca": "ftk_extras_mod"})
    monkeypatch.setenv("FTK_BLOCK_PLUGINS", "ftk-extras/alpaca")
    mgr = FtkPluginManager()
    assert mgr.records["alpaca"].package == "ftk" and "ftk-extras/alpaca" not in mgr.records
    monkeypatch.delenv("FTK_BLOCK_PLUGINS")
    monkeypatch.setenv("FTK_LOAD_PLUGINS", "ftk-extras/alpaca")
    mgr = FtkPluginManager()
    assert [r.package for r in mgr.records.values()] == ["ftk-extras"]
    assert mgr.get("dataset", "alpaca").package == "ftk-extras"  # the only one left


# -- A: callbacks -----------------------------------------------------------------------------------
TRACKER_SCHEMA = {"type": "object", "required": ["project"],
                  "properties": {"project": {"type": "string"}, "every": {"type": "integer", "default": 5}}}


class Trackers:
    """A callback plugin: ``tracker`` (configured), ``faulty`` (raises when built), ``loud`` (raises in on_log)."""

    def __init__(self):
        self.built = []

    @hookimpl
    def ftk_register_callbacks(self, register):
        from transformers import TrainerCallback

        plugin = self

        class Tracker(TrainerCallback):
            def __init__(self, options):
                self.options = options

        class Loud(TrainerCallback):
            def on_log(self, args, state, control, **kwargs):
                raise ValueError("tracker server unreachable")

        def tracker(options, ctx):
            plugin.built.append((options, ctx.output_dir))
            return [Tracker(options)]

        def faulty(options, ctx):
            raise KeyError("api_key")

        register("tracker", tracker, description="Track runs", options_schema=TRACKER_SCHEMA)
        register("faulty", faulty, description="Broken when built")
        register("loud", lambda options, ctx: [Loud], description="Raises in on_log")


@pytest.fixture
def trackers(fresh_manager):
    plugin = Trackers()
    fresh_manager.register(plugin, name="trackers", package="ftk-trackers", version="0.3")
    return fresh_manager, plugin


def test_callback_components_are_listed(trackers):
    mgr, _ = trackers
    rec = mgr.records["trackers"]
    mgr.plugin_list()
    assert set(rec.provides) == {"callback:tracker", "callback:faulty", "callback:loud"}


def test_callbacks_section_is_validated_against_the_plugin_schema(trackers, tmp_path):
    mgr, _ = trackers
    raw = _recipe(tmp_path, callbacks=[{"name": "tracker", "project": 3, "colour": "red"},
                                       {"name": "nosuch"}, {"name": "tracker"}])
    errors = validate_recipe(raw, mgr)
    assert "callbacks[0].project: 3 is not of type 'string'" in errors
    assert any(x.startswith("callbacks[0]: unknown key 'colour'") or x.startswith("callbacks[0].colour: unknown key")
               for x in errors), errors
    assert any(x.startswith("callbacks[1].name: unknown callback 'nosuch'") for x in errors), errors
    assert any(x.startswith("callbacks[2]") and "'project' is a required property" in x for x in errors), errors
    recipe = load_recipe(data=_recipe(tmp_path, callbacks=[{"name": "tracker", "project": "p"}]), manager=mgr,
                         base_dir=tmp_path)
    assert recipe["callbacks"] == [{"name": "tracker", "project": "p", "enabled": True, "every": 5}]
    assert load_recipe(data=_recipe(tmp_path), manager=mgr, base_dir=tmp_path)["callbacks"] == []


def test_only_the_callbacks_a_recipe_names_are_built(trackers, tmp_path):
    mgr, plugin = trackers
    assert mgr.trainer_callbacks(load_recipe(data=_recipe(tmp_path), manager=mgr, base_dir=tmp_path), "/out") == []
    assert plugin.built == []  # the faulty one was never built either
    recipe = load_recipe(data=_recipe(tmp_path, callbacks=[{"name": "tracker", "project": "p"},
                                                           {"name": "faulty", "enabled": False}]),
                         manager=mgr, base_dir=tmp_path)
    (cb,) = mgr.trainer_callbacks(recipe, "/out")
    assert cb.options == {"project": "p", "every": 5}
    assert plugin.built == [({"project": "p", "every": 5}, "/out")]


def test_callback_failures_name_the_plugin(trackers, tmp_path):
    from transformers import TrainerControl, TrainerState

    mgr, _ = trackers
    with pytest.raises(PluginFailure) as e:
        mgr.trainer_callbacks({"callbacks": [{"name": "faulty"}]}, "/out")
    msg = e.value.messages[0]
    assert "plugin 'trackers' (ftk-trackers 0.3)" in msg and "callback 'faulty'" in msg
    assert "while creating trainer callbacks" in msg and "KeyError" in msg
    (cb,) = mgr.trainer_callbacks({"callbacks": [{"name": "ftk-trackers/loud"}]}, "/out")
    with pytest.raises(PluginFailure, match=r"callback Loud, while handling on_log: ValueError"):
        cb.on_log(None, TrainerState(), TrainerControl())
    with pytest.raises(FtkError, match="unknown callback 'nosuch'"):
        mgr.trainer_callbacks({"callbacks": [{"name": "nosuch"}]}, "/out")


def test_a_run_attaches_the_named_callback_and_records_its_package(trackers, tmp_path):
    """End to end: ``ftk.train`` attaches a recipe's callback components (a short CPU run)."""
    from transformers import TrainerCallback

    from conftest import ALPACA, MODEL_DIR
    from ftk.run import run_recipe

    mgr, _ = trackers
    seen = []

    class Steps:
        @hookimpl
        def ftk_register_callbacks(self, register):
            class Count(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    seen.append(state.global_step)

            register("steps", lambda options, ctx: [Count()], description="Counts steps")

    mgr.register(Steps(), name="steps", package="ftk-steps", version="1.2")
    out = tmp_path / "out"
    raw = {"model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
           "adapter": {"method": "lora", "r": 4, "alpha": 8},
           "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 16}],
                    "max_length": 64, "validation_size": 0, "cache": False},
           "training": {"max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1, "warmup_ratio": 0,
                        "optimizer": "adamw_torch", "report_to": ["none"], "precision": "fp32", "compile": False},
           "evaluation": {"metrics": []}, "output_dir": str(out),
           "callbacks": [{"name": "ftk-steps/steps"}, {"name": "faulty", "enabled": False}]}
    run_recipe(load_recipe(data=raw, manager=mgr), manager=mgr)
    assert seen == [1, 2]
    import json

    assert "ftk-steps==1.2" in json.loads((out / "manifest.json").read_text())["plugins"]
