"""A real (tiny) run through ftk with this plugin's loader and metric: a few optimizer steps on
ftk.testing's tiny model, then generation-based evaluation."""
from pathlib import Path

import pytest

import ftk_sharegpt.plugin

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("template", ["default", "chat"])
def test_tiny_run_with_sharegpt_and_distinct_n(register_plugin, run_tiny_recipe, template):
    register_plugin(ftk_sharegpt.plugin)
    run = run_tiny_recipe(
        datasets=[{"loader": "sharegpt", "path": "sample_sharegpt.json", "template": template}],
        metrics=[{"name": "distinct_n", "n": 2}, "exact_match"],
        base_dir=DATA,
    )
    text = (run.output_dir / "metrics.json").read_text()
    for key in ("distinct_1", "distinct_2", "exact_match"):
        assert f'"{key}"' in text
    vals = _find(run.metrics, "distinct_1")
    assert vals and all(0.0 <= v <= 1.0 for v in vals)


def _find(obj, key):
    """Every value stored under ``key`` anywhere in a nested result."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _find(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _find(v, key)]
    return []
