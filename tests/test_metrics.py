"""Metric plugins against the reference vectors in ../shared/metrics and the reference packages."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import sacrebleu
from conftest import SHARED
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from ftk.errors import FtkError
from ftk.testing import make_metric

VEC = SHARED / "metrics"
SACRE = json.loads((VEC / "sacrebleu_unit_vectors.json").read_text())
NLTK = json.loads((VEC / "nltk_bleu_vectors.json").read_text())
ROUGE = json.loads((VEC / "rouge_expected.json").read_text())


@pytest.fixture(scope="module")
def mgr():
    from ftk.manager import FtkPluginManager

    return FtkPluginManager()


def per_prediction(streams: list[list[str]]) -> list[list[str]]:
    """sacreBLEU's reference streams -> ftk's one list of alternatives per prediction."""
    return [list(alts) for alts in zip(*streams)]


# -- registry and options ---------------------------------------------------------------------------
def test_registered_with_schemas_and_requires(mgr):
    assert make_metric(mgr, "perplexity").requires == "loss"
    assert make_metric(mgr, "bleu").requires == "text"
    assert make_metric(mgr, {"name": "rouge", "use_stemmer": False}).requires == "text"
    for name in ("perplexity", "bleu", "rouge"):
        assert mgr.get("metric", name).options_schema["type"] == "object"


def test_bad_options_are_user_errors(mgr):
    from ftk.recipe import validate_recipe

    recipe = {"model": {"name": "m"}, "data": {"datasets": [{"loader": "alpaca", "path": "x.json"}]},
              "evaluation": {"metrics": [{"name": "bleu", "tokenize": "moses"}, {"name": "rouge", "stem": True}]}}
    errors = validate_recipe(recipe, mgr)
    assert any(e.startswith("evaluation.metrics[0]") and "tokenize" in e for e in errors), errors
    assert any(e.startswith("evaluation.metrics[1]") and "stem" in e for e in errors), errors
    with pytest.raises(FtkError, match="unknown option"):
        mgr.get("metric", "bleu").factory({"smoothing": "exp"})


def test_mismatched_or_empty_inputs_raise(mgr):
    bleu, rouge = make_metric(mgr, "bleu"), make_metric(mgr, "rouge")
    with pytest.raises(FtkError, match="2 predictions but 1 references"):
        bleu.compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(FtkError, match="no predictions"):
        rouge.compute(predictions=[], references=[])


def test_plugin_module_imports_no_heavy_packages():
    code = ("import sys, ftk.plugins.metrics; "
            "bad = [m for m in ('torch', 'transformers', 'sacrebleu', 'rouge_score', 'nltk') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- perplexity -------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_token_weighted_nll(mgr):
    ppl = make_metric(mgr, "perplexity")
    assert ppl.compute(nll_sum=30.0, token_count=12)["perplexity"] == pytest.approx(math.exp(2.5), rel=1e-12)
    assert ppl.compute(nll_sum=1e6, token_count=1)["perplexity"] == math.inf
    with pytest.raises(FtkError, match="no trained"):
        ppl.compute(nll_sum=0.0, token_count=0)


# -- BLEU: sacreBLEU's own test tables --------------------------------------------------------------
@pytest.mark.parametrize("case", SACRE["corpus_bleu_cases"], ids=lambda c: json.dumps(c[2]))
def test_bleu_corpus_vectors(mgr, case):
    hyps, streams, kwargs, expected = case
    m = make_metric(mgr, {"name": "bleu", **kwargs})
    got = m.compute(predictions=hyps, references=per_prediction(streams))["bleu"]
    assert got == pytest.approx(expected / 100, abs=1e-9)


@pytest.mark.parametrize("case", SACRE["max_order_cases"], ids=lambda c: f"order{c[0]}")
def test_bleu_max_order_vectors(mgr, case):
    order, hyps, streams, expected = case
    m = make_metric(mgr, {"name": "bleu", "max_ngram_order": order})
    assert f"{100 * m.compute(predictions=hyps, references=per_prediction(streams))['bleu']:.2f}" == expected


SENT = SACRE["sentence_bleu"]
SENT_CASES = [(c, SENT["SYS"], SENT["REF"]) for c in SENT["cases"]] + \
             [(c, SENT["SYS_0"], SENT["REF_0"]) for c in SENT["zero_cases"]]


@pytest.mark.parametrize("case,sys_,ref", SENT_CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, list) else "")
def test_bleu_sentence_vectors(mgr, case, sys_, ref):
    smooth, value, lower, tok, expected = case
    m = make_metric(mgr, {"name": "bleu", "sentence_level": True, "smooth_method": smooth,
                          "smooth_value": value, "lowercase": lower, "tokenize": tok})
    assert 100 * m.compute(predictions=[sys_], references=[ref])["bleu"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("case", SACRE["effective_order_cases"] + SACRE["raw_bleu_cases"][1:],
                         ids=lambda c: c[0][0])
def test_bleu_effective_order_vectors(mgr, case):
    # raw_corpus_bleu = tokenize none, floor smoothing 0.01, effective order: ftk's sentence_level on one pair
    hyps, streams, expected = case
    m = make_metric(mgr, {"name": "bleu", "sentence_level": True, "tokenize": "none",
                          "smooth_method": "floor", "smooth_value": 0.01})
    assert m.compute(predictions=hyps, references=per_prediction(streams))["bleu"] == pytest.approx(expected, abs=1e-8)


def test_bleu_matches_nltk_doctest_values(mgr):
    # NLTK's corpus BLEU (no smoothing) on pre-tokenized text is sacreBLEU with tokenize none, smooth none
    named = {k: " ".join(v) for k, v in NLTK["tokens"].items()}

    def toks(x):  # a named token list, or the tokens themselves
        return named[x] if isinstance(x, str) else " ".join(x)

    cases = [c for c in NLTK["cases"] if c["fn"] in ("corpus_bleu", "sentence_bleu") and "smoothing" not in c
             and "weights" in c and len(set(c["weights"])) == 1]
    assert len(cases) >= 3
    for c in cases:
        order = len(c["weights"])
        m = make_metric(mgr, {"name": "bleu", "tokenize": "none", "smooth_method": "none",
                              "max_ngram_order": order})
        if c["fn"] == "corpus_bleu":
            hyps = [toks(h) for h in c["hyps"]]
            refs = [[toks(r) for r in rs] for rs in c["list_of_refs"]]
        else:
            hyps, refs = [toks(c["hyp"])], [[toks(r) for r in c["refs"]]]
        got = m.compute(predictions=hyps, references=refs)["bleu"]
        assert got == pytest.approx(c.get("exact_recomputed", c["expected"]), abs=1e-4), c


WORDS = ["the", "cat", "sat", "on", "mat", "running", "runs", "ran", "dogs", "dog", "The", "CAT", "it's",
         "don't", "New", "York", "3.5", "42", "U.S.", "e-mail", "café", "naïve", "über", "日本", ",", ".", "!",
         "?", "(", ")", "\"", "'", "-", "--", ":", ";", "$", "%", "&", "hello", "world", "a", "an", "is"]
sentence = st.lists(st.sampled_from(WORDS), min_size=0, max_size=14).map(" ".join)
pairs = st.lists(st.tuples(sentence, sentence), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(pairs=pairs, tokenize=st.sampled_from(["13a", "intl", "none", "char"]), lower=st.booleans())
def test_bleu_equals_sacrebleu_on_random_text(mgr, pairs, tokenize, lower):
    hyps, refs = [p for p, _ in pairs], [r for _, r in pairs]
    m = make_metric(mgr, {"name": "bleu", "tokenize": tokenize, "lowercase": lower})
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize, lowercase=lower).score / 100
    assert m.compute(predictions=hyps, references=refs)["bleu"] == pytest.approx(expected, abs=1e-9)
    s = make_metric(mgr, {"name": "bleu", "tokenize": tokenize, "lowercase": lower, "sentence_level": True})
    exp_s = sum(sacrebleu.sentence_bleu(h, [r], tokenize=tokenize, lowercase=lower).score
                for h, r in zip(hyps, refs)) / len(hyps) / 100
    assert s.compute(predictions=hyps, references=refs)["bleu"] == pytest.approx(exp_s, abs=1e-9)


# -- ROUGE: rouge-score's test data (ROUGE-1.5.5 values) -------------------------------------------
@pytest.mark.parametrize("case", ROUGE["cases"], ids=lambda c: f"{'+'.join(c['types'])}:{c['prediction'][:12]}")
def test_rouge_vectors(mgr, case):
    m = make_metric(mgr, {"name": "rouge", "rouge_types": case["types"], "use_stemmer": False,
                          "precision_recall": True})
    got = m.compute(predictions=[case["prediction"]], references=[case["target"]])
    places = case.get("places", 7)
    for t in case["types"]:
        assert round(got[t], places) == round(case["fmeasure"], places)
        assert round(got[f"{t}_precision"], places) == round(case["precision"], places)
        assert round(got[f"{t}_recall"], places) == round(case["recall"], places)


@pytest.mark.parametrize("case", ROUGE["file_cases_rouge155"],
                         ids=lambda c: f"{c['type']}-stem{c['use_stemmer']}-{c['target'].split()[-1]}")
def test_rouge_rouge155_file_vectors(mgr, case):
    def line(spec):
        if spec.endswith(" (whole file)"):  # rougeLsum: one summary, a sentence per line
            return (VEC / "rouge_testdata" / spec[: -len(" (whole file)")]).read_text(encoding="utf-8")
        name, _, idx = spec.rpartition(" line ")
        return (VEC / "rouge_testdata" / name).read_text(encoding="utf-8").splitlines(keepends=True)[int(idx)]

    m = make_metric(mgr, {"name": "rouge", "rouge_types": [case["type"]], "use_stemmer": case["use_stemmer"],
                          "precision_recall": True})
    got = m.compute(predictions=[line(case["prediction"])], references=[line(case["target"])])
    p = case["places"]
    assert round(got[case["type"]], p) == pytest.approx(case["fmeasure"], abs=10 ** -p)
    assert round(got[f"{case['type']}_precision"], p) == pytest.approx(case["precision"], abs=10 ** -p)
    assert round(got[f"{case['type']}_recall"], p) == pytest.approx(case["recall"], abs=10 ** -p)


multiline = st.lists(sentence, min_size=1, max_size=3).map("\n".join)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(multiline, multiline), min_size=1, max_size=5), stem=st.booleans())
def test_rouge_equals_rouge_score_on_random_text(mgr, pairs, stem):
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    m = make_metric(mgr, {"name": "rouge", "use_stemmer": stem, "precision_recall": True})
    got = m.compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs])
    ref = rouge_scorer.RougeScorer(types, use_stemmer=stem)
    scores = [ref.score(r, p) for p, r in pairs]
    for t in types:
        for field, key in (("fmeasure", t), ("precision", f"{t}_precision"), ("recall", f"{t}_recall")):
            expected = sum(getattr(s[t], field) for s in scores) / len(scores)
            assert got[key] == pytest.approx(expected, abs=1e-12)


def test_rouge_default_stems_and_multi_reference_takes_best(mgr):
    m = make_metric(mgr, "rouge")
    stemmed = m.compute(predictions=["the dogs were running"], references=["the dog was run"])["rouge1"]
    assert stemmed == pytest.approx(rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
                                    .score("the dog was run", "the dogs were running")["rouge1"].fmeasure)
    assert stemmed > make_metric(mgr, {"name": "rouge", "use_stemmer": False}).compute(
        predictions=["the dogs were running"], references=["the dog was run"])["rouge1"]
    multi = m.compute(predictions=["a cat sat"], references=[["nothing alike here", "a cat sat"]])
    assert multi["rouge1"] == 1.0


def test_text_metrics_accept_any_iterables(mgr):
    preds, refs = ["the cat sat on the mat", "a dog barked"], ["the cat sat on a mat", "the dog barked"]
    for name in ("bleu", "rouge"):
        m = make_metric(mgr, name)
        assert m.compute(predictions=iter(preds), references=iter(refs)) == m.compute(predictions=preds,
                                                                                      references=refs)
