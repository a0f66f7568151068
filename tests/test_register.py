"""`ftk.register`: a component registered in-process (a notebook, a script) is checked and isolated
like an installed plugin's, and recipes and the API find it."""
from __future__ import annotations

import pytest

import ftk
from ftk.components import LoadedData, MetricInfo
from ftk.errors import PluginError, PluginFailure
from ftk.testing import load_dataset, make_metric



class Length:
    requires = "text"

    def __init__(self, options):
        self.scale = options.get("scale", 1)

    def compute(self, predictions, references):
        return {"length": self.scale * sum(map(len, predictions)) / len(predictions)}


def test_a_registered_metric_is_used_by_its_name_and_its_qualified_name(fresh_manager):
    comp = ftk.register("metric", "length", Length, "mean prediction length",
                        {"type": "object", "properties": {"scale": {"type": "number", "default": 2}}},
                        info=MetricInfo(keys=["length"], higher_is_better=True), manager=fresh_manager)
    assert (comp.qualified, comp.plugin, comp.package) == ("local/length", "local:metric:length", "local")
    for name in ("length", "local/length"):
        assert make_metric(fresh_manager, name).compute(["ab", "abcd"], ["", ""]) == {"length": 6.0}  # default filled
    listed = {r.name: r for r in fresh_manager.plugin_list()}["local:metric:length"]
    assert listed.status == "ok" and listed.provides == ["metric:length"]


def test_registering_again_replaces_and_bad_registrations_are_refused_at_once(fresh_manager):
    ftk.register("metric", "length", Length, manager=fresh_manager)
    ftk.register("metric", "length", Length, "second", manager=fresh_manager)
    assert fresh_manager.get("metric", "length").description == "second"
    with pytest.raises(PluginError, match=r"register metric 'bad': .*options_schema is not a valid JSON Schema"):
        ftk.register("metric", "bad", Length, options_schema={"type": "nonsense"}, manager=fresh_manager)
    with pytest.raises(PluginError, match=r"register metric 'bad': .*factory must be callable"):
        ftk.register("metric", "bad", 3, manager=fresh_manager)
    with pytest.raises(PluginError, match=r"unknown component kind 'metrics'"):
        ftk.register("metrics", "bad", Length, manager=fresh_manager)
    assert "local:metric:bad" not in fresh_manager.records  # a refused one leaves nothing behind
    with pytest.raises(PluginError, match=r"unknown metric 'bad'"):
        fresh_manager.get("metric", "bad")


def test_a_registered_loader_failing_is_attributed_like_an_installed_plugin(fresh_manager, tmp_path):
    from ftk.data import load_entry
    from ftk.recipe import load_recipe

    def broken(options, ctx):
        raise KeyError("name")

    ftk.register("dataset", "broken", broken, manager=fresh_manager)
    recipe = load_recipe(data={"model": {"name": "m"}, "data": {"datasets": [{"loader": "broken"}]},
                               "output_dir": str(tmp_path)}, manager=fresh_manager)
    with pytest.raises(PluginFailure) as e:
        load_entry(0, recipe["data"]["datasets"][0], recipe, None, fresh_manager)
    line = str(e.value)
    assert "local:dataset:broken" in line and "(local)" in line and "KeyError" in line, line


def test_a_registered_loader_runs_in_the_pipeline(fresh_manager):
    from ftk.components import Example, Segment

    def two_rows(options, ctx):
        ex = [Example(segments=[Segment("Q: hi ", False), Segment("A: hello", True)]) for _ in range(2)]
        return LoadedData(train=ex, fingerprint="two")

    ftk.register("dataset", "two", two_rows, manager=fresh_manager)
    got = load_dataset(fresh_manager, {"loader": "two"})
    assert [e.text for e in got.train] == ["Q: hi A: hello"] * 2


def test_needs_package_reads_metadata_only():
    """ftk.components.needs_package: the unavailable= reason for a missing package or a version outside the
    range, None when it fits."""
    from ftk.components import needs_package

    assert needs_package("no_such_pkg_ftk", ">=1", "pip install x") == "needs no_such_pkg_ftk: pip install x"
    assert needs_package("pluggy", ">=0.1", "pip install y") is None
    import pluggy

    have = pluggy.__version__
    assert needs_package("pluggy", ">=999", "pip install z") == f"needs pluggy>=999 (found {have}): pip install z"
