"""Plugin manager: isolated entry-point loading, records, duplicates, env switches, no heavy imports."""
from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import textwrap
import types

import pytest

from ftk.components import KINDS
from ftk.errors import PluginError
from ftk.hookspecs import hookimpl
from ftk.manager import FtkPluginManager

BUILTIN_PROVIDES = {
    "dataset:alpaca", "dataset:dailydialog", "dataset:custom",
    "quantizer:nf4", "quantizer:fp4", "adapter:lora",
    "metric:perplexity", "metric:bleu", "metric:rouge", "trainer:sft",
}


class FakeDist:
    """Stands in for an installed distribution (what importlib.metadata.distributions yields)."""

    def __init__(self, name, version, eps):
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = [md.EntryPoint(n, v, "ftk") for n, v in eps.items()]


@pytest.fixture
def fake_dists(monkeypatch, tmp_path):
    """Install fake distributions next to the real ones; modules are written to tmp_path."""
    monkeypatch.syspath_prepend(str(tmp_path))
    extra: list[FakeDist] = []
    real = md.distributions

    def distributions():
        yield from real()
        yield from extra

    monkeypatch.setattr("ftk.manager.md.distributions", distributions)

    def add(dist_name, version, modules: dict[str, str], eps: dict[str, str]):
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
            sys.modules.pop(mod, None)
        extra.append(FakeDist(dist_name, version, eps))

    yield add
    for d in extra:
        for ep in d.entry_points:
            sys.modules.pop(ep.value, None)


GOOD = """
from ftk.hookspecs import hookimpl
def load(options, ctx): return None
@hookimpl
def ftk_register_datasets(register):
    register("fakeset", load, description="A fake dataset\\nsecond line", options_schema={"type": "object",
             "properties": {"path": {"type": "string"}}, "required": ["path"]})
@hookimpl
def ftk_register_metrics(register):
    register("fakemetric", lambda o: None, description="fake metric")
"""


def test_builtins_load_through_entry_points(fresh_manager):
    recs = {r.name: r for r in fresh_manager.plugin_list()}
    provides = {p for r in recs.values() for p in r.provides}
    assert BUILTIN_PROVIDES <= provides
    for r in recs.values():
        if r.package == "ftk":
            assert r.status == "ok", r.error
            assert r.module.startswith("ftk.plugins.")


def test_third_party_plugin_is_listed(fake_dists):
    fake_dists("ftk-fake", "1.2.3", {"ftk_fake_good": GOOD}, {"fake": "ftk_fake_good"})
    mgr = FtkPluginManager()
    rec = mgr.records["fake"]
    assert (rec.status, rec.package, rec.version) == ("ok", "ftk-fake", "1.2.3")
    assert mgr.plugin_list() and set(rec.provides) == {"dataset:fakeset", "metric:fakemetric"}
    comp = mgr.get("dataset", "fakeset")
    assert comp.description == "A fake dataset"  # one line
    assert comp.package == "ftk-fake" and comp.plugin == "fake"


def test_broken_import_is_recorded_and_others_work(fake_dists):
    fake_dists("ftk-broken", "0.1", {"ftk_fake_broken": "raise ImportError('no module named yaml')"},
               {"broken": "ftk_fake_broken"})
    fake_dists("ftk-fake", "1.0", {"ftk_fake_good": GOOD}, {"fake": "ftk_fake_good"})
    mgr = FtkPluginManager()
    rec = mgr.records["broken"]
    assert rec.status == "error" and "no module named yaml" in rec.error and rec.provides == []
    assert mgr.records["fake"].status == "ok"
    assert mgr.get("dataset", "alpaca").package == "ftk"
    with pytest.raises(PluginError) as e:
        mgr.get("dataset", "brokenset")
    assert "broken (package ftk-broken 0.1)" in str(e.value)  # the version that failed to import


def test_hook_with_wrong_arguments_is_recorded(fake_dists):
    src = """
from ftk.hookspecs import hookimpl
@hookimpl
def ftk_register_datasets(register, extra_arg):
    pass
"""
    fake_dists("ftk-wrongargs", "0.1", {"ftk_fake_wrongargs": src}, {"wrongargs": "ftk_fake_wrongargs"})
    mgr = FtkPluginManager()
    rec = mgr.records["wrongargs"]
    assert rec.status == "error" and "extra_arg" in rec.error
    assert "dataset:alpaca" in {p for r in mgr.plugin_list() for p in r.provides}


def test_misspelt_hook_is_recorded(fake_dists):
    src = """
from ftk.hookspecs import hookimpl
@hookimpl
def ftk_register_dataset(register):
    pass
"""
    fake_dists("ftk-typo", "0.1", {"ftk_fake_typo": src}, {"typo": "ftk_fake_typo"})
    rec = FtkPluginManager().records["typo"]
    assert rec.status == "error" and "ftk_register_dataset" in rec.error


def test_hook_that_raises_is_recorded(fake_dists):
    src = """
from ftk.hookspecs import hookimpl
@hookimpl
def ftk_register_metrics(register):
    register("half", lambda o: None)
    raise RuntimeError("boom")
"""
    fake_dists("ftk-raises", "0.1", {"ftk_fake_raises": src}, {"raises": "ftk_fake_raises"})
    mgr = FtkPluginManager()
    rec = next(r for r in mgr.plugin_list() if r.name == "raises")
    assert rec.status == "error" and "boom" in rec.error
    assert "half" not in mgr.components("metric")  # nothing half-registered survives


