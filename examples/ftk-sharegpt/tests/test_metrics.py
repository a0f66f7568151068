from collections import Counter

import pytest
from nltk.util import ngrams

import ftk_sharegpt.plugin
from ftk.errors import FtkError
from ftk.testing import make_metric

PREDS = ["the cat sat on the mat", "the cat sat", "A dog barked at the cat", ""]
REFS = ["the cat sat on the mat", "The cat sat!", "a dog", "x"]


@pytest.fixture
def mgr(fresh_manager, register_plugin):
    register_plugin(ftk_sharegpt.plugin)
    return fresh_manager


def _reference_distinct(preds, n):
    # independent implementation: NLTK's n-grams pooled over the corpus
    grams = Counter(g for p in preds for g in ngrams(p.lower().split(), n))
    return len(grams) / sum(grams.values())


def test_distinct_n_matches_reference(mgr):
    m = make_metric(mgr, {"name": "distinct_n", "n": 3})
    assert m.requires == "text"
    got = m.compute(predictions=PREDS, references=REFS)
    assert set(got) == {"distinct_1", "distinct_2", "distinct_3"}
    for n in (1, 2, 3):
        assert got[f"distinct_{n}"] == pytest.approx(_reference_distinct(PREDS, n))
    assert make_metric(mgr, "distinct_n").compute(predictions=["a a a a"], references=[""]) == {
        "distinct_1": 0.25, "distinct_2": 1 / 3}


def test_distinct_n_degenerate_inputs(mgr):
    m = make_metric(mgr, "distinct_n")
    assert m.compute(predictions=["", ""], references=["", ""]) == {"distinct_1": 0.0, "distinct_2": 0.0}


def test_exact_match(mgr):
    assert make_metric(mgr, "exact_match").compute(predictions=PREDS, references=REFS) == {"exact_match": 0.5}
    strict = make_metric(mgr, {"name": "exact_match", "normalize": False})
    assert strict.compute(predictions=PREDS, references=REFS) == {"exact_match": 0.25}


@pytest.mark.parametrize("spec, where", [
    ({"name": "distinct_n", "n": 0}, "evaluation.metrics[0].n"),
    ({"name": "distinct_n", "n": "2"}, "evaluation.metrics[0].n"),
    ({"name": "exact_match", "ignore_case": True}, "evaluation.metrics[0].ignore_case: unknown key"),
])
def test_bad_metric_options(mgr, spec, where):
    with pytest.raises(FtkError) as e:
        make_metric(mgr, spec)
    assert where in str(e.value)
