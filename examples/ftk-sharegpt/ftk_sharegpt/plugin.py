"""The hook implementations ftk calls (entry point ``sharegpt`` in group ``ftk``).

This module is imported by every ``ftk`` command, including ``ftk plugins list``, so it stays
cheap: it imports nothing heavy and the factories it registers do their work only when a recipe
uses them.
"""
from ftk.components import MetricInfo
from ftk.hookspecs import hookimpl

from ftk_sharegpt import loader, metrics


@hookimpl
def ftk_register_datasets(register):
    register("sharegpt", loader.load, description=loader.DESCRIPTION, options_schema=loader.SCHEMA)


@hookimpl
def ftk_register_metrics(register):
    # declared keys and direction: clashes are refused before training, the report says which is better
    register("distinct_n", metrics.DistinctN, description=metrics.DistinctN.__doc__,
             options_schema=metrics.DistinctN.SCHEMA,
             info=MetricInfo(keys=lambda o: [f"distinct_{k}" for k in range(1, int(o.get("n", 2)) + 1)],
                             higher_is_better=True, requires="text"))
    register("exact_match", metrics.ExactMatch, description=metrics.ExactMatch.__doc__,
             options_schema=metrics.ExactMatch.SCHEMA,
             info=MetricInfo(keys=["exact_match"], higher_is_better=True, requires="text"))