def test_same_component_name_as_a_builtin_never_shadows_it(fake_dists, capsys):
    dup = GOOD.replace("fakeset", "alpaca").replace("fakemetric", "bleu")
    fake_dists("ftk-dup", "0.2", {"ftk_fake_dup": dup}, {"dup": "ftk_fake_dup"})
    mgr = FtkPluginManager()
    assert mgr.duplicates() == {}  # not a conflict: each keeps its qualified name
    assert "dataset:alpaca" in mgr.ambiguous()
    assert mgr.get("dataset", "alpaca").package == "ftk"  # the bare name picks the built-in, with a note
    assert "'ftk-dup/alpaca'" in capsys.readouterr().err
    assert mgr.get("dataset", "ftk-dup/alpaca").package == "ftk-dup"
    assert mgr.get("dataset", "ftk/alpaca").package == "ftk"
    assert "dataset:ftk-dup/alpaca" in mgr.records["dup"].provides
    # components nobody else claims keep working
    assert mgr.get("dataset", "dailydialog").package == "ftk"


def test_same_entry_point_name_loads_both(fake_dists):
    fake_dists("ftk-samename", "0.1", {"ftk_fake_good": GOOD}, {"alpaca": "ftk_fake_good"})
    mgr = FtkPluginManager()
    assert mgr.records["alpaca"].package == "ftk"
    mgr.plugin_list()
    other = mgr.records["ftk-samename/alpaca"]
    assert other.status == "ok" and "dataset:fakeset" in other.provides
    assert mgr.get("dataset", "alpaca").package == "ftk"


def test_load_and_block_env(monkeypatch):
    monkeypatch.setenv("FTK_LOAD_PLUGINS", "alpaca,metrics")
    mgr = FtkPluginManager()
    assert set(mgr.records) == {"alpaca", "metrics"}
    monkeypatch.delenv("FTK_LOAD_PLUGINS")
    monkeypatch.setenv("FTK_BLOCK_PLUGINS", "alpaca")
    mgr = FtkPluginManager()
    assert "alpaca" not in mgr.records and "dailydialog" in mgr.records
    with pytest.raises(PluginError, match="unknown dataset 'alpaca'"):
        mgr.get("dataset", "alpaca")


def test_trace_env(monkeypatch, capsys):
    monkeypatch.setenv("FTK_TRACE_PLUGINS", "1")
    mgr = FtkPluginManager()
    mgr.components("dataset")
    assert mgr.adapter_targets("llama", "default") == ["q_proj", "v_proj"]
    err = capsys.readouterr().err
    assert "ftk_register_datasets <- alpaca" in err and "ftk_adapter_targets" in err


def test_throwaway_plugin_register_unregister(fresh_manager):
    class Throwaway:
        @hookimpl
        def ftk_register_metrics(self, register):
            register("throwaway", lambda o: None, description="temp")

        @hookimpl
        def ftk_adapter_targets(self, model_type, preset):
            return ["w_pack"] if model_type == "baichuan" else None

    fresh_manager.register(Throwaway(), name="throwaway")
    assert "throwaway" in fresh_manager.components("metric")
    assert fresh_manager.adapter_targets("baichuan", "default") == ["w_pack"]
    assert fresh_manager.adapter_targets("llama", "default") == ["q_proj", "v_proj"]
    fresh_manager.unregister("throwaway")
    assert "throwaway" not in fresh_manager.components("metric")
    assert fresh_manager.adapter_targets("baichuan", "default") is None


def test_trainer_callbacks_and_commands_hooks(fresh_manager):
    import click

    class P:
        @hookimpl
        def ftk_trainer_callbacks(self, recipe, output_dir):
            return [("cb", output_dir)]

        @hookimpl
        def ftk_register_commands(self, cli):
            @cli.command("hello")
            def hello():
                click.echo("hi")

    fresh_manager.register(P(), name="p")
    assert fresh_manager.trainer_callbacks({}, "/out") == [("cb", "/out")]
    grp = click.Group("x")
    fresh_manager.add_commands(grp)
    assert "hello" in grp.commands


def test_listing_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from ftk.cli import main\n"
        "for argv in (['plugins','list','--json'], ['validate','examples/quickstart.json'], ['schema']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
        "heavy = [m for m in ('torch','transformers','bitsandbytes','peft','datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "assert not heavy, heavy\n"
    )
    from conftest import ROOT

    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stderr


def test_plugins_list_json_shape(fake_dists):
    fake_dists("ftk-broken", "0.1", {"ftk_fake_broken": "raise ImportError('missing dep')"}, {"broken": "ftk_fake_broken"})
    from click.testing import CliRunner

    from ftk.cli import cli

    res = CliRunner().invoke(cli, ["plugins", "list", "--json"], obj={"manager": FtkPluginManager()})
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert isinstance(data, list) and data
    for obj in data:
        assert {"name", "version", "status", "error", "provides"} <= set(obj)
        assert obj["status"] in ("ok", "error")
        assert (obj["error"] is None) == (obj["status"] == "ok")
        assert all(p.split(":")[0] in KINDS for p in obj["provides"])
    broken = next(o for o in data if o["name"] == "broken")
    assert broken["status"] == "error" and "missing dep" in broken["error"]
    table = CliRunner().invoke(cli, ["plugins", "list"], obj={"manager": FtkPluginManager()})
    assert "alpaca" in table.output and "dataset:alpaca" in table.output and "missing dep" in table.output
