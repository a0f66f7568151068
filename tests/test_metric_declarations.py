"""What a metric declares up front (``register(..., info=MetricInfo(...))``): its keys (possibly a
function of its options), which way each improves and what it needs. Key clashes are refused by
`ftk validate` / `ftk run` before anything loads; the report's and the terminal's "better" column follow
the declared direction, and give no verdict for a metric that declares none."""
from __future__ import annotations

import json

import pytest

from conftest import ALPACA, MODEL_DIR
from ftk.cmd_eval import format_table
from ftk.components import MetricInfo
from ftk.errors import FtkError
from ftk.evaluate import check_metrics, metric_directions
from ftk.hookspecs import hookimpl
from ftk.report import write_report

BUILT = []  # every metric object a factory built: declarations are checked without building any


class EditDistance:
    """Characters to change to turn the reply into the reference: lower is better."""

    requires = "text"

    def __init__(self, options):
        BUILT.append(self)
        self.key = options.get("key", "edit_distance")

    def compute(self, predictions, references):
        return {self.key: float(sum(abs(len(p) - len(r)) for p, r in zip(predictions, references)))}


class Undeclared(EditDistance):
    """Written against the hooks as documented before declarations existed."""


class Declared:
    @hookimpl
    def ftk_register_metrics(self, register):
        schema = {"type": "object", "properties": {"key": {"type": "string", "default": "edit_distance"}}}
        register("edit_distance", EditDistance, options_schema=schema,
                 info=MetricInfo(keys=lambda o: [o["key"]], higher_is_better=False, requires="text"))
        register("undeclared", Undeclared, options_schema={"type": "object", "properties": {"key": {"type": "string"}}})
        register("pairwise", EditDistance, info=MetricInfo(keys=["pairwise"], requires="pairs"))
        register("imagewise", EditDistance, info=MetricInfo(keys=["imagewise"], requires="images"))


@pytest.fixture
def mgr(fresh_manager):
    fresh_manager.register(Declared(), name="declared", package="ftk-declared", version="1.0")
    BUILT.clear()
    return fresh_manager


def _recipe(tmp_path, metrics):
    return {"model": {"name": str(MODEL_DIR), "quantization": {"method": "none"}},
            "data": {"datasets": [{"loader": "alpaca", "path": str(ALPACA), "max_examples": 8}], "validation_size": 2},
            "evaluation": {"metrics": metrics}, "output_dir": str(tmp_path / "run")}


def _cli(mgr, monkeypatch, capsys, argv):
    import ftk.manager
    from ftk.cli import main

    monkeypatch.setattr(ftk.manager, "_cached", mgr)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# -- the "better" column ----------------------------------------------------------------------------
METRICS = {"finetuned": {"edit_distance": 3.0, "undeclared_score": 4.0, "bleu": 0.3, "perplexity": 9.0},
           "base": {"edit_distance": 5.0, "undeclared_score": 2.0, "bleu": 0.2, "perplexity": 12.0}}
RECIPE = {"evaluation": {"metrics": [{"name": "edit_distance"}, {"name": "undeclared", "key": "undeclared_score"},
                                     {"name": "bleu"}, {"name": "perplexity"}]}}


def test_declared_lower_is_better_metric_is_better_when_it_went_down(mgr, tmp_path):
    assert metric_directions(RECIPE, mgr) == {"edit_distance": False, "bleu": True, "perplexity": False}
    text = write_report(tmp_path, RECIPE, METRICS, mgr).read_text()
    assert "| edit_distance | 5.0000 | 3.0000 | -2.0000 (-40.0%) | fine-tuned |" in text
    assert "| bleu | 0.2000 | 0.3000 | +0.1000 (+50.0%) | fine-tuned |" in text
    assert "| perplexity | 12.0000 | 9.0000 | -3.0000 (-25.0%) | fine-tuned |" in text
    table = format_table(METRICS, metric_directions(RECIPE, mgr)).splitlines()
    assert table[0].split() == ["metric", "base", "fine-tuned", "change", "better"]
    assert next(r for r in table if r.startswith("edit_distance")).split()[-1] == "fine-tuned"
    assert not BUILT  # directions come from the declarations: no metric was built for the report


def test_undeclared_metric_gets_no_verdict(mgr, tmp_path):
    """No guess from the key's name: the "better" cell says "–" (the values and the change are shown)."""
    text = write_report(tmp_path, RECIPE, METRICS, mgr).read_text()
    assert "| undeclared_score | 2.0000 | 4.0000 | +2.0000 (+100.0%) | – |" in text
    row = next(r for r in format_table(METRICS, metric_directions(RECIPE, mgr)).splitlines()
               if r.startswith("undeclared_score"))
    assert row.split()[-1] == "–"


def test_declared_direction_follows_the_options(mgr):
    recipe = {"evaluation": {"metrics": [{"name": "edit_distance", "key": "chars_off"}]}}
    assert metric_directions(recipe, mgr) == {"chars_off": False}


