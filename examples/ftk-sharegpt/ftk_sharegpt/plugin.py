"""The hook implementations ftk calls (entry point ``sharegpt`` in group ``ftk``).

This module is imported by every ``ftk`` command, including ``ftk plugins list``, so it stays
cheap: it imports nothing heavy and the factories it registers do their work only when a recipe
uses them.
"""
from ftk.hookspecs import hookimpl

from ftk_sharegpt import loader, metrics


@hookimpl
def ftk_register_datasets(register):
    register("sharegpt", loader.load, description=loader.DESCRIPTION, options_schema=loader.SCHEMA)


@hookimpl
def ftk_register_metrics(register):
    register("distinct_n", metrics.DistinctN, description=metrics.DistinctN.__doc__,
             options_schema=metrics.DistinctN.SCHEMA)
    register("exact_match", metrics.ExactMatch, description=metrics.ExactMatch.__doc__,
             options_schema=metrics.ExactMatch.SCHEMA)
