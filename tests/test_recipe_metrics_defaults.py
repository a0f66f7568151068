"""A metric named by a plain string gets its options schema's defaults, like an object entry."""
from ftk.hookspecs import hookimpl
from ftk.recipe import load_recipe

from conftest import ALPACA, MODEL_DIR


def test_string_metric_gets_schema_defaults(fresh_manager, tmp_path):
    class P:
        @hookimpl
        def ftk_register_metrics(self, register):
            register("withdefaults", lambda o: o, options_schema={
                "type": "object", "properties": {"n": {"type": "integer", "default": 3}}})

    fresh_manager.register(P(), name="p")
    r = load_recipe(data={"model": {"name": str(MODEL_DIR)},
                          "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA)}]},
                          "evaluation": {"metrics": ["withdefaults", {"name": "withdefaults", "n": 5}]}},
                    manager=fresh_manager, base_dir=tmp_path)
    assert r["evaluation"]["metrics"] == [{"name": "withdefaults", "n": 3}, {"name": "withdefaults", "n": 5}]
