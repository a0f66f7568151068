"""Attach the command groups that live in their own modules (each cheap to import: click only)."""
from __future__ import annotations

import importlib

import click

# the one `--set` option every recipe-taking command shares
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a recipe value (parsed as JSON when it parses). Repeatable.")

# module -> attribute names of click commands to add
_MODULES = {
    "ftk.cmd_data": ["data"],
    "ftk.cmd_eval": ["eval_cmd", "generate"],
    "ftk.cmd_model": ["merge"],
    "ftk.cmd_plan": ["plan"],
    "ftk.cmd_compare": ["compare"],
    "ftk.cmd_chat": ["chat"],
    "ftk.cmd_export": ["export"],
}


def register(cli) -> None:
    for mod_name, attrs in _MODULES.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue  # not written yet
            raise
        for a in attrs:
            cmd = getattr(mod, a, None)
            if cmd is not None:
                cli.add_command(cmd)
