"""The ``ftk`` command line. Heavy libraries are imported inside the commands that need them."""
from __future__ import annotations

import json
import os
import sys

import click

from ftk.commands import set_option

from ftk import __version__
from ftk.errors import FtkError, PluginFailure


def _manager(ctx: click.Context):
    from ftk.manager import get_manager

    obj = ctx.ensure_object(dict)
    if "manager" not in obj:
        obj["manager"] = get_manager()
    return obj["manager"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftk")
@click.pass_context
def cli(ctx):
    """ftk: fine-tune LLaMA-family models with LoRA and 4-bit quantization, driven by a JSON recipe.

    \b
    Start with:  ftk validate examples/quickstart.json
                 ftk run examples/quickstart.json
    """
    ctx.ensure_object(dict)


# -- plugins ----------------------------------------------------------------------------------------
@cli.group()
def plugins():
    """Inspect installed plugins."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.pass_context
def plugins_list(ctx, as_json):
    """List every plugin: name, version, status and what it provides."""
    mgr = _manager(ctx)
    recs = mgr.plugin_list()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in recs], indent=2))
        return
    rows = [("NAME", "PACKAGE", "VERSION", "STATUS", "PROVIDES")]
    for r in recs:
        said = ", ".join(r.provides) if r.status == "ok" else r.error or ""
        rows.append((r.name, r.package, r.version, r.shown_status, f"{said} ({r.unavailable})" if r.unavailable else said))
    from ftk.tables import format_columns

    click.echo(format_columns(rows, strip=False))  # the last column (PROVIDES) unpadded
    for key, comps in mgr.duplicates().items():
        who = ", ".join(f"{c.plugin} ({c.package})" for c in comps)
        click.echo(f"warning: {key} is registered by several plugins: {who}", err=True)
    for key, comps in mgr.ambiguous().items():
        kind, _, name = key.partition(":")
        picked = [c for c in comps if mgr.components(kind).get(name) is c]
        says = f"{name!r} means {picked[0].qualified!r}" if picked else f"{name!r} alone is ambiguous"
        click.echo(f"note: {key} is provided by {', '.join(repr(c.qualified) for c in comps)}; {says}; "
                   f"write the qualified name to pick one", err=True)


@plugins.command("show")
@click.argument("component")
@click.pass_context
def plugins_show(ctx, component):
    """Show a component's description and options schema, e.g. `ftk plugins show dataset:alpaca`."""
    kind, _, name = component.partition(":")
    if not name:
        raise FtkError(f"{component!r}: expected KIND:NAME, e.g. dataset:alpaca")
    comp = _manager(ctx).get(kind, name)
    click.echo(json.dumps({"kind": kind, "name": name, "qualified": comp.qualified,
                           "description": comp.description, "plugin": comp.plugin,
                           "package": comp.package, "version": comp.version,
                           "options_schema": comp.options_schema}, indent=2))


# -- recipes ----------------------------------------------------------------------------------------


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--print", "show", is_flag=True, help="Print the resolved recipe (defaults filled).")
@click.pass_context
def validate(ctx, recipe, overrides, show):
    """Check a recipe against the schema and the chosen plugins' options. Exit 0 if valid, 2 if not."""
    from ftk.recipe import hardware_errors, load_recipe

    from ftk.distributed import recipe_errors

    r = load_recipe(recipe, overrides, manager=_manager(ctx))
    errors = recipe_errors(r) + hardware_errors(r)
    if errors:
        raise FtkError(errors)
    from ftk.train import trainer_plan

    trainer_plan(r, _manager(ctx), r["output_dir"])  # the method's own checks (its data form, its kwargs)
    if r["model"].get("trust_remote_code"):
        click.echo("warning: model.trust_remote_code is true: the model repository's own Python code will run",
                   err=True)
    if show:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(f"{recipe}: valid")


@cli.command()
@click.option("--markdown", is_flag=True, help="Print the recipe reference as Markdown instead.")
@click.pass_context
def schema(ctx, markdown):
    """Print the composed recipe JSON Schema (base + every installed component's options)."""
    if markdown:
        from ftk.docgen import recipe_reference

        click.echo(recipe_reference(_manager(ctx)), nl=False)
        return
    from ftk.recipe import composed_schema

    click.echo(json.dumps(composed_schema(_manager(ctx)), indent=2))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH]",
              help="Continue from the latest checkpoint in the output dir, or from PATH.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output dir.")
@click.pass_context
def run(ctx, recipe, overrides, resume, overwrite):
    """Train and evaluate as the recipe says; write the adapter, metrics and report."""
    from ftk.recipe import load_recipe
    from ftk.run import run_recipe

    r = load_recipe(recipe, overrides, manager=_manager(ctx))
    metrics = run_recipe(r, manager=_manager(ctx), resume=resume, overwrite=overwrite)
    from ftk.run import is_main_process

    if is_main_process() and ("finetuned" in metrics or "base" in metrics):
        from ftk.cmd_eval import format_table
        from ftk.evaluate import metric_directions

        click.echo("\n" + format_table(metrics, metric_directions(r, _manager(ctx))))
        click.echo(f"\nreport: {os.path.join(r['output_dir'], 'report.md')}")


def _build() -> click.Group:
    from ftk.manager import get_manager

    # commands that live in their own modules register the same way a plugin's would
    from ftk import commands  # noqa: F401  (adds data/eval/generate/merge/plan/compare)

    commands.register(cli)
    try:
        get_manager().add_commands(cli)
    except Exception as e:  # a broken plugin must not take the CLI down
        click.echo(f"warning: plugin commands not loaded: {e}", err=True)
    return cli


def _close_progress_bars() -> None:
    """End a progress bar a stopped run left open, so the error starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def main(argv: list[str] | None = None) -> None:
    import warnings

    # library deprecation notices (transformers' renames) are for library authors, not ftk users
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    group = _build()
    try:
        group.main(args=argv, prog_name="ftk", standalone_mode=False)
    except FtkError as e:
        _close_progress_bars()
        messages = list(e.messages)
        if isinstance(e, PluginFailure):  # a plugin's bug: its traceback on request, as for ftk's own
            if os.environ.get("FTK_DEBUG") and e.__cause__ is not None:
                import traceback

                traceback.print_exception(e.__cause__)
            else:
                messages[-1] += " (set FTK_DEBUG=1 for the traceback)"
        for m in messages:
            click.echo(f"error: {m}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug in ftk or a plugin: one line, traceback on request
        if os.environ.get("FTK_DEBUG"):
            raise
        _close_progress_bars()
        click.echo(f"internal error: {type(e).__name__}: {e} (set FTK_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
    else:
        sys.exit(0)
