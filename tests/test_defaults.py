"""The schema is the one source of defaults: the API dataclasses, the CLI options and the code's
fallbacks agree with it; and the CLI has one table formatter."""
from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from conftest import ROOT
from ftk import api
from ftk.defaults import schema_default, schema_node, section_defaults
from ftk.tables import format_columns

# dataclass -> (recipe section, {field: schema path} where the path is not "<section>.<field>")
NO_SCHEMA_KEY = {"name", "quantization_options", "datasets", "options"}  # required keys, pass-through dicts


def _component_schema(manager, kind, name):
    return manager.get(kind, name).options_schema


def _field_paths(manager):
    """(dataclass, field name, schema path, schema or None for the base one) for every field."""
    lora = _component_schema(manager, "adapter", "lora")
    four_bit = _component_schema(manager, "quantizer", "nf4")
    sections = {api.ModelConfig: "model", api.DataConfig: "data", api.TrainingConfig: "training",
                api.EvalConfig: "evaluation"}
    special = {(api.ModelConfig, "quantization"): ("model.quantization.method", None),
               (api.ModelConfig, "nested"): ("nested", four_bit),
               (api.ModelConfig, "compute_dtype"): ("compute_dtype", four_bit),
               (api.LoRAConfig, "method"): ("adapter.method", None)}
    for cls in (*sections, api.LoRAConfig):
        for f in dataclasses.fields(cls):
            if f.name in NO_SCHEMA_KEY:
                continue
            if (cls, f.name) in special:
                yield (cls, f.name, *special[(cls, f.name)])
            elif cls is api.LoRAConfig:
                yield cls, f.name, f.name, lora
            else:
                yield cls, f.name, f"{sections[cls]}.{f.name}", None


def test_every_dataclass_default_is_the_schemas(fresh_manager):
    checked = 0
    for cls, name, path, schema in _field_paths(fresh_manager):
        instance = cls(name="x") if cls is api.ModelConfig else cls()
        assert getattr(instance, name) == schema_default(path, schema), f"{cls.__name__}.{name} vs {path}"
        checked += 1
    assert checked >= 40
    # each instance owns its list defaults
    a = api.TrainingConfig()
    a.report_to.append("wandb")
    assert api.TrainingConfig().report_to == schema_default("training.report_to")
    out_dir = inspect.signature(api.LLAMATrainer).parameters["output_dir"].default
    assert out_dir == schema_default("output_dir")


def test_a_default_config_makes_the_default_recipe(fresh_manager):
    """What the dataclasses write into a recipe is what load_recipe would fill in by itself."""
    from ftk.recipe import base_schema, fill_defaults, merged_component_schema

    schema = base_schema()
    filled = fill_defaults({"training": {}, "evaluation": {}, "data": {}}, schema)
    for cfg, section in ((api.TrainingConfig(), "training"), (api.DataConfig(), "data"),
                         (api.EvalConfig(), "evaluation")):
        got = fill_defaults(cfg.to_recipe(), schema["properties"][section])
        got.pop("datasets", None)  # required, no default
        assert got == filled[section], section
    lora = fill_defaults({"method": "lora"}, merged_component_schema(
        schema["properties"]["adapter"], _component_schema(fresh_manager, "adapter", "lora"), "method", "lora"))
    assert api.LoRAConfig().to_recipe() == lora


