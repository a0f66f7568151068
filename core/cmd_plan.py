"""`ftk plan RECIPE`: sizes and memory before any weights load."""
from __future__ import annotations

import json
import re

import click

from ftk.commands import set_option

_UNITS = {"gib": 1024**3, "gb": 1000**3, "mib": 1024**2, "mb": 1000**2}


def parse_size(text: str) -> int:
    """"24GiB", "80 GB", "512MiB" -> bytes (GiB/MiB: powers of 1024, GB/MB: of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([gm]i?b)\s*", text or "", re.I)
    if not m:
        raise click.BadParameter(f"{text!r}: expected a size such as 24GiB, 80GB or 512MiB",
                                 param_hint="--device-memory")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-data", is_flag=True, help="Skip tokenizing the data (no token counts or step estimate).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Plan for CUDA GPUs or CPUs (default: this machine's).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Processes the run will have, all nodes together (default: this launch's WORLD_SIZE, else 1).")
@click.option("--device-memory", default=None, metavar="SIZE",
              help="Memory of one GPU (or one process's share of RAM), e.g. 24GiB: say whether the run fits, and "
                   "the longest data.max_length that would.")
def plan(recipe, overrides, as_json, no_data, device, nproc, device_memory):
    """Parameter counts, trainable share, and a peak-memory estimate per process split into weights, LoRA,
    optimizer state, gradients, activations and logits, from the model config alone; plus data size and
    steps. With --device/--nproc for a machine other than this one; distributed.strategy decides what is
    sharded."""
    from ftk.distributed import recipe_errors
    from ftk.errors import FtkError
    from ftk.manager import get_manager
    from ftk.plan import format_plan
    from ftk.plan import plan as make_plan
    from ftk.recipe import load_recipe

    memory = parse_size(device_memory) if device_memory is not None else None
    mgr = get_manager()
    r = load_recipe(recipe, overrides, manager=mgr)
    errors = recipe_errors(r)
    if errors:
        raise FtkError(errors)
    p = make_plan(r, mgr, with_data=not no_data, device=device, processes=nproc, device_memory=memory)
    click.echo(json.dumps(p, indent=2, default=str) if as_json else format_plan(p))
