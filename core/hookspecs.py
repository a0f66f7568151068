"""The hooks ftk calls. Plugins implement them with ``@ftk.hookimpl``.

Registration hooks receive a ``register`` callback (the core owns the registry, so it can stamp
each component with the plugin that provided it and refuse duplicate names loudly)::

    register(name, factory, description="one line", options_schema={...JSON Schema...})

What ``factory`` must be for each kind is documented in ``docs/plugins/hooks.md`` and in
``ftk.components``. Factories are called only when a recipe uses the component, so plugin modules
import torch and friends inside them and listing plugins stays instant.
"""
from __future__ import annotations

import pluggy

PROJECT = "ftk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ftk_register_datasets(register):
    """Register dataset loaders: ``factory(options, ctx) -> ftk.components.LoadedData``."""


@hookspec
def ftk_register_quantizers(register):
    """Register quantizers: ``factory(options, ctx) -> ftk.components.QuantizationPlan``."""


@hookspec
def ftk_register_adapters(register):
    """Register adapters: ``factory(model, options, ctx) -> model`` (the model with the adapter attached)."""


@hookspec
def ftk_register_metrics(register):
    """Register metrics: ``factory(options) -> ftk.components.Metric``."""


@hookspec
def ftk_register_trainers(register):
    """Register training methods: ``factory(options, ctx) -> ftk.components.TrainerPlan``."""


@hookspec
def ftk_register_callbacks(register):
    """Register run callbacks a recipe switches on in its ``callbacks`` section:
    ``factory(options, ctx) -> list[transformers.TrainerCallback]`` (``ctx``: ``ftk.components.TrainerContext``)."""


@hookspec
def ftk_register_exporters(register):
    """Register export formats for ``ftk export --format NAME``:
    ``factory(options, ctx) -> list[str] | None`` (``ctx``: ``ftk.components.ExportContext``)."""


@hookspec(firstresult=True)
def ftk_adapter_targets(model_type, preset):
    """Return the module names an adapter targets for ``preset`` on ``model_type``, or None.

    ``model_type`` is the Hugging Face config's ``model_type`` (e.g. ``"llama"``); ``preset`` is
    ``"default"`` or ``"all-linear"``. The first non-None answer wins, so a plugin for another
    architecture supplies its own names without touching ftk.
    """


@hookspec
def ftk_register_commands(cli):
    """Add click commands to the ``ftk`` command group ``cli``."""


@hookspec
def ftk_trainer_callbacks(recipe, output_dir):
    """Return a list of ``transformers.TrainerCallback`` objects to attach to a run (or None). The older,
    always-on way: called for every run; ``ftk_register_callbacks`` components are chosen per recipe."""