def test_generate_options_are_the_recipe_generation_defaults():
    from ftk.cmd_eval import generate

    gen = section_defaults("evaluation.generation")
    keys = schema_node("evaluation.generation")["properties"]
    params = generate.make_context("generate", ["a prompt"]).params  # what a bare call gets
    opts = {k: v for k, v in params.items() if k in keys}
    assert set(opts) == {"max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "repetition_penalty"}
    for name, default in opts.items():  # a key the schema leaves unset (the decoding rule's) is unset here too
        assert default == gen.get(name), name


def test_code_defaults_are_the_schemas():
    from ftk import evaluate

    gen = section_defaults("evaluation.generation")
    assert evaluate.GENERATION_DEFAULTS == gen
    assert evaluate.DEFAULT_METRICS == schema_default("evaluation.metrics")
    assert evaluate.generation_settings({}) == {**gen, "seed": schema_default("training.seed")}
    # the evaluator's keyword defaults (public signatures keep their literals) say the same; the decoding keys
    # the schema leaves unset (ftk.generation's rule decides) are None
    names = {"max_length": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
             "num_beams": "num_beams", "do_sample": "do_sample"}
    for meth in ("generate", "generate_ids", "generate_response"):
        params = inspect.signature(getattr(evaluate.QualitativeEvaluator, meth)).parameters
        for arg, key in names.items():
            assert params[arg].default == gen.get(key), f"QualitativeEvaluator.{meth}({arg}=)"


def _schema_scalar_defaults(manager) -> dict[str, list]:
    """key name -> every scalar default the base schema and the installed components give it."""
    out: dict[str, list] = {}

    def walk(node):
        if not isinstance(node, dict):
            return
        for key, sub in (node.get("properties") or {}).items():
            if isinstance(sub, dict):
                if "default" in sub and not isinstance(sub["default"], (dict, list)):
                    out.setdefault(key, []).append(sub["default"])
                walk(sub)
                walk(sub.get("items"))

    from ftk.recipe import base_schema

    walk(base_schema())
    for kind in ("quantizer", "adapter", "trainer", "dataset", "metric"):
        for comp in manager.components(kind).values():
            walk(comp.options_schema)
    return out


def test_no_fallback_drifts_from_the_schema(fresh_manager):
    """``x.get("key", literal)`` on a recipe key: the literal is the schema's default for that key (or
    there is no fallback at all)."""
    defaults = _schema_scalar_defaults(fresh_manager)
    drifted = []
    for path in sorted([*(ROOT / "core").glob("*.py"), *(ROOT / "plugins").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "setdefault") and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in defaults):
                continue
            try:
                literal = ast.literal_eval(node.args[1])
            except ValueError:
                continue
            if isinstance(literal, (dict, list)) or literal is None:
                continue
            if not any(literal == d and type(literal) is type(d) for d in defaults[node.args[0].value]):
                drifted.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not drifted, "fallbacks that differ from the schema's default:\n" + "\n".join(drifted)


def test_schema_default_paths():
    assert schema_default("data.datasets[].weight") == 1.0
    assert schema_default("evaluation.generation.max_new_tokens") == 256
    first = schema_default("training.report_to")
    first.append("x")
    assert schema_default("training.report_to") == ["tensorboard"]  # a copy each time
    with pytest.raises(KeyError, match="no such key"):
        schema_default("training.nope")
    with pytest.raises(KeyError, match="gives no default"):
        schema_default("model.name")
    with pytest.raises(KeyError, match="gives no default"):  # unset: the decoding rule decides
        schema_default("evaluation.generation.num_beams")


# -- the one table formatter ------------------------------------------------------------------------
def _old_padded(rows):  # what `ftk data stats` and the metrics table printed before
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _old_plugins(rows):  # what `ftk plugins list` printed before
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


ROWS = [("NAME", "PACKAGE", "VERSION", "STATUS", "PROVIDES"),
        ("builtin-data", "ftk", "0.1.0", "ok", "dataset:alpaca, dataset:custom"),
        ("broken", "some-long-package", "1.0", "error", ""),
        ("x", "y", "2", "ok", "metric:a")]


def test_format_columns_prints_what_the_old_printers_did():
    assert format_columns(ROWS) == _old_padded(ROWS)
    assert format_columns(ROWS, strip=False) == _old_plugins(ROWS)
    metrics = [["metric", "base", "fine-tuned", "change", "better"], ["perplexity", "12.5", "8.25", "-4.25", "yes"],
               ["bleu", "0.1", "0.2", "+0.1", ""]]
    assert format_columns(metrics) == _old_padded(metrics)
    assert format_columns([]) == ""


def test_format_columns_layout():
    assert format_columns([("A", "BB", "C"), ("aaa", "b", "a long last cell")]).splitlines() == [
        "A    BB  C", "aaa  b   a long last cell"]
    assert format_columns([("a", "b"), ("ccc", "")], strip=False).splitlines() == ["a    b", "ccc  "]


def test_plugins_list_uses_the_formatter(fresh_manager):
    from click.testing import CliRunner

    from ftk.cli import cli

    res = CliRunner().invoke(cli, ["plugins", "list"], obj={"manager": fresh_manager})
    assert res.exit_code == 0, res.output
    recs = fresh_manager.plugin_list()
    rows = [("NAME", "PACKAGE", "VERSION", "STATUS", "PROVIDES")] + [
        (r.name, r.package, r.version, r.status, ", ".join(r.provides) if r.status == "ok" else r.error or "")
        for r in recs]
    assert res.stdout.rstrip("\n") == _old_plugins(rows)