def test_builtin_declarations(fresh_manager):
    comps = fresh_manager.components("metric")
    assert comps["perplexity"].info == MetricInfo(keys=["perplexity"], higher_is_better=False, requires="loss")
    assert comps["bleu"].info.keys_for({}) == ["bleu"] and comps["bleu"].info.direction("bleu") is True
    rouge = comps["rouge"].info
    assert rouge.keys_for({}) == ["rouge1", "rouge2", "rougeL", "rougeLsum"] and rouge.requires == "text"
    assert rouge.keys_for({"rouge_types": ["rouge3"], "precision_recall": True}) == [
        "rouge3", "rouge3_precision", "rouge3_recall"]


# -- clashes, refused before anything loads ---------------------------------------------------------
def test_clash_is_refused_by_validate_in_one_line(mgr, tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_recipe(tmp_path, ["bleu", {"name": "edit_distance", "key": "bleu"}])))
    code, err = _cli(mgr, monkeypatch, capsys, ["validate", str(path)])
    assert code == 2
    assert err.strip().splitlines() == ["error: evaluation.metrics[1]: metric 'edit_distance' reports 'bleu', as "
                                        "does evaluation.metrics[0] (metric 'bleu'); one would overwrite the other"]
    assert not BUILT


def test_clash_is_refused_by_run_before_the_model_loads(mgr, tmp_path, monkeypatch, capsys):
    import ftk.model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ftk.model, "load_model", no_load)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_recipe(tmp_path, [{"name": "rouge", "rouge_types": ["rouge1", "rougeL"]},
                                                  {"name": "rouge", "rouge_types": ["rougeL"]}])))
    code, err = _cli(mgr, monkeypatch, capsys, ["run", str(path)])
    assert code == 2 and "evaluation.metrics[1]: metric 'rouge' reports 'rougeL', as does evaluation.metrics[0]" in err
    assert not (tmp_path / "run").exists()


def test_disjoint_keys_of_the_same_metric_are_accepted(mgr):
    recipe = {"evaluation": {"metrics": [{"name": "rouge", "rouge_types": ["rouge1"], "use_stemmer": True},
                                         {"name": "rouge", "rouge_types": ["rouge2"], "use_stemmer": False},
                                         {"name": "edit_distance", "key": "a"}, {"name": "edit_distance", "key": "b"}]}}
    assert check_metrics(recipe, mgr) == []


def test_other_declaration_errors(mgr):
    recipe = {"evaluation": {"metrics": [{"name": "imagewise"}, {"name": "edit_distance", "key": "eval_tokens"},
                                         {"name": "pairwise"}]}}
    # "pairs" is an input ftk supplies (whether this run's data can is build_metrics' check, by the trainer)
    assert check_metrics(recipe, mgr) == [
        "evaluation.metrics[0]: metric 'imagewise' (plugin declared) requires 'images', which this ftk cannot supply "
        "(it supplies text, loss, pairs, model)",
        "evaluation.metrics[1]: metric 'edit_distance' declares 'eval_tokens', a key ftk itself reports"]


def test_a_key_outside_the_declaration_is_refused(mgr, monkeypatch):
    from ftk import evaluate
    from ftk.evaluate import build_metrics, score_model

    monkeypatch.setattr(evaluate.QualitativeEvaluator, "generate", lambda self, prompts, **kw: ["abc"] * len(prompts))
    recipe = {"evaluation": {"metrics": [{"name": "edit_distance", "key": "x"}]}}
    (name, metric), = build_metrics(recipe, mgr)
    assert metric.keys == ["x"]
    assert score_model(None, None, [(name, metric)], None, ["p"], ["abcd"], {"max_new_tokens": 1})[0]["x"] == 1.0
    metric.keys = ["y"]  # as if the plugin declared one key and reported another
    with pytest.raises(FtkError, match=r"metrics\[0\]: metric 'edit_distance' reported 'x', which it did not declare"):
        score_model(None, None, [(name, metric)], None, ["p"], ["abcd"], {"max_new_tokens": 1})


def test_wrong_declarations_mark_the_plugin_as_error(fresh_manager):
    class WrongDirection:
        @hookimpl
        def ftk_register_metrics(self, register):
            register("bad_direction", EditDistance, info=MetricInfo(keys=["k"], higher_is_better="up"))

    class InfoOnALoader:
        @hookimpl
        def ftk_register_datasets(self, register):
            register("with_info", lambda o, c: None, info=MetricInfo(keys=["k"]))

    direction = fresh_manager.register(WrongDirection(), name="wrong1", package="ftk-wrong", version="1.0")
    loader = fresh_manager.register(InfoOnALoader(), name="wrong2", package="ftk-wrong", version="1.0")
    assert "bad_direction" not in fresh_manager.components("metric")
    assert direction.status == "error" and "higher_is_better must be a bool" in direction.error
    assert loader.status == "error" and "info= is only for" in loader.error
    assert "bleu" in fresh_manager.components("metric")  # other plugins are unaffected
