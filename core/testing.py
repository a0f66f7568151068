"""pytest helpers for plugin authors (and ftk's own tests).

Enable every fixture in a plugin package's ``tests/conftest.py``::

    pytest_plugins = ["ftk.testing"]

or import the ones a test module needs::

    from ftk.testing import fresh_manager, register_plugin, run_tiny_recipe  # noqa: F401

Fixtures
  fresh_manager    a new plugin manager built from the installed entry points (built-ins included),
                   shared with no other test
  register_plugin  ``register_plugin(module_or_object, name=None)``: registers a plugin on
                   ``fresh_manager`` for one test (no install, no entry point needed), fails the
                   test if its hooks are invalid or raise, and unregisters it afterwards
  tiny_model       path of a tiny LLaMA checkpoint: ``$FTK_TEST_MODEL`` when set, else a random
                   2-layer model with its own small tokenizer and a chat template, built offline
                   once per session (nothing is downloaded)
  run_tiny_recipe  ``run_tiny_recipe(datasets=[...], metrics=[...], **sections)``: a real ``ftk run``
                   (a few optimizer steps on ``tiny_model``) in a temporary folder -> :class:`TinyRun`

Plain functions for use outside fixtures: :func:`make_manager`, :func:`load_dataset`,
:func:`make_metric`, :func:`tiny_recipe`, :func:`build_tiny_model`, :func:`find_values`.

This module imports pytest; torch and transformers load only when a model is built or a run starts.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ftk.components import DataContext, LoadedData
from ftk.manager import FtkPluginManager, PluginRecord

__all__ = [
    "fresh_manager", "register_plugin", "tiny_model", "run_tiny_recipe",
    "make_manager", "register_on", "load_dataset", "make_metric", "tiny_recipe", "build_tiny_model",
    "find_values", "TinyRun",
]


# -- managers and in-process plugins ---------------------------------------------------------------
def make_manager(load_entrypoints: bool = True) -> FtkPluginManager:
    """A new manager. ``load_entrypoints=False`` gives one with no plugins at all (not even built-ins)."""
    return FtkPluginManager(load_entrypoints=load_entrypoints)


def register_on(manager: FtkPluginManager, obj: Any, name: str | None = None, *,
                package: str = "(test)", version: str = "0.0.0") -> PluginRecord:
    """Register ``obj`` (a module or an object with @hookimpl methods) and check it loaded cleanly.

    If the same module is already loaded from an installed entry point (the package under test is
    also pip-installed), that copy is unregistered first, so the test sees exactly one provider
    of each component instead of a duplicate-name error.
    """
    mod_name = getattr(obj, "__name__", None)
    for rec in list(manager.records.values()):
        if mod_name and rec.module.split(":")[0] == mod_name:
            manager.unregister(rec.name)
    name = name or mod_name or type(obj).__name__
    rec = manager.register(obj, name=name, package=package, version=version)
    manager.plugin_list()  # runs the register hooks now, so a hook that raises fails here
    if rec.status != "ok":
        manager.unregister(name)
        raise AssertionError(f"plugin {name!r} did not load: {rec.error}")
    return rec


@pytest.fixture
def fresh_manager() -> FtkPluginManager:
    """A plugin manager built from the installed entry points, not shared with other tests."""
    return make_manager()


@pytest.fixture
def register_plugin(fresh_manager):
    """``register_plugin(obj, name=None, package="(test)", version="0.0.0") -> PluginRecord``."""
    names: list[str] = []

    def _register(obj: Any, name: str | None = None, **kw) -> PluginRecord:
        rec = register_on(fresh_manager, obj, name, **kw)
        names.append(rec.name)
        return rec

    yield _register
    for n in names:
        fresh_manager.unregister(n)


# -- components the way a recipe uses them ---------------------------------------------------------
def _validated(manager, section: str, entry: dict, base_dir: str | os.PathLike | None) -> dict:
    """Validate one dataset/metric entry inside a minimal recipe, exactly as ``ftk validate`` would,
    and return it with the component's defaults filled and its paths made absolute."""
    from ftk.recipe import load_recipe

    raw: dict = {"model": {"name": "tiny-model-not-loaded"}, "data": {"datasets": [{"loader": "custom", "path": "x"}]}}
    if section == "dataset":
        raw["data"]["datasets"] = [entry]
    else:
        raw["evaluation"] = {"metrics": [entry]}
    r = load_recipe(data=raw, manager=manager, base_dir=base_dir)
    return r["data"]["datasets"][0] if section == "dataset" else r["evaluation"]["metrics"][0]


