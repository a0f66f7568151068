"""`ftk plan RECIPE`: sizes and memory before any weights load."""
from __future__ import annotations

import json

import click

from ftk.commands import set_option


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-data", is_flag=True, help="Skip tokenizing the data (no token counts or step estimate).")
def plan(recipe, overrides, as_json, no_data):
    """Parameter counts, trainable share, and a peak-memory estimate split into weights, LoRA, optimizer
    state, gradients, activations and logits, from the model config alone; plus data size and steps."""
    from ftk.manager import get_manager
    from ftk.plan import format_plan
    from ftk.plan import plan as make_plan
    from ftk.recipe import load_recipe

    mgr = get_manager()
    r = load_recipe(recipe, overrides, manager=mgr)
    p = make_plan(r, mgr, with_data=not no_data)
    click.echo(json.dumps(p, indent=2, default=str) if as_json else format_plan(p))
