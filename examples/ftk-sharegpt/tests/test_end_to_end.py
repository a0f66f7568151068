"""A real (tiny) run through ftk with this plugin's loader and metric: a few optimizer steps on
ftk.testing's tiny model, then generation-based evaluation."""
from pathlib import Path

import pytest

import ftk_sharegpt.plugin
from ftk.testing import find_values

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
    vals = find_values(run.metrics, "distinct_1")
    assert vals and all(0.0 <= v <= 1.0 for v in vals)
    # the evaluation prompts were rendered the way the recipe asked
    prompts = find_values(run.metrics, "prompt")
    assert prompts
    marker = "<|assistant|>" if template == "chat" else "Assistant: "
    assert all(p.endswith(marker) or p.rstrip().endswith(marker.strip()) for p in prompts), prompts