def load_dataset(manager: FtkPluginManager, options: dict, *, base_dir: str | os.PathLike | None = None,
                 on_error: str | None = None, seed: int = 42, tokenizer: Any = None) -> LoadedData:
    """Run a dataset loader the way ftk does: ``options`` is one ``data.datasets`` entry (with
    ``"loader"``), validated against the loader's schema (an invalid option raises FtkError naming
    its JSON path), defaults filled, relative paths resolved against ``base_dir`` (default: cwd)."""
    opts = _validated(manager, "dataset", options, base_dir)
    ctx = DataContext(recipe_dir=str(Path(base_dir or os.getcwd()).resolve()),
                      on_error=on_error or opts.get("on_error") or "raise", seed=seed, tokenizer=tokenizer)
    return manager.get("dataset", opts["loader"]).factory(opts, ctx)


def make_metric(manager: FtkPluginManager, spec: str | dict):
    """Build a metric the way ftk does from an ``evaluation.metrics`` entry (a name, or
    ``{"name": ..., options...}``), its options validated and defaults filled."""
    entry = dict(_validated(manager, "metric", spec, None))
    name = entry.pop("name")  # ftk passes the options without the name
    return manager.get("metric", name).factory(entry)


# -- a tiny model, built offline --------------------------------------------------------------------
_CORPUS = (
    "Once upon a time there was a little robot who liked to bake bread. "
    "User: hello there. Assistant: hi! How can I help you today? "
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris. "
    "Thank you very much, that was helpful. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. "
)
# Ends every message with the eos token and marks assistant text with {% generation %} so
# transformers can return an assistant-token mask for it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random 2-layer LLaMA (hidden 64) and a byte-level BPE tokenizer with a chat template
    to ``path``. No pad token, like real LLaMA. Takes about a second; downloads nothing."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)
    # intermediate 128 (not 172 as in stories260K): every width a multiple of 64, so 4-bit layers
    # behave on any backend
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=bos, eos_token_id=tok.token_to_id("</s>"))
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    env = os.environ.get("FTK_TEST_MODEL")
    if env:
        return Path(env)
    return build_tiny_model(tmp_path_factory.mktemp("ftk-tiny-model"))


# -- a whole run ------------------------------------------------------------------------------------
def _deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def tiny_recipe(model: str | os.PathLike, datasets: list[dict], metrics: list | None = None,
                output_dir: str | os.PathLike = "runs/tiny", **sections: dict) -> dict:
    """A recipe that trains for 2 optimizer steps and evaluates 2 samples with 8 new tokens.

    ``sections`` deep-merge over it, e.g. ``training={"max_steps": 4}`` or
    ``model={"quantization": {"method": "nf4"}}``.
    """
    recipe = {
        "model": {"name": str(model), "quantization": {"method": "none"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"datasets": copy.deepcopy(datasets), "max_length": 128, "validation_size": 2},
        "training": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-3, "warmup_ratio": 0, "optimizer": "adamw_torch",
                     "precision": "fp32", "report_to": ["none"], "logging_steps": 1},
        "evaluation": {"metrics": list(metrics or []), "max_samples": 2, "compare_base": False,
                       "num_examples_in_report": 1,
                       "generation": {"max_new_tokens": 8, "num_beams": 1, "batch_size": 2}},
        "output_dir": str(output_dir),
    }
    return _deep_merge(recipe, sections)


def find_values(obj: Any, key: str) -> list:
    """Every value stored under ``key`` anywhere in a nested result (e.g. ``metrics.json``), so a
    test can check its metric without depending on how ftk groups the results."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in find_values(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in find_values(v, key)]
    return []


@dataclass
class TinyRun:
    output_dir: Path
    metrics: dict  # what ftk.run.run_recipe returned (also in output_dir/metrics.json)
    recipe: dict  # the resolved recipe (defaults filled)


@pytest.fixture
def run_tiny_recipe(fresh_manager, tiny_model, tmp_path):
    """``run_tiny_recipe(datasets, metrics=None, base_dir=None, **sections) -> TinyRun``.

    Runs on ``fresh_manager``, so plugins added with ``register_plugin`` take part. Relative
    dataset paths resolve against ``base_dir`` (default: the current folder).
    """

    def _run(datasets: list[dict], metrics: list | None = None, base_dir: str | os.PathLike | None = None,
             **sections) -> TinyRun:
        from ftk.recipe import load_recipe
        from ftk.run import run_recipe

        out = tmp_path / "run"
        raw = tiny_recipe(tiny_model, datasets, metrics, output_dir=out, **sections)
        recipe = load_recipe(data=raw, manager=fresh_manager, base_dir=base_dir)
        result = run_recipe(recipe, manager=fresh_manager)
        return TinyRun(output_dir=out, metrics=result, recipe=dict(recipe))

    return _run
